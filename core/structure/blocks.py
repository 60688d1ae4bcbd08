"""Block-level changes: units of work larger than one Linear.

A block-level method (:class:`llmpress.structure.block_stage.BlockMethodConfig`) returns, from
``llmpress_change_block``, changes that the core
applies to the block:

* :class:`PruneChannels`: channels removed across coupled modules. Each
  :class:`ChannelGroup` names the *producers* (linears whose output rows are the channels:
  ``gate_proj``/``up_proj`` for MLP neurons, ``q/k/v_proj`` for heads) and the *consumers*
  (linears whose input columns they feed: ``down_proj``, ``o_proj``) and the indices kept.
  The layers are replaced by smaller ``nn.Linear`` modules.
* :class:`ScaleChannels`: a function-preserving transform (SmoothQuant): the outputs of a
  source (a norm's weight, or a linear's output rows) are divided by ``scales`` and the
  input columns of the following linears multiplied by them.
* :class:`DropSubBlocks`: sub-blocks (``self_attn``, ``mlp``) replaced by a module adding
  nothing to the residual stream.
* :class:`SetWeights`: new values for layers' weights, same shapes (AWQ's weight clipping).

Applying a change returns per-layer results (removed indices), which the block-change stage
(:mod:`llmpress.structure.block_stage`) records in the run's state.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from llmpress.engine.stats import LayerStats
from llmpress.errors import ModelError
from llmpress.model.dropped import DroppedModule
from llmpress.model.modules import get_weight, in_out_features, norm_weight_offset
from llmpress.model.results import LayerResult

if TYPE_CHECKING:
    from llmpress.engine.capture import BlockActivations


class BlockScore:
    """Base of what ``llmpress_score_block`` returns for one block (e.g. a structured
    method's :class:`llmpress.structure.structured.BlockUnits`): typed, so the engine can
    check it and the method's ``llmpress_change_block`` reads it back without guessing."""


class BlockDecision:
    """Base of a block method's decision across blocks, made once after the planning pass
    (``BlockMethodConfig.decide``) and handed to every ``llmpress_change_block`` call."""


@dataclasses.dataclass(frozen=True)
class BlockInputs:
    """The block's calibration inputs, as the block pass holds them (read them, do not change
    them): batch ``i`` is ``hidden[i]`` [B, L, d] with the keyword arguments the model passes
    its blocks (attention mask, position embeddings)."""

    acts: BlockActivations
    module: nn.Module

    def __len__(self) -> int:
        return len(self.acts.hidden)

    def batch(self, i: int) -> tuple[torch.Tensor, dict[str, Any]]:
        """Batch ``i``'s input on the compute device and its keyword arguments."""
        return self.acts.hidden[i].to(self.acts.compute), self.acts.kwargs[i]

    @torch.no_grad()
    def run(self, i: int) -> torch.Tensor:
        """The block's output on batch ``i`` (its hidden states) with its current weights."""
        x, kwargs = self.batch(i)
        out = self.module(x, **kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out

    def outputs(self) -> Iterator[torch.Tensor]:
        """:meth:`run` over every batch in order."""
        for i in range(len(self)):
            yield self.run(i)


@dataclasses.dataclass(frozen=True)
class BlockContext:
    """What a block-level hook sees: the block and its input statistics."""

    index: int
    #: qualified name of the block, e.g. ``model.layers.3``
    name: str
    module: nn.Module
    #: the model's ``config`` (head counts, sizes)
    model_config: Any
    #: statistics of every linear layer's input, by name relative to the block
    stats: dict[str, LayerStats]
    #: every block's ``llmpress_score_block`` answer from the planning pass, for a method
    #: whose config asks for one (``config.plans_globally()``); empty otherwise
    scores: tuple[BlockScore | None, ...] = ()
    #: the method's decision across blocks (``BlockMethodConfig.decide``), or ``None``
    decision: BlockDecision | None = None
    #: the block's calibration inputs (``None`` without calibration data)
    inputs: BlockInputs | None = None
    #: what ``llmpress_score_block`` and ``llmpress_change_block`` may return (checked by the core)
    score_type: ClassVar[type[BlockScore]] = BlockScore
    change_types: ClassVar[tuple[type[PruneChannels | ScaleChannels | DropSubBlocks | SetWeights], ...]] = ()

    def linear(self, rel: str) -> nn.Module:
        return self.module.get_submodule(rel)


@dataclasses.dataclass(frozen=True)
class ChannelGroup:
    """Coupled channels: output rows of ``producers`` = input columns of ``consumers``."""

    producers: tuple[str, ...]
    consumers: tuple[str, ...]
    #: int64 indices of the channels kept (any order; applied sorted)
    keep: torch.Tensor


@dataclasses.dataclass(frozen=True)
class PruneChannels:
    """Remove channels; ``attributes`` sets attributes of submodules afterwards, e.g.
    ``{"self_attn": {"num_key_value_groups": 2}}`` when heads change."""

    groups: tuple[ChannelGroup, ...]
    attributes: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    #: new weights [out, in] of layers, in their shape *after* the removal (a weight update)
    weights: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    #: new output biases [out] of layers after the removal; a layer without one gains one
    biases: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class ScaleChannels:
    """Divide ``source``'s outputs by ``scales`` [d] and multiply the input columns of
    ``targets`` by them (the block computes the same function)."""

    source: str
    targets: tuple[str, ...]
    scales: torch.Tensor


@dataclasses.dataclass(frozen=True)
class DropSubBlocks:
    """Replace these sub-blocks (names relative to the block) by :class:`DroppedModule`."""

    names: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class SetWeights:
    """New weights [out, in] of layers (names relative to the block), in their current shapes."""

    weights: dict[str, torch.Tensor]


BlockChange = PruneChannels | ScaleChannels | DropSubBlocks | SetWeights
BLOCK_CHANGES = (PruneChannels, ScaleChannels, DropSubBlocks, SetWeights)
BlockContext.change_types = BLOCK_CHANGES


def _sub_kind(module: nn.Module, name: str) -> str:
    cls = type(module).__name__.lower()
    return "attention" if "attn" in name.lower() or "attention" in cls else "mlp"


def _replace(parent: nn.Module, rel: str, new: nn.Module) -> None:
    owner_name, _, child = rel.rpartition(".")
    owner = parent.get_submodule(owner_name) if owner_name else parent
    setattr(owner, child, new)


@torch.no_grad()
def _sliced_linear(module: nn.Module, rows: torch.Tensor | None, cols: torch.Tensor | None) -> nn.Linear:
    """A new ``nn.Linear`` holding the kept ``rows`` (outputs) and ``cols`` (inputs) of ``module``."""
    w = get_weight(module)  # [out, in]
    if rows is not None:
        w = w.index_select(0, rows.to(w.device))
    if cols is not None:
        w = w.index_select(1, cols.to(w.device))
    bias = getattr(module, "bias", None)
    new = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device=w.device, dtype=w.dtype)
    new.weight.copy_(w)
    if bias is not None:
        new.bias.copy_(bias if rows is None else bias.index_select(0, rows.to(bias.device)))
    return new


def _removed(n: int, keep: torch.Tensor) -> torch.Tensor:
    mask = torch.ones(n, dtype=torch.bool)
    mask[keep.cpu()] = False
    return torch.nonzero(mask).flatten()


def _apply_prune(model: nn.Module, ctx: BlockContext, change: PruneChannels) -> dict[str, LayerResult]:
    block = ctx.module
    rows: dict[str, torch.Tensor] = {}
    cols: dict[str, torch.Tensor] = {}
    for g in change.groups:
        keep = torch.sort(g.keep.to(torch.int64).cpu().unique()).values
        for rel, where in [(p, rows) for p in g.producers] + [(c, cols) for c in g.consumers]:
            if rel in where:
                raise ModelError(f"{ctx.name}.{rel}: two channel groups change the same dimension")
            mod = block.get_submodule(rel)
            size = in_out_features(mod)[1 if where is rows else 0]
            if keep.numel() == 0 or int(keep.max()) >= size:
                raise ModelError(
                    f"{ctx.name}.{rel}: kept channel indices must be in [0, {size}) and not empty"
                )
            where[rel] = keep
    results: dict[str, LayerResult] = {}
    for rel in dict.fromkeys([*rows, *cols]):
        mod = block.get_submodule(rel)
        out_f, in_f = get_weight(mod).shape
        r, c = rows.get(rel), cols.get(rel)
        _replace(block, rel, _sliced_linear(mod, r, c))
        results[f"{ctx.name}.{rel}"] = LayerResult(
            removed_rows=None if r is None else _removed(out_f, r),
            removed_cols=None if c is None else _removed(in_f, c),
        )
    _update_params(ctx, change.weights, change.biases)
    for rel, attrs in change.attributes.items():
        sub = block.get_submodule(rel)
        for k, v in attrs.items():
            setattr(sub, k, v)
    return results


@torch.no_grad()
def _update_params(
    ctx: BlockContext, weights: dict[str, torch.Tensor], biases: dict[str, torch.Tensor]
) -> None:
    """Write ``weights`` and ``biases`` into the (already resized) layers."""
    block = ctx.module
    for rel, w in weights.items():
        cur = get_weight(block.get_submodule(rel))
        if tuple(w.shape) != tuple(cur.shape):
            raise ModelError(f"{ctx.name}.{rel}: new weight {tuple(w.shape)} != layer {tuple(cur.shape)}")
        cur.copy_(w.to(cur))
    for rel, b in biases.items():
        mod = block.get_submodule(rel)
        w = get_weight(mod)
        if b.shape != (w.shape[0],):
            raise ModelError(f"{ctx.name}.{rel}: new bias {tuple(b.shape)} != ({w.shape[0]},)")
        if not isinstance(getattr(mod, "bias", None), torch.Tensor):
            new = nn.Linear(w.shape[1], w.shape[0], bias=True, device=w.device, dtype=w.dtype)
            new.weight.copy_(w)
            _replace(block, rel, new)
            mod = new
        bias = mod.get_parameter("bias")
        bias.copy_(b.to(bias))


@torch.no_grad()
def _apply_scale(ctx: BlockContext, change: ScaleChannels) -> None:
    block = ctx.module
    src = block.get_submodule(change.source)
    s = change.scales.float()
    if torch.any(s <= 0) or not torch.isfinite(s).all():
        raise ModelError(f"{ctx.name}.{change.source}: scales must be finite and positive")
    if isinstance(src, nn.Linear) or hasattr(src, "nf"):
        w = get_weight(src)  # [out, in]: divide output rows
        w.copy_(w / s.to(w.device).unsqueeze(1))
    else:
        nw = getattr(src, "weight", None)
        if not isinstance(nw, torch.Tensor) or nw.dim() != 1:
            raise ModelError(f"{ctx.name}.{change.source} is neither a linear layer nor a norm with a weight")
        off = norm_weight_offset(src)  # Gemma's RMSNorm scales by (1 + weight)
        nw.copy_(((off + nw.double()) / s.to(nw.device).double() - off).to(nw.dtype))
    bias = getattr(src, "bias", None)
    if isinstance(bias, torch.Tensor):
        bias.copy_(bias / s.to(bias.device))
    for rel in change.targets:
        tw = get_weight(block.get_submodule(rel))  # [out, in]: multiply input columns
        if tw.shape[1] != s.numel():
            raise ModelError(f"{ctx.name}.{rel} has {tw.shape[1]} inputs, the scales {s.numel()}")
        tw.copy_(tw * s.to(tw.device).unsqueeze(0))


def apply_block_change(model: nn.Module, ctx: BlockContext, change: BlockChange) -> dict[str, LayerResult]:
    """Apply ``change`` to the block of ``ctx`` (in ``model``); returns the per-layer results
    (removed rows and columns, by qualified name) for the caller to record."""
    results: dict[str, LayerResult] = {}
    if isinstance(change, PruneChannels):
        results = _apply_prune(model, ctx, change)
    elif isinstance(change, ScaleChannels):
        _apply_scale(ctx, change)
    elif isinstance(change, SetWeights):
        _update_params(ctx, change.weights, {})
    else:
        for rel in change.names:
            sub = ctx.module.get_submodule(rel)
            _replace(ctx.module, rel, DroppedModule(_sub_kind(sub, rel)))
    return results
