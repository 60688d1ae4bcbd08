"""Structured pruning on the block hook: the config all importance methods share, and the glue
from per-structure scores to a :class:`llmpress.structure.blocks.PruneChannels` change.

An importance plugin supplies one function, ``scores(ctx, structs, config) ->
StructureScores`` (higher = more important), and two hookimpls delegating here::

    @hookimpl
    def llmpress_score_block(block, config):
        return score_block(block, config, my_scores)

    @hookimpl
    def llmpress_change_block(block, config):
        return prune_block(block, config, my_scores)

``ratio`` is the fraction of the blocks' parameters removed. ``allocation="uniform"`` removes
it from every block; ``"global"`` (FLAP) scores every block first and removes the units with
the lowest standardized scores across all blocks and structures. Each MLP of a block is a
structure of its own: a mixture-of-experts block's experts (and shared expert) each lose the
same fraction of their neurons under uniform allocation, and are standardized per expert under
global allocation.

Hidden channels (structure ``hidden``) are one width for the whole model: every block scores
them (``StructureScores.hidden``, summed over blocks), the planning pass decides how many go
and :meth:`StructuredConfig.model_changes` removes them (:mod:`llmpress.structure.hidden`) before the
block pass. Uniform: a fraction ``f`` of the hidden channels and of every block's heads and
neurons with ``(1 - f)^2 = 1 - ratio`` (alone: the whole budget), each block's heads and
neurons then making up the rest of its share. Global: hidden channels compete with every
block's heads and neurons, their scores standardized over the channels.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from typing import Any, ClassVar, Literal, TypeVar

import torch

from llmpress.errors import ModelError, RecipeError
from llmpress.math.structured_math import (
    Units,
    allocate_global,
    allocate_uniform,
    compensation_bias,
    group_sum,
    kv_group_units,
    neuron_units,
    query_head_units,
    reconstruct,
    removed_members,
    standardize,
)
from llmpress.model.modules import get_weight
from llmpress.model.structures import HEAD_ATTRIBUTES, STRUCTURES, BlockStructures, discover, require
from llmpress.recipe.config import Allocatable, LevelKind, PositiveInt
from llmpress.structure.block_stage import BlockMethodConfig
from llmpress.structure.blocks import BlockContext, BlockDecision, BlockScore, ChannelGroup, PruneChannels
from llmpress.structure.hidden import PruneHidden, block_hidden_cost, hidden_step

log = logging.getLogger(__name__)


_C = TypeVar("_C", bound="StructuredConfig")


class _Stats:
    """``config.stats`` per instance (options add statistics); on the class, every one it may ask."""

    def __get__(self, obj: Any, cls: Any) -> frozenset[str]:
        if obj is None:
            return frozenset(cls.score_stats | {"mean_var", "hessian"})
        return obj.needed_stats()


class _NeedsCalibration:
    def __get__(self, obj: Any, cls: Any) -> bool:
        return True if obj is None else bool(obj.needed_stats())


@dataclasses.dataclass(frozen=True)
class StructuredConfig(BlockMethodConfig):
    """Options shared by the structured pruning methods.

    * ``ratio``: fraction of the blocks' parameters removed, in [0, 1).
    * ``structures``: any of ``heads``, ``neurons``, ``hidden`` (the residual width, across
      the whole model).
    * ``allocation``: ``uniform`` (the same fraction of every block) or ``global``; a stage's
      ``allocation: {method: evopress}`` searches per-block widths instead
      (:mod:`llmpress.allocation.width_levels`).
    * ``head_mode``: ``query`` (query heads removed evenly from every key/value group),
      ``group`` (a key/value head with all of its query heads) or ``auto`` (``query`` under
      grouped-query attention, ``group`` otherwise).
    * ``bias_compensation``: fold the removed input channels' mean contribution into the
      consumer's output bias (FLAP; a bias is added where there was none).
    * ``reconstruct``: least-squares update of each consumer (``o_proj``, ``down_proj``) on
      calibration inputs so that its output changes least (with a fitted bias when
      ``bias_compensation``); with ``hidden``, also of every reader of the residual stream
      (q/k/v, gate/up) that loses input channels, on the dense model's inputs.
    * ``neuron_multiple``: remove neurons (and hidden channels) this many at a time, so MLP
      and hidden widths stay multiples of it (e.g. a later GPTQ stage's ``group_size``).
    """

    #: values of ``allocation:`` that set this option rather than name a search (EvoPress)
    own_allocations: ClassVar[tuple[str, ...]] = ("uniform", "global")
    #: statistics the importance score itself needs (the config adds what compensation needs)
    score_stats: ClassVar[frozenset[str]] = frozenset()
    ratio: float = 0.2
    structures: tuple[str, ...] = ("heads", "neurons")
    allocation: Literal["uniform", "global"] = "uniform"
    head_mode: Literal["auto", "query", "group"] = "auto"
    bias_compensation: bool = False
    reconstruct: bool = False
    neuron_multiple: PositiveInt = 1

    #: the statistics to collect: the score's plus what compensation/reconstruction need
    stats = _Stats()  # type: ignore[assignment]
    needs_calibration = _NeedsCalibration()  # type: ignore[assignment]

    def describe(self) -> str:
        what = " and ".join(self.structures)
        return f"{self.display_name or self.method} structured pruning of {what}, {100 * self.ratio:.0f} % of the blocks' parameters removed"

    def needed_stats(self) -> frozenset[str]:
        extra = set()
        if self.bias_compensation:
            extra.add("mean_var")
        if self.reconstruct:
            extra |= {"hessian", "mean_var"}
        return frozenset(self.score_stats | extra)

    def validate(self) -> None:
        super().validate()
        r = self.ratio
        if not 0.0 <= r < 1.0:
            raise RecipeError(f"method {self.method!r}: ratio {r!r} is outside [0, 1); use e.g. 0.2 for 20 %")
        if not self.structures:
            raise RecipeError(
                f"method {self.method!r}: structures must be a non-empty list, e.g. [heads, neurons]"
            )
        bad = [s for s in self.structures if s not in STRUCTURES]
        if bad:
            raise RecipeError(
                f"method {self.method!r}: unknown structure(s) {bad}; known: {list(STRUCTURES)}"
            )

    def plans_globally(self) -> bool:
        return self.allocation == "global" or "hidden" in self.structures

    def allocatable(self) -> Allocatable | None:
        return Allocatable(LevelKind.WIDTHS, float(self.ratio))

    def at_level(self: _C, value: float) -> _C:
        """This config removing ``value`` of every block uniformly (a width level)."""
        return dataclasses.replace(self, ratio=float(value), allocation="uniform")  # type: ignore[call-arg]

    def prunes_hidden(self) -> bool:
        return "hidden" in self.structures

    def decide(self, block_scores: tuple[BlockScore | None, ...]) -> BlockDecision | None:
        """Per block, how many units of each structure go (global allocation), and the hidden
        channels removed: decided once from every block's scores."""
        return _plan(block_scores, self) if self.plans_globally() else None

    def model_changes(
        self, block_scores: tuple[BlockScore | None, ...], decision: BlockDecision | None
    ) -> tuple[PruneHidden, ...]:
        """The hidden channels removed (a :class:`llmpress.structure.hidden.PruneHidden`), if any."""
        if "hidden" not in self.structures or not isinstance(decision, _Plan):
            return ()
        change = plan_hidden(block_scores, decision)
        return () if change is None else (change,)


@dataclasses.dataclass(frozen=True)
class StructureScores:
    """Importance (higher = keep) of one block's structures: ``heads`` per query head
    [n_heads]; ``kv`` per key/value head [n_kv] (``None``: a group scores the sum of its query
    heads); ``neurons`` per MLP of the block, in the order of ``BlockStructures.neurons``
    ([width] each; a bare tensor stands for a block with one MLP). A method scoring the
    channels of the heads' output instead gives ``head_channels`` [n_heads * head_dim]: a head
    scores their sum, or under global allocation their mean after standardization over the
    layer's channels (FLAP's code)."""

    heads: torch.Tensor | None = None
    kv: torch.Tensor | None = None
    neurons: tuple[torch.Tensor, ...] | torch.Tensor | None = None
    head_channels: torch.Tensor | None = None
    #: this block's share of the hidden channels' importance [hidden] (summed over blocks)
    hidden: torch.Tensor | None = None

    def per_mlp(self, structs: BlockStructures, where: str) -> tuple[torch.Tensor, ...]:
        """The neuron scores of each of the block's MLPs (checked against their widths)."""
        got = (self.neurons,) if isinstance(self.neurons, torch.Tensor) else tuple(self.neurons or ())
        if len(got) != len(structs.neurons) or any(
            t.shape != (n.width,) for t, n in zip(got, structs.neurons)
        ):
            raise ModelError(
                f"{where}: neuron scores of shapes {[tuple(t.shape) for t in got]} do not match the "
                f"block's MLPs (widths {[n.width for n in structs.neurons]}); give one tensor per MLP"
            )
        return got

    def per_head(self, head_dim: int, standardized: bool) -> StructureScores:
        """Head scores from ``head_channels`` (summed, or standardized then averaged)."""
        if self.head_channels is None:
            return self
        ch = self.head_channels.float()
        heads = group_sum(standardize(ch), head_dim) / head_dim if standardized else group_sum(ch, head_dim)
        return dataclasses.replace(self, heads=heads, head_channels=None)


Scorer = Callable[[BlockContext, BlockStructures, Any], StructureScores]


def hidden_readers(structs: BlockStructures) -> tuple[str, ...]:
    """The block's linears whose input columns are hidden channels (q/k/v, gate/up)."""
    h = structs.heads
    return (() if h is None else (*h.q, *h.kv)) + tuple(p for n in structs.neurons for p in n.producers)


def hidden_writers(structs: BlockStructures) -> tuple[str, ...]:
    """The block's linears whose output rows are hidden channels (o_proj, down_proj)."""
    h = structs.heads
    return (() if h is None else (h.o,)) + tuple(n.consumer for n in structs.neurons)


def hidden_importance(structs: BlockStructures, per_weight: Callable[[str], torch.Tensor]) -> torch.Tensor:
    """A hidden channel's share in one block of a per-weight importance ([out, in] for a
    layer name): summed over its columns in the readers and its rows in the writers."""
    cols = sum(per_weight(r).sum(0) for r in hidden_readers(structs))
    return cols + sum(per_weight(w).sum(1) for w in hidden_writers(structs))  # type: ignore[return-value]


@dataclasses.dataclass(frozen=True)
class BlockUnits(BlockScore):
    """What the planning pass keeps of one block: its units per structure and its size."""

    units: tuple[Units, ...]
    params: int
    #: this block's hidden-channel scores [hidden] and parameters per hidden channel
    hidden: torch.Tensor | None = None
    hidden_cost: int = 0
    #: hidden channels the model's config accepts removing at a time
    hidden_step: int = 1
    #: with ``reconstruct``: the dense model's ``E[x x^T]`` of the inputs of the block's hidden
    #: readers (q/k/v, gate/up; qualified names; one tensor per shared input), on CPU
    reader_hessians: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)


