"""Round-to-nearest (RTN) weight quantization: each group's min/max grid, no calibration."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from torch import nn

from llmpress import hookimpl
from llmpress.engine.stats import LayerStats
from llmpress.model.modules import get_weight
from llmpress.model.results import LayerResult, QuantState
from llmpress.quant.grid import quantize_weight
from llmpress.recipe.config import QuantConfig


@dataclasses.dataclass(frozen=True)
class RTNConfig(QuantConfig):
    """RTN: ``bits``, ``group_size``, ``symmetric``; needs no calibration data."""

    method: ClassVar[str] = "rtn"
    display_name: ClassVar[str] = "RTN"
    needs_calibration: ClassVar[bool] = False
    stats: ClassVar[frozenset[str]] = frozenset()
    citation: ClassVar[str] = """@article{dettmers2022llmint8,
      title   = {{LLM.int8()}: 8-bit Matrix Multiplication for Transformers at Scale},
      author  = {Dettmers, Tim and Lewis, Mike and Belkada, Younes and Zettlemoyer, Luke},
      journal = {Advances in Neural Information Processing Systems},
      year    = {2022}
    }"""


def rtn_quantize(
    weight: torch.Tensor, config: QuantConfig, keep: torch.Tensor | None = None
) -> tuple[torch.Tensor, QuantState]:
    """weight [out, in] -> (dequantized weight float32, quant state). Pruned weights (``keep``
    False) get the zero point's code, which dequantizes to exactly 0."""
    codes, scales, zeros = quantize_weight(weight.float(), config.quant_spec())
    if keep is not None:
        zero_codes = zeros.to(torch.uint8).repeat_interleave(
            weight.shape[1] if config.group_size == -1 else config.group_size, dim=1
        )
        codes = torch.where(keep, codes, zero_codes)
    state = QuantState.of(codes, scales, zeros, config)
    return state.dequantize(), state


@hookimpl
def llmpress_register_methods(register) -> None:  # noqa: ANN001
    register(RTNConfig)


@hookimpl
def llmpress_update_weights(
    module: nn.Module, mask: torch.Tensor | None, stats: LayerStats | None, config: RTNConfig
) -> LayerResult:
    w = get_weight(module).detach()
    new, state = rtn_quantize(w, config, None if mask is None else mask.to(w.device))
    return LayerResult(weight=new.to(w.dtype), mask=mask, quant=state)
