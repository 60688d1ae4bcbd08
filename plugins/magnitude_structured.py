"""Magnitude importance of structures (the baseline): the L2 norm of each coupled group's
weights, no calibration data."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from llmpress import hookimpl
from llmpress.math.structured_math import group_sum
from llmpress.model.modules import get_weight
from llmpress.model.structures import BlockStructures
from llmpress.structure.blocks import BlockContext, PruneChannels
from llmpress.structure.structured import (
    BlockUnits,
    StructuredConfig,
    StructureScores,
    hidden_importance,
    prune_block,
    score_block,
)


@dataclasses.dataclass(frozen=True)
class MagnitudeStructuredConfig(StructuredConfig):
    """Remove the heads and neurons whose weights have the smallest L2 norm."""

    method: ClassVar[str] = "magnitude_structured"
    display_name: ClassVar[str] = "magnitude"
    citation: ClassVar[str] = """@inproceedings{li2017pruning,
      title     = {Pruning Filters for Efficient ConvNets},
      author    = {Li, Hao and Kadav, Asim and Durdanovic, Igor and Samet, Hanan and Graf, Hans Peter},
      booktitle = {International Conference on Learning Representations},
      year      = {2017}
    }"""


def _rows_sq(ctx: BlockContext, names: tuple[str, ...]) -> torch.Tensor:
    """Summed squared norms of the output rows of ``names`` [out]."""
    return sum(get_weight(ctx.linear(n)).detach().float().square().sum(1) for n in names)  # type: ignore[return-value]


def _cols_sq(ctx: BlockContext, name: str) -> torch.Tensor:
    return get_weight(ctx.linear(name)).detach().float().square().sum(0)  # [in]


def magnitude_scores(
    ctx: BlockContext, structs: BlockStructures, config: StructuredConfig
) -> StructureScores:
    """Neuron ``j``: ``||(W_gate[j], W_up[j], W_down[:, j])||``; a query head: the norm of its
    query rows and output columns; a key/value head: of its key and value rows; a hidden
    channel: of its columns and rows in every block."""
    heads = kv = neurons = None
    if structs.neurons:  # per MLP (each expert of a mixture-of-experts block)
        neurons = tuple(
            (_rows_sq(ctx, n.producers) + _cols_sq(ctx, n.consumer)).sqrt() for n in structs.neurons
        )
    if (h := structs.heads) is not None:
        per_ch = _rows_sq(ctx, h.q) + _cols_sq(ctx, h.o)  # [n_heads * head_dim]
        heads = group_sum(per_ch, h.head_dim).sqrt()
        kv = group_sum(_rows_sq(ctx, h.kv), h.head_dim).sqrt()
    hidden = None
    if config.prunes_hidden():  # squared norm of the channel's columns and rows in this block
        hidden = hidden_importance(
            structs, lambda name: get_weight(ctx.linear(name)).detach().float().square()
        )
    return StructureScores(heads, kv, neurons, hidden=hidden)  # type: ignore[arg-type]


@hookimpl
def llmpress_register_methods(register) -> None:  # noqa: ANN001
    register(MagnitudeStructuredConfig)


@hookimpl
def llmpress_score_block(block: BlockContext, config: MagnitudeStructuredConfig) -> BlockUnits:
    return score_block(block, config, magnitude_scores)


@hookimpl
def llmpress_change_block(block: BlockContext, config: MagnitudeStructuredConfig) -> PruneChannels | None:
    return prune_block(block, config, magnitude_scores)