def structures_of(ctx: BlockContext, config: StructuredConfig) -> BlockStructures:
    hidden = getattr(ctx.model_config, "hidden_size", None)
    if not isinstance(hidden, int):
        raise ModelError(f"{ctx.name}: the model config has no hidden_size; cannot find its structures")
    structs = discover(ctx.module, ctx.model_config, hidden, ctx.name)
    require(structs, tuple(config.structures), ctx.name)
    return structs


def _has_bias(ctx: BlockContext, rel: str) -> int:
    return int(isinstance(getattr(ctx.linear(rel), "bias", None), torch.Tensor))


def _head_mode(structs: BlockStructures, config: StructuredConfig) -> str:
    h = structs.heads
    assert h is not None
    if config.head_mode == "auto":
        return "query" if h.group > 1 else "group"
    if config.head_mode == "query" and h.group == 1:
        return "group"  # one query head per group: removing it removes the group
    return config.head_mode


def block_units(ctx: BlockContext, config: StructuredConfig, scorer: Scorer) -> BlockUnits:
    """Score ``ctx``'s block and turn the scores into removal units, per ``config.structures``."""
    structs = structures_of(ctx, config)
    sc = scorer(ctx, structs, config)
    if config.allocation == "global":  # comparable across blocks and structures (FLAP)
        heads = sc.heads if sc.head_channels is None or structs.heads is None else None

        def std(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else standardize(t.float().cpu())

        mlps = () if sc.neurons is None else sc.per_mlp(structs, ctx.name)  # each MLP a layer
        neurons = tuple(standardize(t.float().cpu()) for t in mlps) or None
        sc = dataclasses.replace(sc, heads=std(heads), kv=std(sc.kv), neurons=neurons)
    if structs.heads is not None:  # channel scores -> heads (standardized over the channels)
        sc = sc.per_head(structs.heads.head_dim, config.allocation == "global")
    hidden = int(ctx.model_config.hidden_size)
    units: list[Units] = []
    for kind in config.structures:
        if kind == "hidden":
            continue
        if kind == "neurons":  # one list per MLP (each expert of a mixture-of-experts block)
            for n, scores in zip(structs.neurons, sc.per_mlp(structs, ctx.name)):
                cost = sum(hidden + _has_bias(ctx, p) for p in n.producers) + hidden
                if n.width % config.neuron_multiple:
                    raise ModelError(
                        f"{ctx.name}.{n.consumer}: MLP width {n.width} is not a multiple of "
                        f"neuron_multiple {config.neuron_multiple}"
                    )
                units.append(neuron_units(scores.cpu(), cost, config.neuron_multiple))
        else:
            h = structs.heads
            assert h is not None and sc.heads is not None
            per_q = h.head_dim * (sum(hidden + _has_bias(ctx, q) for q in h.q) + hidden)
            if _head_mode(structs, config) == "query":
                units.append(query_head_units(sc.heads.cpu(), h.n_kv, per_q))
            else:
                per_kv = h.head_dim * sum(hidden + _has_bias(ctx, k) for k in h.kv)
                groups = sc.heads.cpu().float().reshape(h.n_kv, -1).sum(1)
                if sc.kv is not None:
                    groups = groups + sc.kv.cpu().float()
                units.append(kv_group_units(groups, per_q * h.group + per_kv))
    params = sum(p.numel() for p in ctx.module.parameters())
    if "hidden" not in config.structures:
        return BlockUnits(tuple(units), params)
    if sc.hidden is None or sc.hidden.shape != (hidden,):
        raise ModelError(
            f"{ctx.name}: method {config.method!r} gave no hidden-channel scores of size {hidden}"
        )
    cost = block_hidden_cost(ctx.module, ctx.name, ctx.model_config, hidden)
    hessians: dict[str, torch.Tensor] = {}
    if config.reconstruct:  # for the least-squares update of the readers that lose hidden inputs
        by_input: dict[int, torch.Tensor] = {}
        for r in hidden_readers(structs):
            st = ctx.stats[r]
            hessians[f"{ctx.name}.{r}"] = by_input.setdefault(id(st), st.hessian.float().cpu())
    return BlockUnits(
        tuple(units), params, sc.hidden.float().cpu(), cost, hidden_step(ctx.model_config), hessians
    )


def score_block(ctx: BlockContext, config: StructuredConfig, scorer: Scorer) -> BlockUnits:
    """``llmpress_score_block`` of a structured method: the block's units."""
    return block_units(ctx, config, scorer)


@dataclasses.dataclass(frozen=True)
class _Plan(BlockDecision):
    """The planning pass's decision: per block its unit counts (``None`` under uniform
    allocation: each block decides in the block pass) and the hidden units removed."""

    blocks: list[list[int]] | None
    hidden: Units | None
    hidden_count: int


def _hidden_units(blocks: list[BlockUnits], config: StructuredConfig) -> Units:
    """Hidden channels as removal units: block scores summed (standardized under global
    allocation), ``neuron_multiple`` at a time, their cost summed over the blocks."""
    scores = torch.stack([b.hidden for b in blocks if b.hidden is not None]).sum(0)
    if config.allocation == "global":
        scores = standardize(scores)
    multiple = math.lcm(config.neuron_multiple, blocks[0].hidden_step)
    if scores.numel() % multiple:
        raise ModelError(
            f"{config.method}: hidden size {scores.numel()} is not a multiple of {multiple} (neuron_multiple "
            f"{config.neuron_multiple} and the config's step of {blocks[0].hidden_step} channels)"
        )
    u = neuron_units(scores, sum(b.hidden_cost for b in blocks), multiple)
    return dataclasses.replace(u, kind="hidden")


def _removed_estimate(units: list[Units], counts: list[int], hidden: Units | None, width: int) -> float:
    """Parameters removed by ``counts``: a hidden channel and a head or neuron removed together
    share their weights (each structure's cost assumes the other whole)."""
    total = [k * u.cost for u, k in zip(units, counts)]
    if hidden is None:
        return float(sum(total))
    frac = sum(len(m) for m in hidden.members[: counts[-1]]) / width  # hidden fraction gone
    return float(sum(total[:-1]) * (1 - frac) + total[-1])


def _allocate_global(units: list[Units], target: float, hidden: Units | None, width: int) -> list[int]:
    """:func:`allocate_global` with its target raised until the removal, net of the overlap of
    hidden channels with heads and neurons, comes closest to ``target``."""
    if hidden is None:
        return allocate_global(units, target, standardized=False)
    lo, hi = target, 2.0 * target
    while _removed_estimate(units, allocate_global(units, hi, standardized=False), hidden, width) < target:
        if hi > 1e3 * max(target, 1.0):
            break
        lo, hi = hi, 2 * hi
    for _ in range(40):
        mid = (lo + hi) / 2
        if _removed_estimate(units, allocate_global(units, mid, standardized=False), hidden, width) < target:
            lo = mid
        else:
            hi = mid
    below, above = (allocate_global(units, t, standardized=False) for t in (lo, hi))
    err = [abs(_removed_estimate(units, c, hidden, width) - target) for c in (below, above)]
    return below if err[0] <= err[1] else above


def _plan(scores: tuple[BlockScore | None, ...], config: StructuredConfig) -> _Plan:
    """The cross-block decision (once per planning pass, by :meth:`StructuredConfig.decide`)."""
    blocks = _block_units(scores, config.method)
    target = float(config.ratio) * sum(b.params for b in blocks)
    hidden = _hidden_units(blocks, config) if "hidden" in config.structures else None
    width = 0 if hidden is None else int(blocks[0].hidden.numel())  # type: ignore[union-attr]
    if config.allocation == "global":  # block scores were standardized per block and structure
        flat = [u for b in blocks for u in b.units] + ([hidden] if hidden is not None else [])
        counts = _allocate_global(flat, target, hidden, width)
        per_block, k = [], 0
        for b in blocks:
            per_block.append(counts[k : k + len(b.units)])
            k += len(b.units)
        plan = _Plan(per_block, hidden, counts[-1] if hidden is not None else 0)
    else:
        n_hidden = 0
        if hidden is not None:
            m = len(hidden.members[0]) if len(hidden) else 1  # channels per unit
            if any(b.units for b in blocks):  # (1 - f)^2 = 1 - ratio
                n_hidden = round((1 - (1 - float(config.ratio)) ** 0.5) * width / m)
            else:
                n_hidden = round(target / hidden.cost)
            n_hidden = min(n_hidden, len(hidden))
        plan = _Plan(None, hidden, n_hidden)
    return plan


def plan_hidden(scores: tuple[BlockScore | None, ...], plan: _Plan) -> PruneHidden | None:
    """The :class:`llmpress.structure.hidden.PruneHidden` of the planning pass (``None``: none removed)."""
    if plan.hidden is None or plan.hidden_count == 0:
        return None
    blocks = _block_units(scores, "structured")
    assert blocks[0].hidden is not None
    width = int(blocks[0].hidden.numel())
    gone = torch.tensor(removed_members(plan.hidden, plan.hidden_count), dtype=torch.int64)
    hessians: dict[str, torch.Tensor] = {}
    for b in blocks:
        hessians.update(b.reader_hessians)
        b.reader_hessians.clear()  # handed over: not kept with the block scores
    return PruneHidden(_complement(width, gone), hessians)


def _block_units(scores: tuple[BlockScore | None, ...], method: str) -> list[BlockUnits]:
    """The planning pass's scores, every block's a :class:`BlockUnits`."""
    blocks = [b for b in scores if isinstance(b, BlockUnits)]
    if not blocks or len(blocks) != len(scores):
        raise ModelError(f"{method}: the planning pass gave no block scores")
    return blocks


def _planned(ctx: BlockContext) -> BlockUnits:
    score = ctx.scores[ctx.index] if len(ctx.scores) > ctx.index else None
    if not isinstance(score, BlockUnits):
        raise ModelError(f"{ctx.name}: this allocation needs the planning pass's block scores")
    return score


def prune_block(ctx: BlockContext, config: StructuredConfig, scorer: Scorer) -> PruneChannels | None:
    """``llmpress_change_block`` of a structured method: remove the block's share of units."""
    if config.allocation == "global":
        bu = _planned(ctx)
        plan = ctx.decision
        if not isinstance(plan, _Plan) or plan.blocks is None:
            raise ModelError(f"{ctx.name}: this allocation needs the planning pass's decision")
        counts = plan.blocks[ctx.index]
    else:
        bu = block_units(ctx, config, scorer)
        target = float(config.ratio) * bu.params
        if "hidden" in config.structures:  # the hidden channels already took part of the share
            before = _planned(ctx).params
            target = float(config.ratio) * before - (before - bu.params)
        if not bu.units:
            return None
        counts = allocate_uniform(bu.units, target)
        _check_uniform(ctx, config, bu, target)
    structs = structures_of(ctx, config)
    return build_change(ctx, config, structs, bu.units, counts)


def _check_uniform(ctx: BlockContext, config: StructuredConfig, bu: BlockUnits, target: float) -> None:
    """The budget must be reachable without removing every head or neuron of the block."""
    removable = sum(len(u) * u.cost for u in bu.units)
    if target > removable + max((u.cost for u in bu.units), default=0) / 2:
        kinds = ", ".join(dict.fromkeys(u.kind for u in bu.units))  # an MoE block: neurons once
        raise ModelError(
            f"{ctx.name}: ratio {config.ratio} would remove every {kinds} of this block "
            f"(at most {removable / bu.params:.3f} of its parameters can go); lower the ratio or add structures"
        )


def build_change(
    ctx: BlockContext,
    config: StructuredConfig,
    structs: BlockStructures,
    units: tuple[Units, ...],
    counts: list[int],
) -> PruneChannels | None:
    """The :class:`PruneChannels` removing the first ``counts[i]`` units of each structure,
    with the consumers' bias compensation or least-squares update."""
    groups: list[ChannelGroup] = []
    attrs: dict[str, dict[str, Any]] = {}
    consumer_keep: dict[str, torch.Tensor] = {}
    mlps = iter(structs.neurons)  # the neuron lists follow the block's MLPs, in order
    for u, k in zip(units, counts):
        n = next(mlps) if u.kind == "neurons" else None
        if k == 0:
            continue
        gone = torch.tensor(removed_members(u, k), dtype=torch.int64)
        if n is not None:
            keep = _complement(n.width, gone)
            groups.append(ChannelGroup(n.producers, (n.consumer,), keep))
            consumer_keep[n.consumer] = keep
            continue
        h = structs.heads
        assert h is not None
        if _head_mode(structs, config) == "query":
            q_gone, kv_gone = gone, torch.zeros(0, dtype=torch.int64)
        else:
            kv_gone = gone
            q_gone = (gone.view(-1, 1) * h.group + torch.arange(h.group)).flatten()
        q_keep = _complement(h.n_heads, q_gone)
        keep = h.q_channels(q_keep)
        groups.append(ChannelGroup(h.q, (h.o,), keep))
        consumer_keep[h.o] = keep
        n_kv = h.n_kv - kv_gone.numel()
        if kv_gone.numel():
            groups.append(ChannelGroup(h.kv, (), h.kv_channels(_complement(h.n_kv, kv_gone))))
        new = {
            "num_key_value_groups": q_keep.numel() // n_kv,
            "num_heads": q_keep.numel(),
            "num_key_value_heads": n_kv,
        }
        attn = ctx.module.get_submodule(h.module) if h.module else ctx.module
        attrs[h.module] = {a: v for a, v in new.items() if a in HEAD_ATTRIBUTES and hasattr(attn, a)}
    if not groups:
        return None
    weights, biases = _consumer_updates(ctx, config, consumer_keep)
    return PruneChannels(tuple(groups), attrs, weights, biases)


def _complement(n: int, gone: torch.Tensor) -> torch.Tensor:
    mask = torch.ones(n, dtype=torch.bool)
    mask[gone] = False
    return torch.nonzero(mask).flatten()


@torch.no_grad()
def _consumer_updates(
    ctx: BlockContext, config: StructuredConfig, consumer_keep: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    weights: dict[str, torch.Tensor] = {}
    biases: dict[str, torch.Tensor] = {}
    if not (config.bias_compensation or config.reconstruct):
        return weights, biases
    for rel, keep in consumer_keep.items():
        mod = ctx.linear(rel)
        w = get_weight(mod).detach().float()  # [out, in]
        st = ctx.stats.get(rel)
        if st is None:
            raise ModelError(f"{ctx.name}.{rel}: no calibration statistics for compensation")
        old_b = getattr(mod, "bias", None)
        b0 = (
            old_b.detach().float()
            if isinstance(old_b, torch.Tensor)
            else torch.zeros(w.shape[0], device=w.device)
        )
        mean = st.mean.to(w.device)
        if config.reconstruct:
            new_w, db = reconstruct(
                w, st.hessian.to(w.device), keep.to(w.device), mean if config.bias_compensation else None
            )
            weights[rel] = new_w
            if db is not None:
                biases[rel] = b0 + db
        else:
            gone = _complement(w.shape[1], keep).to(w.device)
            biases[rel] = b0 + compensation_bias(w, mean, gone)
    return weights, biases
