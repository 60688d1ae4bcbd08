"""The typed plan a recipe resolves into, once: the stages in order, each with its config,
its allocation, its hooks and its kind.

``compress`` takes a recipe (file, dict, :class:`~llmpress.recipe.recipes.Recipe`) or an
already-built :class:`Plan` (the command line builds one before loading the model, so a bad
recipe fails first, and hands it on: the recipe is read and resolved once per run).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from llmpress.plugin_manager import Llmpress, get_plugin_manager
from llmpress.recipe.config import MethodConfig, QuantConfig
from llmpress.recipe.recipes import Recipe, ResolvedStage, as_recipe

log = logging.getLogger(__name__)

#: the warning of a W4A4 stage (or a 4-bit KV cache) with no rotation before it
W4A4_WARNING = (
    "%s: 4-bit activations with no rotation stage before them: activation outliers: expect perplexity to "
    "collapse without rotate (add a {method: rotate} stage first, or use activations: int8)"
)


@dataclasses.dataclass(frozen=True)
class Plan:
    """A resolved recipe: what the runner executes."""

    recipe: Recipe
    stages: tuple[ResolvedStage, ...]

    @property
    def kv_cache(self) -> str | None:
        return self.recipe.kv_cache

    @property
    def kv_group_size(self) -> int | None:
        return self.recipe.kv_group_size

    @property
    def moe_min_tokens(self) -> int | None:
        return self.recipe.moe_min_tokens

    def needs_calibration(self) -> bool:
        """Whether any stage (or the KV cache) needs calibration data."""
        return (
            any(s.config.calibrated() or s.allocation is not None for s in self.stages)
            or self.kv_cache == "fp8"
        )

    def needing_calibration(self) -> str:
        """What asks for calibration data, for an error message."""
        if any(s.allocation is not None for s in self.stages):
            return "an allocation search (its fitness compares the candidate with the dense model)"
        methods = [s.config.method for s in self.stages if s.config.calibrated()]
        parts = [f"methods {methods}"] if methods else []
        return " and ".join(parts + (["kv_cache: fp8"] if self.kv_cache == "fp8" else []))

    def to_dict(self) -> dict[str, Any]:
        return self.recipe.to_dict()


def make_plan(
    recipe: Plan | Recipe | dict[str, Any] | list[Any] | str | Path | MethodConfig, pm: Llmpress | None = None
) -> Plan:
    """Resolve ``recipe`` (every method known, every option valid) into a :class:`Plan`."""
    if isinstance(recipe, Plan):
        return recipe
    rec = as_recipe(recipe)
    plan = Plan(rec, tuple(rec.resolve(pm or get_plugin_manager())))
    warn_unrotated_4bit(plan)
    return plan


def unrotated_4bit(plan: Plan) -> list[str]:
    """What quantizes activations to 4 bits with no rotation stage (``rotates``) before it: the
    W4A4 stages' names, and ``kv_cache: int4`` unless some stage rotates."""
    out: list[str] = []
    rotated = False
    for st in plan.stages:
        rotated = rotated or type(st.config).rotates
        scheme = st.config.activation_scheme() if isinstance(st.config, QuantConfig) else None
        if scheme is not None and scheme.startswith("int4") and not rotated:
            out.append(st.name)
    if plan.kv_cache == "int4" and not any(type(st.config).rotates for st in plan.stages):
        out.append("kv_cache: int4")
    return out


def warn_unrotated_4bit(plan: Plan) -> None:
    """One ``logging.warning`` when 4-bit activations come without a rotation before them."""
    where = unrotated_4bit(plan)
    if where:
        log.warning(W4A4_WARNING, " and ".join(where))
