"""One layer's result: score -> mask -> update, without touching the model.

Used by the per-layer stage (then committed) and by the level database (kept apart, one
result per level): the same hooks in the same order, so a level equals what a stage at that
level would commit.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch
from torch import nn

from llmpress.errors import ModelError
from llmpress.model.modules import get_weight, in_out_features
from llmpress.model.results import LayerResult
from llmpress.quant.activations import is_static, static_scale

if TYPE_CHECKING:
    from llmpress.engine.stats import LayerStats
    from llmpress.method_hooks import MethodHooks
    from llmpress.recipe.config import MethodConfig


def solve_layer(
    hooks: MethodHooks,
    name: str,
    module: nn.Module,
    stats: LayerStats | None,
    config: MethodConfig,
    prev_mask: torch.Tensor | None = None,
    where: str = "",
) -> LayerResult:
    """The layer's result under ``config`` (score, mask, update, then the mask refinement when
    ``config.refines_mask()``). ``prev_mask``: earlier stages' keep mask (weights
    they pruned must stay zero) when this method selects no mask of its own. ``where`` names
    the stage in errors."""
    where = where or name
    # the shapes were checked before any work; an earlier structured stage may have resized the layer
    config.check_module(name, *in_out_features(module))
    scores = hooks.score(module, stats, config)
    mask = None
    if scores is not None:
        target = config.sparsity_target()
        if target is None:
            raise ModelError(
                f"{where}: {type(config).__name__} returned scores but declares no sparsity_target()"
            )
        mask = hooks.select_mask(scores, target, config)
    elif prev_mask is not None:
        mask = prev_mask.to(get_weight(module).device)
    res = hooks.update(module, mask, stats, config)
    if res is None:
        raise ModelError(f"{where}: no plugin computed a result for {name} (method {config.method!r})")
    if res.mask is None and scores is not None:
        res = dataclasses.replace(res, mask=mask)
    if config.refines_mask():
        if res.mask is None:
            raise ModelError(f"{where}: mask refinement needs a mask, but {config.method!r} chose none")
        res = hooks.refine(module, res, stats, config)
    return calibrate_inputs(res, stats, name)


def calibrate_inputs(res: LayerResult, stats: LayerStats | None, name: str) -> LayerResult:
    """Give a static activation scheme its per-tensor input scale (from the inputs' max |x|)."""
    q = res.quant
    if q is None or not is_static(q.activations) or q.input_scale is not None:
        return res
    assert q.activations is not None
    if stats is None or "absmax" not in stats.acc:
        raise ModelError(f"{name}: activations {q.activations!r} need the calibration inputs' max |x|")
    q = dataclasses.replace(q, input_scale=static_scale(stats.absmax, q.activations))
    return dataclasses.replace(res, quant=q)
