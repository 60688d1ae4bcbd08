"""Minitron-style activation importance (Muralidharan et al., 2024), from forward passes only.

A neuron scores the root-mean-square of its activation (the input of ``down_proj``), a head
the L2 norm of its attention output (its columns of the ``o_proj`` input), a hidden channel
the root-mean-square of the norms' outputs (the attention's and the MLP's input) summed over
the blocks."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from llmpress import hookimpl
from llmpress.errors import ModelError
from llmpress.math.structured_math import group_sum
from llmpress.model.structures import BlockStructures
from llmpress.structure.blocks import BlockContext, PruneChannels
from llmpress.structure.structured import (
    BlockUnits,
    StructuredConfig,
    StructureScores,
    prune_block,
    score_block,
)


@dataclasses.dataclass(frozen=True)
class MinitronConfig(StructuredConfig):
    """Activation-based importance; uniform widths per layer by default."""

    method: ClassVar[str] = "minitron"
    display_name: ClassVar[str] = "Minitron"
    score_stats: ClassVar[frozenset[str]] = frozenset({"sq_norms"})
    citation: ClassVar[str] = """@inproceedings{muralidharan2024compact,
      title     = {Compact Language Models via Pruning and Knowledge Distillation},
      author    = {Muralidharan, Saurav and Sreenivas, Sharath Turuvekere and Joshi, Raviraj and
                   Chochowski, Marcin and Patwary, Mostofa and Shoeybi, Mohammad and Catanzaro, Bryan and
                   Kautz, Jan and Molchanov, Pavlo},
      booktitle = {Advances in Neural Information Processing Systems},
      year      = {2024}
    }"""


def _mean_sq(ctx: BlockContext, consumer: str) -> torch.Tensor:
    st = ctx.stats.get(consumer)
    if st is None:
        raise ModelError(f"{ctx.name}.{consumer}: minitron needs calibration statistics of its input")
    return st.sq_norms / max(st.nsamples, 1)  # [in]


def minitron_scores(ctx: BlockContext, structs: BlockStructures, config: StructuredConfig) -> StructureScores:
    heads = neurons = None
    if structs.neurons:  # per MLP (each expert of a mixture-of-experts block)
        neurons = tuple(_mean_sq(ctx, n.consumer).sqrt() for n in structs.neurons)
    if (h := structs.heads) is not None:
        heads = group_sum(_mean_sq(ctx, h.o), h.head_dim).sqrt()
    hidden = None
    if config.prunes_hidden():  # the norms' outputs: what the attention and the MLP read
        firsts = [
            rels[0]
            for rels in (structs.heads and structs.heads.q, structs.neurons and structs.neurons[0].producers)
            if rels
        ]
        hidden = sum(_mean_sq(ctx, r).sqrt() for r in firsts)
    return StructureScores(heads, None, neurons, hidden=hidden)  # type: ignore[arg-type]


@hookimpl
def llmpress_register_methods(register) -> None:  # noqa: ANN001
    register(MinitronConfig)


@hookimpl
def llmpress_score_block(block: BlockContext, config: MinitronConfig) -> BlockUnits:
    return score_block(block, config, minitron_scores)


@hookimpl
def llmpress_change_block(block: BlockContext, config: MinitronConfig) -> PruneChannels | None:
    return prune_block(block, config, minitron_scores)
