"""FP8 W8A8 (``method: fp8``): E4M3 weights with per-output-channel (or per-tensor) scales,
inputs quantized to E4M3 per token at run time (``activations: dynamic``, no calibration) or
with one calibrated scale per layer (``activations: static``)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal

import torch
from torch import nn

from llmpress import hookimpl
from llmpress.engine.stats import LayerStats
from llmpress.model.modules import get_weight
from llmpress.model.results import LayerResult, QuantState
from llmpress.quant.activations import fp8_weight
from llmpress.recipe.config import MethodConfig


@dataclasses.dataclass(frozen=True)
class FP8Config(MethodConfig):
    """``activations``: ``dynamic`` (per token) or ``static`` (per tensor, calibrated);
    ``weights``: ``channel`` (one scale per output row) or ``tensor``."""

    method: ClassVar[str] = "fp8"
    display_name: ClassVar[str] = "FP8"
    quantizes: ClassVar[bool] = True
    needs_calibration: ClassVar[bool] = False
    stats: ClassVar[frozenset[str]] = frozenset()
    citation: ClassVar[str] = """@article{micikevicius2022fp8,
      title   = {{FP8} Formats for Deep Learning},
      author  = {Micikevicius, Paulius and Stosic, Dusan and Burgess, Neil and others},
      journal = {arXiv preprint arXiv:2209.05433},
      year    = {2022}
    }"""

    activations: Literal["dynamic", "static"] = "dynamic"
    weights: Literal["channel", "tensor"] = "channel"

    def statistics(self) -> frozenset[str]:
        return frozenset({"absmax"}) if self.activations == "static" else frozenset()

    def calibrated(self) -> bool:
        return self.activations == "static"

    def describe(self) -> str:
        scales = "one scale per tensor" if self.weights == "tensor" else "one scale per output channel"
        how = (
            "with one calibrated scale per layer (static)"
            if self.activations == "static"
            else "per token at run time (dynamic)"
        )
        return f"FP8 (E4M3) weights with {scales}; activations quantized to FP8 {how}"


def fp8_quantize(weight: torch.Tensor, config: FP8Config) -> tuple[torch.Tensor, QuantState]:
    """weight [out, in] -> (dequantized weight float32, FP8 quantization state)."""
    w8, scale = fp8_weight(weight, per_channel=config.weights == "channel")
    state = QuantState(
        codes=w8.view(torch.uint8),
        scales=scale,
        zeros=torch.zeros_like(scale),
        bits=8,
        group_size=-1,
        symmetric=True,
        method="fp8",
        kind="fp8",
        activations=f"fp8-{config.activations}",
    )
    return state.dequantize(), state


@hookimpl
def llmpress_register_methods(register) -> None:  # noqa: ANN001
    register(FP8Config)


@hookimpl
def llmpress_update_weights(
    module: nn.Module, mask: torch.Tensor | None, stats: LayerStats | None, config: FP8Config
) -> LayerResult:
    w = get_weight(module).detach()
    if mask is not None:
        w = w * mask.to(w.device)
    new, state = fp8_quantize(w, config)
    return LayerResult(weight=new.to(w.dtype), mask=mask, quant=state)
