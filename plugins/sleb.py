"""SLEB (Song et al., 2024): remove blocks greedily, one at a time, each time the block whose
removal hurts the fitness least given the blocks already removed (re-scored every step)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal

from tqdm.auto import tqdm

from llmpress import hookimpl
from llmpress.allocation.problem import AllocationProblem, AllocationResult
from llmpress.recipe.allocation import AllocationConfig
from llmpress.recipe.config import LevelKind, NonNegativeInt


@dataclasses.dataclass(frozen=True)
class SLEBConfig(AllocationConfig):
    """``metric``: ``ppl`` (the paper's calibration perplexity) or ``kl``; ``tokens``: tokens
    per score (0: all fitness tokens)."""

    method: ClassVar[str] = "sleb"
    display_name: ClassVar[str] = "SLEB"
    handles: ClassVar[frozenset[LevelKind]] = frozenset({LevelKind.BLOCKS})
    citation: ClassVar[str] = """@inproceedings{song2024sleb,
      title     = {{SLEB}: Streamlining {LLMs} through Redundancy Verification and Elimination of Transformer Blocks},
      author    = {Song, Jiwon and Oh, Kyungseok and Kim, Taesu and Kim, Hyungjun and Kim, Yulhwa and Kim, Jae-Joon},
      booktitle = {International Conference on Machine Learning},
      year      = {2024}
    }"""
    metric: Literal["kl", "ppl"] = "ppl"
    tokens: NonNegativeInt = 0


@hookimpl
def llmpress_register_methods(register) -> None:  # noqa: ANN001
    register(SLEBConfig)


@hookimpl
def llmpress_search_allocation(problem: AllocationProblem, config: SLEBConfig) -> AllocationResult:
    tokens = config.tokens or problem.max_tokens
    levels = [0] * len(problem.units)
    history: list[float] = []
    evals = 0
    for _ in tqdm(range(problem.budget), desc="sleb", disable=not problem.progress):
        free = [i for i in range(len(levels)) if not levels[i]]
        trials = [[1 if j == i else lv for j, lv in enumerate(levels)] for i in free]
        fits = problem.evaluate(trials, tokens)  # in parallel across ranks under torchrun
        evals += len(trials)
        f, i = min(zip(fits, free))
        levels[i] = 1
        history.append(f)
    return AllocationResult(levels=levels, fitness=history[-1], history=history, evaluations=evals)
