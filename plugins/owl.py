"""OWL (Yin et al., 2024): outlier-weighed layerwise sparsity.

A block's *outlier ratio* is the fraction of its Wanda scores ``|W| * ||x||`` above ``M``
times their mean. Blocks with more outliers get less sparsity: the ratios are mapped
linearly to per-block sparsities in ``[S - lambda, S + lambda]`` averaging exactly ``S``
(centred on the mean ratio, the farthest block at ``+-lambda``; the reference code's
min-max scaling spans the same ``2 lambda`` but is not centred, so it can leave the
interval). Each layer then takes the level nearest its block's sparsity, with a
largest-remainder rounding that meets the budget exactly.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Annotated, ClassVar

import torch
from pydantic import Field

from llmpress import hookimpl
from llmpress.allocation.problem import AllocationProblem, AllocationResult
from llmpress.errors import AllocationError
from llmpress.recipe.allocation import AllocationConfig
from llmpress.recipe.config import Fraction, LevelKind


@dataclasses.dataclass(frozen=True)
class OWLConfig(AllocationConfig):
    """``M``: outlier threshold (times the mean score); ``lam``: the sparsity spread lambda."""

    method: ClassVar[str] = "owl"
    display_name: ClassVar[str] = "OWL"
    handles: ClassVar[frozenset[LevelKind]] = frozenset({LevelKind.SPARSITY})
    citation: ClassVar[str] = """@inproceedings{yin2024owl,
      title     = {Outlier Weighed Layerwise Sparsity ({OWL}): A Missing Secret Sauce for Pruning {LLMs} to High Sparsity},
      author    = {Yin, Lu and Wu, You and Zhang, Zhenyu and Hsieh, Cheng-Yu and Wang, Yaqing and Jia, Yiling and Li, Gen and Jaiswal, Ajay and Pechenizkiy, Mykola and Liang, Yi and Bendersky, Michael and Wang, Zhangyang and Liu, Shiwei},
      booktitle = {International Conference on Machine Learning},
      year      = {2024}
    }"""
    M: Annotated[float, Field(gt=0)] = 5.0
    lam: Fraction = 0.08


def outlier_ratio(scores: Sequence[torch.Tensor], M: float) -> float:
    """Fraction of all scores (of one block's layers) above ``M`` times their mean."""
    flat = torch.cat([s.flatten().float() for s in scores])
    return float((flat > M * flat.mean()).float().mean())


def owl_sparsities(ratios: Sequence[float], sparsity: float, lam: float) -> list[float]:
    """Per-block sparsity: ``S + lam * (mean(D) - D_b) / max_b |mean(D) - D_b|``."""
    mean = sum(ratios) / len(ratios)
    dev = [mean - r for r in ratios]
    scale = max((abs(d) for d in dev), default=0.0)
    if scale == 0:
        return [sparsity] * len(ratios)
    return [sparsity + lam * d / scale for d in dev]


def nearest_levels(problem: AllocationProblem, wanted: Sequence[float]) -> list[int]:
    """Level indices whose sparsity is nearest ``wanted`` per unit, meeting the budget exactly
    (largest remainder: the units farthest from their wish move first)."""
    step = next((c[1] - c[0] for c in problem.costs if len(c) > 1), 0)
    if step == 0:
        return list(problem.start)
    real, levels = [], []
    for i, s in enumerate(wanted):
        numel = max((c / v for c, v in zip(problem.costs[i], problem.levels[i]) if v > 0), default=0.0)
        k = (s * numel - problem.costs[i][0]) / step  # fractional level index
        real.append(k)
        levels.append(min(max(round(k), 0), len(problem.costs[i]) - 1))
    excess = (problem.cost(levels) - problem.budget) // step
    while excess != 0:
        sign = 1 if excess > 0 else -1
        movable = [i for i in range(len(levels)) if 0 <= levels[i] - sign < len(problem.costs[i])]
        if not movable:
            raise AllocationError("owl: no level set near the OWL sparsities meets the budget")
        i = max(movable, key=lambda j: (sign * (levels[j] - real[j]), -j))
        levels[i] -= sign
        excess -= sign
    return levels


@hookimpl
def llmpress_register_methods(register) -> None:  # noqa: ANN001
    register(OWLConfig)


@hookimpl
def llmpress_search_allocation(problem: AllocationProblem, config: OWLConfig) -> AllocationResult:
    if problem.scores is None:
        raise AllocationError("owl needs the layers' Wanda scores")
    blocks = sorted(set(problem.groups))
    ratios = []
    for b in blocks:
        ratios.append(
            outlier_ratio([problem.scores(i) for i, g in enumerate(problem.groups) if g == b], config.M)
        )
    per_block = dict(zip(blocks, owl_sparsities(ratios, problem.target, config.lam)))
    levels = nearest_levels(problem, [per_block[g] for g in problem.groups])
    fit = problem.fitness(levels, problem.max_tokens)
    info = {
        "outlier_ratio": dict(zip(map(str, blocks), ratios)),
        "block_sparsity": {str(b): s for b, s in per_block.items()},
    }
    assert not any(math.isnan(r) for r in ratios)
    return AllocationResult(levels=levels, fitness=fit, history=[fit], evaluations=1, info=info)
