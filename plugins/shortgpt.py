"""ShortGPT (Men et al., 2024): drop the blocks with the lowest block influence
``BI = 1 - cos(input, output)`` of the residual stream, in one shot."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import ClassVar

from llmpress import hookimpl
from llmpress.allocation.problem import AllocationProblem, AllocationResult
from llmpress.recipe.allocation import AllocationConfig
from llmpress.recipe.config import LevelKind


@dataclasses.dataclass(frozen=True)
class ShortGPTConfig(AllocationConfig):
    """No options: the influence is measured on the calibration tokens."""

    method: ClassVar[str] = "shortgpt"
    display_name: ClassVar[str] = "ShortGPT"
    handles: ClassVar[frozenset[LevelKind]] = frozenset({LevelKind.BLOCKS})
    citation: ClassVar[str] = """@article{men2024shortgpt,
      title   = {{ShortGPT}: Layers in Large Language Models are More Redundant Than You Expect},
      author  = {Men, Xin and Xu, Mingyu and Zhang, Qingyu and Wang, Bingning and Lin, Hongyu and Lu, Yaojie and Han, Xianpei and Chen, Weipeng},
      journal = {arXiv preprint arXiv:2403.03853},
      year    = {2024}
    }"""


def lowest_influence(influence: Sequence[float], count: int) -> list[int]:
    """Indices of the ``count`` units of lowest influence (ties: the earlier unit first)."""
    return sorted(sorted(range(len(influence)), key=lambda i: (influence[i], i))[:count])


@hookimpl
def llmpress_register_methods(register) -> None:  # noqa: ANN001
    register(ShortGPTConfig)


@hookimpl
def llmpress_search_allocation(problem: AllocationProblem, config: ShortGPTConfig) -> AllocationResult:
    drop = set(lowest_influence(problem.signals["block_influence"], problem.budget))
    levels = [1 if i in drop else 0 for i in range(len(problem.units))]
    fit = problem.fitness(levels, problem.max_tokens)
    return AllocationResult(levels=levels, fitness=fit, history=[fit], evaluations=1)
