"""What a weight-update hook returns."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch


@dataclasses.dataclass
class UpdateResult:
    """New weights plus what the export stage needs to pack them.

    ``weight``: [out, in] new (dequantized) weights. ``mask``: keep mask [out, in] if the
    method pruned. ``quant``: quantization state (codes, scales, zeros, group index, spec)
    for packing. ``info``: free-form numbers for the report (errors, timings).
    """

    weight: torch.Tensor
    mask: torch.Tensor | None = None
    quant: dict[str, Any] | None = None
    info: dict[str, float] = dataclasses.field(default_factory=dict)
