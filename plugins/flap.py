"""FLAP (An et al., 2024): fluctuation-based structured pruning without retraining.

A consumer's input channel ``j`` (a neuron into ``down_proj``, a head's columns of ``o_proj``)
scores ``Var[x_j] * ||W[:, j]||^2``: how much the output moves when the channel is replaced by
its mean. Scores are standardized per layer and structure, the lowest removed across all
layers and structures at once, and each removed channel's mean contribution folded into the
consumer's bias (added where there was none)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal

import torch

from llmpress import hookimpl
from llmpress.errors import ModelError
from llmpress.model.modules import get_weight
from llmpress.model.structures import BlockStructures
from llmpress.structure.blocks import BlockContext, PruneChannels
from llmpress.structure.structured import (
    BlockUnits,
    StructuredConfig,
    StructureScores,
    hidden_readers,
    prune_block,
    score_block,
)


@dataclasses.dataclass(frozen=True)
class FlapConfig(StructuredConfig):
    """FLAP: fluctuation scores, global allocation, bias compensation (all by default)."""

    method: ClassVar[str] = "flap"
    display_name: ClassVar[str] = "FLAP"
    score_stats: ClassVar[frozenset[str]] = frozenset({"mean_var"})
    allocation: Literal["uniform", "global"] = "global"
    bias_compensation: bool = True
    citation: ClassVar[str] = """@inproceedings{an2024fluctuation,
      title     = {Fluctuation-Based Adaptive Structured Pruning for Large Language Models},
      author    = {An, Yongqi and Zhao, Xu and Yu, Tao and Tang, Ming and Wang, Jinqiao},
      booktitle = {Proceedings of the AAAI Conference on Artificial Intelligence},
      year      = {2024}
    }"""


def fluctuation(ctx: BlockContext, consumer: str) -> torch.Tensor:
    """``Var[x_j] * ||W[:, j]||^2`` for every input channel of ``consumer`` [in]."""
    st = ctx.stats.get(consumer)
    if st is None:
        raise ModelError(f"{ctx.name}.{consumer}: FLAP needs calibration statistics of its input")
    w = get_weight(ctx.linear(consumer)).detach().float()  # [out, in]
    return st.variance.to(w.device) * w.square().sum(0)


def flap_scores(ctx: BlockContext, structs: BlockStructures, config: StructuredConfig) -> StructureScores:
    """Neurons: their fluctuation. Heads: per output channel, the fluctuation squared (as the
    authors' code scores attention channels); the core sums or standardizes and averages them
    per head. Hidden channels (not in the paper): their fluctuation into q/k/v and gate/up."""
    channels = neurons = None
    if structs.neurons:  # per MLP (each expert of a mixture-of-experts block)
        neurons = tuple(fluctuation(ctx, n.consumer) for n in structs.neurons)
    if structs.heads is not None:
        channels = fluctuation(ctx, structs.heads.o).square()
    hidden = None
    if config.prunes_hidden():  # the channel's fluctuation into every reader of the stream
        hidden = sum(fluctuation(ctx, r) for r in hidden_readers(structs))
    return StructureScores(neurons=neurons, head_channels=channels, hidden=hidden)  # type: ignore[arg-type]


@hookimpl
def llmpress_register_methods(register) -> None:  # noqa: ANN001
    register(FlapConfig)


@hookimpl
def llmpress_score_block(block: BlockContext, config: FlapConfig) -> BlockUnits:
    return score_block(block, config, flap_scores)


@hookimpl
def llmpress_change_block(block: BlockContext, config: FlapConfig) -> PruneChannels | None:
    return prune_block(block, config, flap_scores)
