"""Keeping the compression exactly while the weights train.

* Pruned layers (a keep mask in the run's state): the weight's gradient is masked by a hook
  and the mask is re-applied after each optimizer step, so zeros stay exactly zero.
* Quantized layers (an integer grid in the run's state) train through a straight-through
  estimator on their stored grid (:class:`GridSTE`: the forward sees
  ``scale * (clamp(round(w / scale) + zero) - zero)`` on the fixed group scales and zeros, the
  backward is the identity), or with ``train: scales`` only their scales train and the codes
  stay frozen (:class:`GridScales`). At the end :meth:`Constraints.finish` re-rounds each layer
  into the same format (bits, groups, symmetry) and writes the dequantized weight.
* Shapes never change: only values are updated.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from torch.nn.utils import parametrize

from llmpress.errors import ModelError
from llmpress.model.modules import is_linear
from llmpress.model.results import CompressionState, QuantState
from llmpress.quant.grid import quantize


class GridSTE(nn.Module):
    """Parametrization: the weight rounded onto a fixed grid, gradients passed straight through
    (the grid is broadcast per group: no per-weight copy of the scales)."""

    scale: torch.Tensor
    zero: torch.Tensor

    def __init__(self, q: QuantState, in_features: int) -> None:
        super().__init__()
        self.group = in_features if q.group_size == -1 else q.group_size
        self.register_buffer("scale", q.scales.float().unsqueeze(-1))  # [out, G, 1]
        self.register_buffer("zero", q.zeros.float().unsqueeze(-1))  # [out, G, 1]
        self.maxq = (1 << q.bits) - 1

    def codes(self, w: torch.Tensor) -> torch.Tensor:
        """The codes of ``w`` [out, in] on the grid (uint8 [out, in])."""
        grouped = w.float().reshape(w.shape[0], -1, self.group)  # [out, G, g]
        return quantize(grouped, self.scale, self.zero, self.maxq).reshape(w.shape)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        codes = self.codes(w).float().reshape(w.shape[0], -1, self.group)  # [out, G, g]
        wq = (self.scale * (codes - self.zero)).reshape(w.shape)  # [out, in] on the grid
        return w + (wq.to(w.dtype) - w).detach()


class GridScales(nn.Module):
    """Parametrization: frozen codes, trainable group scales (the weight itself is ignored)."""

    codes: torch.Tensor
    zero: torch.Tensor

    def __init__(self, q: QuantState, in_features: int) -> None:
        super().__init__()
        self.group = in_features if q.group_size == -1 else q.group_size
        self.scales = nn.Parameter(q.scales.float().clone())  # [out, G]
        self.register_buffer("codes", q.codes.clone())  # [out, in] uint8
        self.register_buffer("zero", q.zeros.float().unsqueeze(-1))  # [out, G, 1]

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        codes = self.codes.float().reshape(w.shape[0], -1, self.group)  # [out, G, g]
        return (self.scales.unsqueeze(-1) * (codes - self.zero)).reshape(w.shape).to(w.dtype)


def check_trainable(state: CompressionState) -> None:
    """Refuse, before any work, a layer whose format cannot train (FP8, W8A8)."""
    for name, r in state.layers.items():
        q = r.quant
        if q is not None and q.kind != "int":
            raise ModelError(
                f"distill: layer {name!r} is {q.kind} ({q.method}); a recovery stage cannot train "
                f"{q.kind} layers: put distill before the {q.method} stage"
            )
        if q is not None and q.activations is not None:
            raise ModelError(
                f"distill: layer {name!r} quantizes its inputs ({q.activations}, W8A8); a recovery "
                f"stage cannot train W8A8 layers: put distill before the {q.method} stage"
            )


@dataclasses.dataclass
class Constraints:
    """The masks and grids attached to a model for training (see the module docstring)."""

    model: nn.Module
    state: CompressionState
    masks: list[tuple[torch.Tensor, torch.Tensor]] = dataclasses.field(default_factory=list)
    grids: dict[str, nn.Linear] = dataclasses.field(default_factory=dict)
    hooks: list[torch.utils.hooks.RemovableHandle] = dataclasses.field(default_factory=list)
    #: the layers a pruning schedule re-masks: name -> (weight, bool keep mask)
    keeps: dict[str, tuple[torch.Tensor, torch.Tensor]] = dataclasses.field(default_factory=dict)

    @classmethod
    def attach(
        cls,
        model: nn.Module,
        state: CompressionState,
        train: str = "weights",
        scheduled: tuple[str, ...] = (),
    ) -> Constraints:
        """Masked gradients and grid parametrizations on every recorded layer of ``model``, and a
        keep mask on every ``scheduled`` layer (gradual pruning)."""
        check_trainable(state)
        c = cls(model, state)
        for name in scheduled:
            r = state.layers.get(name)
            if r is not None and r.quant is not None:
                raise ModelError(f"distill: schedule cannot prune the quantized layer {name!r}")
            sw = _module(model, name).weight
            mask = torch.ones_like(sw, dtype=torch.bool) if r is None or r.mask is None else r.mask
            c.keeps[name] = (sw, c._mask(sw, mask))
        for name, r in state.layers.items():
            mod = _module(model, name)
            w: torch.Tensor = mod.weight
            if r.quant is not None:
                grid = GridScales if train == "scales" else GridSTE
                parametrize.register_parametrization(mod, "weight", grid(r.quant.to(w.device), w.shape[1]))
                c.grids[name] = mod
                w = _latent(mod)
                w.requires_grad_(train != "scales")
            if r.mask is not None and w.requires_grad and name not in c.keeps:
                c._mask(w, r.mask)
        c.apply_masks()
        return c

    def _mask(self, w: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mask ``w``'s gradient and re-apply ``mask`` after each step; returns the keep tensor."""
        keep = mask.to(device=w.device, dtype=torch.bool)  # [out, in], 1 byte a weight
        self.masks.append((w, keep))
        self.hooks.append(w.register_hook(lambda g, k=keep: torch.where(k, g, 0.0)))
        return keep

    @torch.no_grad()
    def apply_masks(self) -> None:
        """Pruned weights back to exactly zero (after each optimizer step)."""
        for w, keep in self.masks:
            w.masked_fill_(~keep, 0.0)

    @torch.no_grad()
    def finish(self) -> list[str]:
        """Re-round each quantized layer into its format, write the weights, update the state;
        remove hooks and parametrizations. Returns the names of the re-rounded layers."""
        for h in self.hooks:
            h.remove()
        self.apply_masks()
        for name, mod in self.grids.items():
            r = self.state.layers[name]
            assert r.quant is not None
            grid = _grid(mod)
            latent = _latent(mod)
            if isinstance(grid, GridScales):
                q = dataclasses.replace(
                    r.quant, scales=grid.scales.detach().float().cpu().to(r.quant.scales.dtype)
                )
            else:
                q = dataclasses.replace(r.quant, codes=grid.codes(latent).cpu())
            parametrize.remove_parametrizations(mod, "weight", leave_parametrized=False)
            mod.weight.copy_(q.dequantize().to(mod.weight))
            self.state.layers[name] = dataclasses.replace(r, quant=q)
        return list(self.grids)


