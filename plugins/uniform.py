"""``uniform`` allocation: every unit at the stage's own level (the baseline of every search)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from llmpress import hookimpl
from llmpress.allocation import AllocationConfig, AllocationProblem, AllocationResult


@dataclasses.dataclass(frozen=True)
class UniformConfig(AllocationConfig):
    """No search: the uniform start (the stage's sparsity or bits on every layer)."""

    method: ClassVar[str] = "uniform"
    kinds: ClassVar[tuple[str, ...]] = ("sparsity", "bits")


@hookimpl
def llmpress_register_methods(register) -> None:  # noqa: ANN001
    register(UniformConfig)


@hookimpl
def llmpress_search_allocation(problem: AllocationProblem, config: UniformConfig) -> AllocationResult:
    levels = list(problem.start)
    fit = problem.fitness(levels, problem.max_tokens)
    return AllocationResult(levels=levels, fitness=fit, history=[fit], evaluations=1)
