"""Default mask selection and mask application, for every method (``trylast``).

Methods that only score weights (magnitude, Wanda) rely on this plugin to pick the mask
(lowest scores pruned, per row or per layer, or ``N:M``) and to zero the pruned weights.
"""

from __future__ import annotations

import torch
from torch import nn

from llmpress import hookimpl
from llmpress.config import MethodConfig
from llmpress.masks import select_mask
from llmpress.modules import get_weight
from llmpress.stats import LayerStats
from llmpress.targets import SparsityTarget


@hookimpl(trylast=True)
def llmpress_select_mask(scores: torch.Tensor, target: SparsityTarget, config: MethodConfig) -> torch.Tensor:
    if scores.dim() != 2:
        raise ValueError(
            f"method {config.method!r}: the default mask selection takes per-weight scores [out, in], "
            f"got shape {tuple(scores.shape)}; structured methods must implement llmpress_select_mask"
        )
    return select_mask(scores, target)


@hookimpl(trylast=True)
def llmpress_update_weights(
    module: nn.Module, mask: torch.Tensor | None, stats: LayerStats | None, config: MethodConfig
) -> torch.Tensor | None:
    if mask is None:
        return None
    w = get_weight(module)
    return w * mask.to(device=w.device)
