"""``explicit`` allocation: the levels a search chose earlier, written back into the recipe.

``allocation: {method: explicit, levels: {model.layers.0.mlp.up_proj: 0.65, ...}}`` (sparsity,
bits, or 1 = dropped for ``drop_blocks``). The core builds only these levels, so the result is
reproduced with no search.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from llmpress import hookimpl
from llmpress.allocation.problem import AllocationProblem, AllocationResult
from llmpress.recipe.allocation import AllocationConfig


@dataclasses.dataclass(frozen=True)
class ExplicitConfig(AllocationConfig):
    """``levels``: qualified unit name -> its level value."""

    method: ClassVar[str] = "explicit"
    #: the level-database framework this baseline / written-back choice belongs to
    citation: ClassVar[str] = """@article{sieberling2024evopress,
      title   = {{EvoPress}: Towards Optimal Dynamic Model Compression via Evolutionary Search},
      author  = {Sieberling, Oliver and Kuznedelev, Denis and Kurtic, Eldar and Alistarh, Dan},
      journal = {arXiv preprint arXiv:2410.14649},
      year    = {2024}
    }"""
    levels: dict[str, float] = dataclasses.field(default_factory=dict)

    def fixed_levels(self) -> dict[str, float] | None:
        return dict(self.levels)


@hookimpl
def llmpress_register_methods(register) -> None:  # noqa: ANN001
    register(ExplicitConfig)


@hookimpl
def llmpress_search_allocation(problem: AllocationProblem, config: ExplicitConfig) -> AllocationResult:
    return AllocationResult(levels=list(problem.start))  # the core kept one level per unit
