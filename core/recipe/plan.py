"""The typed plan a recipe resolves into, once: the stages in order, each with its config,
its allocation, its hooks and its kind.

``compress`` takes a recipe (file, dict, :class:`~llmpress.recipe.recipes.Recipe`) or an
already-built :class:`Plan` (the command line builds one before loading the model, so a bad
recipe fails first, and hands it on: the recipe is read and resolved once per run).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from llmpress.plugin_manager import Llmpress, get_plugin_manager
from llmpress.recipe.config import MethodConfig
from llmpress.recipe.recipes import Recipe, ResolvedStage, as_recipe


@dataclasses.dataclass(frozen=True)
class Plan:
    """A resolved recipe: what the runner executes."""

    recipe: Recipe
    stages: tuple[ResolvedStage, ...]

    @property
    def kv_cache(self) -> str | None:
        return self.recipe.kv_cache

    @property
    def moe_min_tokens(self) -> int | None:
        return self.recipe.moe_min_tokens

    def needs_calibration(self) -> bool:
        """Whether any stage (or the KV cache) needs calibration data."""
        return (
            any(s.config.calibrated() or s.allocation is not None for s in self.stages)
            or self.kv_cache is not None
        )

    def needing_calibration(self) -> str:
        """What asks for calibration data, for an error message."""
        if any(s.allocation is not None for s in self.stages):
            return "an allocation search (its fitness compares the candidate with the dense model)"
        methods = [s.config.method for s in self.stages if s.config.calibrated()]
        parts = [f"methods {methods}"] if methods else []
        return " and ".join(parts + (["kv_cache: fp8"] if self.kv_cache is not None else []))

    def to_dict(self) -> dict[str, Any]:
        return self.recipe.to_dict()


def make_plan(
    recipe: Plan | Recipe | dict[str, Any] | list[Any] | str | Path | MethodConfig, pm: Llmpress | None = None
) -> Plan:
    """Resolve ``recipe`` (every method known, every option valid) into a :class:`Plan`."""
    if isinstance(recipe, Plan):
        return recipe
    rec = as_recipe(recipe)
    return Plan(rec, tuple(rec.resolve(pm or get_plugin_manager())))
