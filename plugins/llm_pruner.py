"""LLM-Pruner (Ma et al., 2023): first-order Taylor importance ``|W * dL/dW|`` of every weight,
summed over each coupled group (a neuron's gate/up rows and down column, a head's query rows
and output columns, a key/value head's key and value rows, a hidden channel's columns and rows
in every block). Gradients of the LM loss on the
calibration text come from the core's ``grad`` statistic."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from llmpress import hookimpl
from llmpress.errors import ModelError
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
class LLMPrunerConfig(StructuredConfig):
    """Taylor importance of coupled groups; uniform widths per layer by default."""

    method: ClassVar[str] = "llm_pruner"
    display_name: ClassVar[str] = "LLM-Pruner"
    score_stats: ClassVar[frozenset[str]] = frozenset({"grad"})
    citation: ClassVar[str] = """@inproceedings{ma2023llmpruner,
      title     = {LLM-Pruner: On the Structural Pruning of Large Language Models},
      author    = {Ma, Xinyin and Fang, Gongfan and Wang, Xinchao},
      booktitle = {Advances in Neural Information Processing Systems},
      year      = {2023}
    }"""


def taylor(ctx: BlockContext, name: str) -> torch.Tensor:
    """``|W * dL/dW|`` [out, in] of one layer."""
    st = ctx.stats.get(name)
    if st is None:
        raise ModelError(f"{ctx.name}.{name}: llm_pruner needs the layer's gradient (calibration data)")
    w = get_weight(ctx.linear(name)).detach().float()
    return (w * st.grad.to(w.device)).abs()


def _rows(ctx: BlockContext, names: tuple[str, ...]) -> torch.Tensor:
    return sum(taylor(ctx, n).sum(1) for n in names)  # type: ignore[return-value]


def taylor_scores(ctx: BlockContext, structs: BlockStructures, config: StructuredConfig) -> StructureScores:
    heads = kv = neurons = None
    if structs.neurons:  # per MLP (each expert of a mixture-of-experts block)
        neurons = tuple(_rows(ctx, n.producers) + taylor(ctx, n.consumer).sum(0) for n in structs.neurons)
    if (h := structs.heads) is not None:
        heads = group_sum(_rows(ctx, h.q) + taylor(ctx, h.o).sum(0), h.head_dim)
        kv = group_sum(_rows(ctx, h.kv), h.head_dim)
    hidden = None
    if config.prunes_hidden():  # the channel's columns and rows in this block
        hidden = hidden_importance(structs, lambda name: taylor(ctx, name))
    return StructureScores(heads, kv, neurons, hidden=hidden)  # type: ignore[arg-type]


@hookimpl
def llmpress_register_methods(register) -> None:  # noqa: ANN001
    register(LLMPrunerConfig)


@hookimpl
def llmpress_score_block(block: BlockContext, config: LLMPrunerConfig) -> BlockUnits:
    return score_block(block, config, taylor_scores)


@hookimpl
def llmpress_change_block(block: BlockContext, config: LLMPrunerConfig) -> PruneChannels | None:
    return prune_block(block, config, taylor_scores)
