"""Allocation: the typed problem a search plugin solves and the result it returns.

A stage with an ``allocation:`` section compresses its target *units* (layers, blocks or
sub-blocks) at different *levels* (sparsity, bits, kept/dropped) under one global budget.
The core builds an :class:`AllocationProblem` from a level database
(:mod:`llmpress.allocation.levels`) and a fitness (:mod:`llmpress.allocation.fitness`); a plugin implementing
``llmpress_search_allocation`` returns an :class:`AllocationResult`, one level index per unit.

Budgets are integers (zeros pruned, weight bits, units dropped), so "met exactly" means
equality. A *budget-preserving move* raises one unit's level by one step and lowers another
unit's by one step of the same cost (:func:`moves_from`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch

from llmpress.errors import AllocationError

#: fitness(levels, tokens) -> a number to minimise (KL to the dense model, or log-perplexity)
FitnessFn = Callable[[Sequence[int], int], float]


@dataclasses.dataclass
class AllocationProblem:
    """What a search sees.

    ``kind``: ``sparsity``, ``bits`` or ``blocks``. For each unit ``i`` (``units[i]``, a
    qualified module name): ``levels[i]`` (the level values: sparsity, bits, or 0/1 = kept/
    dropped) and ``costs[i]`` (integer cost of each level, non-decreasing); ``start[i]``: the
    uniform starting level index. A solution is one level index per unit whose costs sum to
    exactly ``budget``. ``fitness(levels, tokens)``: lower is better, measured on the first
    ``tokens`` calibration tokens (``max_tokens`` at most); it stitches the candidate from the
    level database, compressing nothing. ``target``: the stage's average (sparsity, bits) or
    count (blocks). ``signals``: per-unit numbers some searches use (``block_influence``);
    ``scores(i)``: Wanda importance ``|W| * ||x||`` [out, in] of unit ``i`` (OWL).
    ``groups``: unit index -> block index (OWL's per-block ratio). :meth:`evaluate` scores many
    candidates at once, in parallel across torch.distributed ranks. ``checkpoint``: a file a
    search may use to resume; ``fingerprint``: identifies this problem (a checkpoint of another
    problem is refused).
    """

    result_type: ClassVar[type[AllocationResult]]

    kind: str
    units: list[str]
    levels: list[list[float]]
    costs: list[list[int]]
    start: list[int]
    budget: int
    target: float
    fitness: FitnessFn
    max_tokens: int
    seqlen: int
    groups: list[int] = dataclasses.field(default_factory=list)
    signals: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    scores: Callable[[int], torch.Tensor] | None = None
    checkpoint: str | None = None
    fingerprint: str = ""
    progress: bool = True

    def evaluate(self, candidates: Sequence[Sequence[int]], tokens: int) -> list[float]:
        """``fitness(c, tokens)`` of every candidate. Over several processes (torch.distributed)
        each rank scores every ``world_size``-th candidate and all ranks get every value, so a
        search that asks for its candidates together runs in parallel and identically on all."""
        from llmpress.engine import distributed

        ws, rank = distributed.world_size(), distributed.rank()
        if ws == 1:
            return [self.fitness(c, tokens) for c in candidates]
        values = torch.zeros(len(candidates), dtype=torch.float64)
        for i, c in enumerate(candidates):
            if i % ws == rank:
                values[i] = self.fitness(c, tokens)
        distributed.all_reduce_sum([values])
        return [float(v) for v in values]

    def cost(self, levels: Sequence[int]) -> int:
        """Total cost of a solution."""
        return sum(self.costs[i][lv] for i, lv in enumerate(levels))

    def values(self, levels: Sequence[int]) -> list[float]:
        """The level values a solution picks."""
        return [self.levels[i][lv] for i, lv in enumerate(levels)]

    def check(self, levels: Sequence[int], who: str = "search") -> None:
        """Raise :class:`AllocationError` unless ``levels`` is a valid solution meeting the budget."""
        if len(levels) != len(self.units):
            raise AllocationError(f"{who}: {len(levels)} levels for {len(self.units)} units")
        for i, lv in enumerate(levels):
            if not 0 <= int(lv) < len(self.levels[i]):
                raise AllocationError(f"{who}: level {lv} of {self.units[i]} is out of range")
        if self.cost(levels) != self.budget:
            raise AllocationError(f"{who}: cost {self.cost(levels)} differs from the budget {self.budget}")


@dataclasses.dataclass
class AllocationResult:
    """What a search returns: one level index per unit, and how it got there.

    ``fitness``: the chosen solution's fitness (``None`` if not measured); ``history``: best
    fitness after each generation/step (the fitness curve); ``evaluations``: fitness calls.
    """

    levels: list[int]
    fitness: float | None = None
    history: list[float] = dataclasses.field(default_factory=list)
    evaluations: int = 0
    info: dict[str, Any] = dataclasses.field(default_factory=dict)


def moves_from(problem: AllocationProblem, levels: Sequence[int], up: int) -> list[int]:
    """Units that can step *down* one level to pay for unit ``up`` stepping up one level,
    keeping the total cost exactly (same cost difference); empty when ``up`` cannot step up."""
    if levels[up] + 1 >= len(problem.levels[up]):
        return []
    delta = problem.costs[up][levels[up] + 1] - problem.costs[up][levels[up]]
    out = []
    for j, lv in enumerate(levels):
        if j != up and lv > 0 and problem.costs[j][lv] - problem.costs[j][lv - 1] == delta:
            out.append(j)
    return out


#: what ``llmpress_search_allocation`` must return for this problem (checked by the core)
AllocationProblem.result_type = AllocationResult
