"""Level sets of an allocation (pure integer math): per unit, level values and their costs.

* sparsity: zeros counts ``base + k * step`` with ``step`` the same absolute number of weights
  for every layer, so one layer up and another down keeps the total exactly;
* bits: bit widths with cost ``bits * numel``; the uniform start mixes the two neighbouring
  widths within each group of equally sized layers when the average is fractional;
* blocks: kept (0) or dropped (1), cost 1 per dropped unit.
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from collections.abc import Sequence

from llmpress.errors import AllocationError


@dataclasses.dataclass(frozen=True)
class LevelSet:
    """Per unit: level values, integer costs, the uniform start's level index; the budget."""

    values: list[list[float]]
    costs: list[list[int]]
    start: list[int]
    budget: int

    def restrict(self, chosen: Sequence[float]) -> LevelSet:
        """Only the level of value ``chosen[i]`` for each unit (an explicit allocation)."""
        vals, costs = [], []
        for i, v in enumerate(chosen):
            j = min(range(len(self.values[i])), key=lambda k: abs(self.values[i][k] - v))
            if abs(self.values[i][j] - v) > 1e-6:
                raise AllocationError(f"unit {i}: level {v} is not in its level set {self.values[i]}")
            vals.append([self.values[i][j]])
            costs.append([self.costs[i][j]])
        return LevelSet(vals, costs, [0] * len(vals), sum(c[0] for c in costs))


def sparsity_levels(
    numels: Sequence[int], sparsity: float, step_frac: float, span: float, max_sparsity: float
) -> LevelSet:
    """Zeros counts ``round(sparsity * n) + k * step`` (``step = step_frac * mean(numels)``),
    covering ``sparsity +- span`` of each layer within ``[0, max_sparsity]``."""
    if not numels:
        raise AllocationError("no target layers to allocate over")
    if not 0 <= sparsity <= max_sparsity:
        raise AllocationError(f"sparsity {sparsity} is outside the levels' range [0, {max_sparsity}]")
    step = max(1, round(step_frac * sum(numels) / len(numels)))
    values, costs, start = [], [], []
    for n in numels:
        base = round(sparsity * n)
        lo = -math.floor(min(span * n, base) / step)
        hi = math.floor(min(span * n, max_sparsity * n - base) / step)
        zeros = [base + k * step for k in range(lo, max(hi, 0) + 1)]
        values.append([z / n for z in zeros])
        costs.append(zeros)
        start.append(-lo)
    budget = sum(c[s] for c, s in zip(costs, start))
    return LevelSet(values, costs, start, budget)


def bit_levels(numels: Sequence[int], avg_bits: float, bits: Sequence[int]) -> LevelSet:
    """Bit widths ``bits`` for every layer, average ``avg_bits`` over all weights.

    The start gives every group of equally sized layers the average: the two neighbouring
    widths, spread evenly over the group. Raises :class:`AllocationError` when the average is
    outside the widths or a group cannot hold it exactly."""
    widths = sorted(set(int(b) for b in bits))
    if not widths:
        raise AllocationError("the bit-width level list is empty")
    if not widths[0] <= avg_bits <= widths[-1]:
        raise AllocationError(
            f"average {avg_bits} bits is outside the levels {widths}: no level set meets that budget"
        )
    groups: dict[int, list[int]] = defaultdict(list)
    for i, n in enumerate(numels):
        groups[n].append(i)
    start = [0] * len(numels)
    lo = max(b for b in widths if b <= avg_bits)
    hi = min((b for b in widths if b > avg_bits), default=lo)
    for members in groups.values():
        c = len(members)
        n_hi = 0.0 if hi == lo else (avg_bits - lo) / (hi - lo) * c
        if abs(n_hi - round(n_hi)) > 1e-6:
            raise AllocationError(
                f"average {avg_bits} bits cannot start uniformly: {c} layers of equal size cannot "
                f"average it with widths {lo} and {hi}; pick an average that is a multiple of "
                f"{(hi - lo) / c:g} bits"
            )
        k = round(n_hi)
        for j, i in enumerate(members):  # spread the wider layers evenly over the group
            wide = k and math.floor((j + 1) * k / c) > math.floor(j * k / c)
            start[i] = widths.index(hi if wide else lo)
    values = [[float(b) for b in widths] for _ in numels]
    costs = [[b * n for b in widths] for n in numels]
    budget = sum(costs[i][s] for i, s in enumerate(start))
    if budget != round(avg_bits * sum(numels)):
        raise AllocationError(f"average {avg_bits} bits is not met exactly by any start")  # pragma: no cover
    return LevelSet(values, costs, start, budget)


def drop_levels(n_units: int, count: int, what: str = "blocks") -> LevelSet:
    """Kept (0) or dropped (1) per unit; ``count`` units dropped. The start drops units
    spread evenly over the depth."""
    if count >= n_units:
        raise AllocationError(
            f"cannot drop {count} {what} of a model with {n_units}: drop fewer than the model's depth"
        )
    if count < 1:
        raise AllocationError(f"the number of {what} to drop must be at least 1")
    start = [0] * n_units
    for j in range(count):
        start[min(n_units - 1, int((j + 0.5) * n_units / count))] = 1
    return LevelSet([[0.0, 1.0]] * n_units, [[0, 1]] * n_units, start, count)