def _latent(mod: nn.Module) -> nn.Parameter:
    """The trained weight behind a parametrized layer's ``weight``."""
    latent = mod.parametrizations.weight.original  # type: ignore[union-attr]
    assert isinstance(latent, nn.Parameter)
    return latent


def _grid(mod: nn.Module) -> GridSTE | GridScales:
    grid = mod.parametrizations.weight[0]  # type: ignore[index,union-attr]
    assert isinstance(grid, (GridSTE, GridScales))
    return grid


def _module(model: nn.Module, name: str) -> nn.Linear:
    try:
        mod: nn.Module | None = model.get_submodule(name)
    except AttributeError:
        mod = None
    if not isinstance(mod, nn.Linear) or not is_linear(mod):
        raise ModelError(
            f"distill: compressed layer {name!r} is not a plain linear layer of the model "
            f"(fused experts?); a recovery stage cannot train it yet"
        )
    return mod


def set_trainable(model: nn.Module) -> None:
    """Every parameter trains but the embeddings and the output head."""
    frozen: set[int] = set()
    for m in (model.get_input_embeddings(), model.get_output_embeddings()):  # type: ignore[operator]
        if m is not None:
            frozen.update(id(p) for p in m.parameters())
    for p in model.parameters():
        p.requires_grad_(id(p) not in frozen)
