"""``uniform`` allocation: every unit at the stage's own level (the baseline of every search)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from llmpress import hookimpl
from llmpress.allocation.problem import AllocationProblem, AllocationResult
from llmpress.recipe.allocation import AllocationConfig
from llmpress.recipe.config import LevelKind


@dataclasses.dataclass(frozen=True)
class UniformConfig(AllocationConfig):
    """No search: the uniform start (the stage's sparsity or bits on every layer)."""

    method: ClassVar[str] = "uniform"
    handles: ClassVar[frozenset[LevelKind]] = frozenset({LevelKind.SPARSITY, LevelKind.BITS})
    #: the level-database framework this baseline / written-back choice belongs to
    citation: ClassVar[str] = """@article{sieberling2024evopress,
      title   = {{EvoPress}: Towards Optimal Dynamic Model Compression via Evolutionary Search},
      author  = {Sieberling, Oliver and Kuznedelev, Denis and Kurtic, Eldar and Alistarh, Dan},
      journal = {arXiv preprint arXiv:2410.14649},
      year    = {2024}
    }"""


@hookimpl
def llmpress_register_methods(register) -> None:  # noqa: ANN001
    register(UniformConfig)


@hookimpl
def llmpress_search_allocation(problem: AllocationProblem, config: UniformConfig) -> AllocationResult:
    levels = list(problem.start)
    fit = problem.fitness(levels, problem.max_tokens)
    return AllocationResult(levels=levels, fitness=fit, history=[fit], evaluations=1)
