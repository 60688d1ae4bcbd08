"""The quantization record a method hands to the export stage."""

from __future__ import annotations

from typing import Any

import torch


def quant_state(
    codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, config: Any
) -> dict[str, Any]:
    """codes uint8 [out, in], scales/zeros float32 [out, n_groups] (zeros integer-valued),
    plus the grid's settings from a :class:`llmpress.config.QuantConfig`."""
    return {
        "codes": codes,
        "scales": scales,
        "zeros": zeros,
        "bits": int(config.bits),
        "group_size": int(config.group_size),
        "symmetric": bool(config.symmetric),
        "method": config.method,
    }
