"""Per-layer results: what a method computes for one layer, held apart from the model.

A weight-update hook returns a :class:`LayerResult` without touching the model. The engine
*commits* it (:func:`commit`): the new weight is written, and the result is recorded in the
model's :class:`CompressionState` so that savers read masks and quantization state from here,
never from zero patterns. Results that are not committed (variants kept for an allocation
search) leave the model unchanged.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from llmpress.model.modules import get_weight, set_weight
from llmpress.quant.spqr import SpqrExtra

if TYPE_CHECKING:
    from llmpress.recipe.config import QuantConfig


@dataclasses.dataclass(frozen=True)
class QuantState:
    """A layer's quantization grid and codes.

    ``codes``: uint8 [out, in]; ``scales``/``zeros``: float32 [out, n_groups] (zeros are
    integers in ``[0, 2**bits - 1]``); a weight decodes as ``scale * (code - zero)``.
    ``kind="fp8"``: ``codes`` hold E4M3 bit patterns and a weight decodes as
    ``scale * fp8(code)`` (``zeros`` unused). ``activations``: the layer's activation scheme
    (:data:`llmpress.quant.activations.SCHEMES`) when its inputs are quantized too, with the
    calibrated per-tensor ``input_scale`` [1] of a static scheme.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    bits: int
    group_size: int
    symmetric: bool
    method: str = ""
    kind: str = "int"
    activations: str | None = None
    input_scale: torch.Tensor | None = None
    #: ``kind="spqr"``: the quantized statistics and sparse outliers
    #: (:class:`llmpress.quant.spqr.SpqrExtra`); ``scales``/``zeros`` are then the decoded ones
    spqr: SpqrExtra | None = None

    @classmethod
    def of(
        cls, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, config: QuantConfig
    ) -> QuantState:
        """From codes/scales/zeros and a :class:`llmpress.recipe.config.QuantConfig`'s grid."""
        return cls(
            codes=codes,
            scales=scales,
            zeros=zeros,
            bits=int(config.bits),
            group_size=int(config.group_size),
            symmetric=bool(config.symmetric),
            method=config.method,
            activations=config.activation_scheme(),
        )

    def dequantize(self) -> torch.Tensor:
        """The float32 weight [out, in] these codes stand for."""
        if self.kind == "fp8":
            from llmpress.quant.activations import FP8_DTYPE

            return self.codes.view(FP8_DTYPE).float() * self.scales.float()
        if self.spqr is not None:
            return self.spqr.dequantize(self.codes, self.scales, self.zeros)
        from llmpress.quant.grid import dequantize_weight

        return dequantize_weight(self.codes, self.scales, self.zeros, self.group_size)

    def to(self, device: torch.device | str) -> QuantState:
        return dataclasses.replace(
            self,
            codes=self.codes.to(device),
            scales=self.scales.to(device),
            zeros=self.zeros.to(device),
            input_scale=None if self.input_scale is None else self.input_scale.to(device),
            spqr=None if self.spqr is None else self.spqr.to(device),
        )


@dataclasses.dataclass
class LayerResult:
    """What a method computed for one layer.

    ``weight``: the new [out, in] weight (dequantized for quantization), or ``None`` when
    the method keeps the weight (a pure mask is then applied by the engine). ``mask``: the
    boolean keep mask [out, in] when the method pruned. ``quant``: the quantization state.
    ``loss``: the layer's reconstruction loss as the reference OBS code reports it
    (``sum((w - q)^2 / U_jj^2) / 2``), ``None`` when the method computes none.
    ``removed_rows``/``removed_cols``: output rows / input columns removed by a structured
    change (int64 indices), which shrink the layer when committed. ``info``: extra numbers
    for the report.
    """

    weight: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    quant: QuantState | None = None
    loss: float | None = None
    removed_rows: torch.Tensor | None = None
    removed_cols: torch.Tensor | None = None
    info: dict[str, float] = dataclasses.field(default_factory=dict)
    #: a low-rank compensation path ``(A [r, in], B [out, r])``: the layer computes
    #: ``W x + B (A x)`` (EoRA); saved beside the weight (:mod:`llmpress.format.lowrank`)
    lowrank: tuple[torch.Tensor, torch.Tensor] | None = None

    def to(self, device: torch.device | str) -> LayerResult:
        """A copy with every tensor on ``device`` (e.g. CPU for a level database)."""

        def mv(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return dataclasses.replace(
            self,
            weight=mv(self.weight),
            mask=mv(self.mask),
            quant=None if self.quant is None else self.quant.to(device),
            removed_rows=mv(self.removed_rows),
            removed_cols=mv(self.removed_cols),
            info=dict(self.info),
            lowrank=None
            if self.lowrank is None
            else (self.lowrank[0].to(device), self.lowrank[1].to(device)),
        )


@dataclasses.dataclass
class CompressionState:
    """Committed results of a model, by qualified layer name (tensors on CPU)."""

    layers: dict[str, LayerResult] = dataclasses.field(default_factory=dict)
    #: ``{"dtype": "float8_e4m3fn", "scales": {attention module: (k_scale, v_scale)}}``
    kv_cache: dict[str, Any] | None = None
    #: online transforms applied at run time (``quantization_config.transforms`` entries,
    #: :class:`llmpress.format.transforms.OnlineTransform` dicts), e.g. QuaRot's R4
    transforms: list[dict[str, Any]] | None = None

    def keep_mask(self, name: str) -> torch.Tensor | None:
        r = self.layers.get(name)
        return None if r is None else r.mask

    @property
    def quantized(self) -> dict[str, QuantState]:
        return {n: r.quant for n, r in self.layers.items() if r.quant is not None}


def merge_results(old: LayerResult | None, new: LayerResult) -> LayerResult:
    """The record of a layer after ``new`` follows ``old`` (masks intersect; the latest
    quantization state and weight win; losses of successive stages add up)."""
    if old is None:
        return new
    mask = new.mask if old.mask is None else old.mask if new.mask is None else old.mask & new.mask
    loss = new.loss if old.loss is None else old.loss + (new.loss or 0.0)
    return LayerResult(
        weight=new.weight,
        mask=mask,
        quant=new.quant if new.quant is not None else old.quant,
        loss=loss,
        removed_rows=old.removed_rows if new.removed_rows is None else new.removed_rows,
        removed_cols=old.removed_cols if new.removed_cols is None else new.removed_cols,
        info={**old.info, **new.info},
        lowrank=new.lowrank if new.lowrank is not None else old.lowrank,
    )


@torch.no_grad()
def commit(state: CompressionState, name: str, module: nn.Module, result: LayerResult) -> LayerResult:
    """Write ``result`` into ``module`` (qualified ``name``) and record it in ``state``.

    The accumulated keep mask is applied to the written weight, so weights pruned by an
    earlier stage stay exactly zero. Returns the merged record.
    """
    # the record keeps what the weight cannot say; the model holds the weight (no CPU copy of it)
    merged = merge_results(state.layers.get(name), dataclasses.replace(result, weight=None).to("cpu"))
    w = result.weight if result.weight is not None else get_weight(module)
    if merged.mask is not None:
        w = w * merged.mask.to(w.device)
    set_weight(module, w)
    state.layers[name] = merged
    return merged
