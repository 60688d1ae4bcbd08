"""Typed callers of one method's hooks (dispatch by config type).

:class:`MethodHooks` wraps pluggy's subset hook callers: the hooks of the plugin that
registered the method plus those of general plugins (plugins registering no method). Each
call checks the type of what came back and names the plugin when it is wrong.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import pluggy
import torch
from torch import nn

from llmpress.errors import ModelError
from llmpress.model.results import LayerResult

if TYPE_CHECKING:
    from llmpress.allocation.problem import AllocationProblem, AllocationResult
    from llmpress.engine.stats import LayerStats
    from llmpress.math.targets import SparsityTarget
    from llmpress.recipe.config import MethodConfig
    from llmpress.structure.blocks import BlockChange, BlockContext, BlockScore

_METHOD_HOOKS = (
    "llmpress_score_importance",
    "llmpress_select_mask",
    "llmpress_update_weights",
    "llmpress_refine_mask",
    "llmpress_change_block",
    "llmpress_score_block",
    "llmpress_search_allocation",
)


class MethodHooks:
    """The per-method hooks of one registered method, typed at the call site."""

    def __init__(self, pm: pluggy.PluginManager, method: str, plugin: str, exclude: Sequence[Any]) -> None:
        self.method = method
        self.plugin = plugin
        self._call = {h: pm.subset_hook_caller(h, list(exclude)) for h in _METHOD_HOOKS}

    def _bad(self, hook: str, expected: str, got: object) -> ModelError:
        return ModelError(
            f"plugin {self.plugin!r} ({self.method}): {hook} must return {expected}, got {type(got).__name__}"
        )

    def score(self, module: nn.Module, stats: LayerStats | None, config: MethodConfig) -> torch.Tensor | None:
        """Per-weight scores ``[out, in]``, or ``None`` (the method selects no mask by score)."""
        out = self._call["llmpress_score_importance"](module=module, stats=stats, config=config)
        if out is not None and not isinstance(out, torch.Tensor):
            raise self._bad("llmpress_score_importance", "a tensor or None", out)
        return out

    def select_mask(self, scores: torch.Tensor, target: SparsityTarget, config: MethodConfig) -> torch.Tensor:
        """A boolean keep mask shaped like ``scores``."""
        out = self._call["llmpress_select_mask"](scores=scores, target=target, config=config)
        if not isinstance(out, torch.Tensor) or out.dtype != torch.bool or out.shape != scores.shape:
            raise self._bad("llmpress_select_mask", f"a bool tensor of shape {tuple(scores.shape)}", out)
        return out

    def update(
        self, module: nn.Module, mask: torch.Tensor | None, stats: LayerStats | None, config: MethodConfig
    ) -> LayerResult | None:
        """The layer's result, or ``None`` when no plugin has one (nothing to do)."""
        out = self._call["llmpress_update_weights"](module=module, mask=mask, stats=stats, config=config)
        if out is not None and not isinstance(out, LayerResult):
            raise self._bad("llmpress_update_weights", "a LayerResult or None", out)
        return out

    def refine(
        self, module: nn.Module, result: LayerResult, stats: LayerStats | None, config: MethodConfig
    ) -> LayerResult:
        """The result with its mask refined (``llmpress_refine_mask``), or ``result`` itself."""
        out = self._call["llmpress_refine_mask"](module=module, result=result, stats=stats, config=config)
        if out is None:
            return result
        if not isinstance(out, LayerResult):
            raise self._bad("llmpress_refine_mask", "a LayerResult or None", out)
        return out

    def score_block(self, block: BlockContext, config: MethodConfig) -> BlockScore | None:
        """The method's scores of one block for a decision across blocks (or ``None``)."""
        out = self._call["llmpress_score_block"](block=block, config=config)
        if out is not None and not isinstance(out, block.score_type):
            raise self._bad("llmpress_score_block", "a BlockScore (llmpress.structure.blocks) or None", out)
        return out

    def change_block(self, block: BlockContext, config: MethodConfig) -> list[BlockChange]:
        """The changes the method makes to one block (possibly none)."""
        kinds = block.change_types
        out = self._call["llmpress_change_block"](block=block, config=config)
        if out is None:
            return []
        changes = [out] if isinstance(out, kinds) else list(out)
        for c in changes:
            if not isinstance(c, kinds):
                raise self._bad("llmpress_change_block", "a block change (llmpress.structure.blocks)", c)
        return changes

    def search(self, problem: AllocationProblem, config: MethodConfig) -> AllocationResult:
        """The allocation chosen by the method's ``llmpress_search_allocation``."""
        out = self._call["llmpress_search_allocation"](problem=problem, config=config)
        if not isinstance(out, problem.result_type):
            raise self._bad("llmpress_search_allocation", "an AllocationResult", out)
        return out
