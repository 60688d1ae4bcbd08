"""What structured changes did to the blocks: parameters and widths before and after."""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from llmpress.model.structures import block_widths

log = logging.getLogger(__name__)


def structure_summary(
    params_before: int, widths_before: list[dict[str, int]] | None, model: nn.Module, blocks: nn.ModuleList
) -> dict[str, Any]:
    """The blocks' parameters before/after and per-block widths ``[before, after]``."""
    after = sum(p.numel() for b in blocks for p in b.parameters())
    out: dict[str, Any] = {
        "params_before": params_before,
        "params_after": after,
        "removed_fraction": round(1 - after / max(params_before, 1), 6),
    }
    widths_after = block_widths(model)
    if widths_before is not None and widths_after is not None:
        out["layers"] = [{k: [b[k], a.get(k, 0)] for k in b} for b, a in zip(widths_before, widths_after)]
    log.info(
        "block parameters %d -> %d (%.2f %% removed)", params_before, after, 100 * out["removed_fraction"]
    )
    return out
