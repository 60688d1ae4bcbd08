"""Default mask selection and mask application, for every method (``trylast``).

A general plugin (it registers no method), so it is called for every method after the
method's own plugin. Methods that only score weights (magnitude, Wanda) rely on it to pick
the mask (lowest scores pruned, per row or per layer, or ``N:M``) and to carry the mask as
the layer's result; the engine zeroes the pruned weights when it commits the result.
"""

from __future__ import annotations

import torch
from torch import nn

from llmpress import hookimpl
from llmpress.engine.stats import LayerStats
from llmpress.math.masks import select_mask
from llmpress.math.targets import SparsityTarget
from llmpress.model.results import LayerResult
from llmpress.recipe.config import MethodConfig


@hookimpl(trylast=True)
def llmpress_select_mask(scores: torch.Tensor, target: SparsityTarget, config: MethodConfig) -> torch.Tensor:
    if scores.dim() != 2:
        raise ValueError(
            f"method {config.method!r}: the default mask selection takes per-weight scores [out, in], "
            f"got shape {tuple(scores.shape)}; structured methods use llmpress_change_block"
        )
    return select_mask(scores, target)


@hookimpl(trylast=True)
def llmpress_update_weights(
    module: nn.Module, mask: torch.Tensor | None, stats: LayerStats | None, config: MethodConfig
) -> LayerResult | None:
    return None if mask is None else LayerResult(mask=mask)
