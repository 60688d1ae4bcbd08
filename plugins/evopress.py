"""EvoPress (Sieberling et al., 2024): (1 + lambda) evolutionary search over per-unit levels.

From the uniform start, each generation makes ``offspring`` copies of the parent, each with a
few *level-switch* mutations (one unit up a level, another down a level of the same cost, so
the budget holds exactly). Selection is multi-step: every offspring is scored on a few
tokens, the best ``survivors[0]`` on more, and so on; the last step's best replaces the parent
only if it is at least as fit on the most tokens (elitism). Seeded; the state after every
generation is checkpointed, so an interrupted search resumes to the identical result; a
damaged checkpoint (cut short, edited) is named in a warning and the search restarts.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from tqdm.auto import tqdm

from llmpress import hookimpl
from llmpress.allocation.problem import AllocationProblem, AllocationResult, moves_from
from llmpress.engine import distributed
from llmpress.errors import AllocationError, RecipeError
from llmpress.format.output import atomic_write
from llmpress.recipe.allocation import AllocationConfig
from llmpress.recipe.config import NonNegativeInt, PositiveInt

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class EvoPressConfig(AllocationConfig):
    """``generations``; ``offspring`` (lambda); ``max_mutations`` (per offspring, drawn as the
    smaller of two uniform draws in 1..max); ``tokens``: calibration tokens of each selection
    step (increasing); ``survivors``: offspring kept after each step but the last
    (``len(tokens) - 1`` numbers); ``seed``; ``checkpoint``: a JSON file to resume from
    (default: in the database folder when there is one)."""

    method: ClassVar[str] = "evopress"
    display_name: ClassVar[str] = "EvoPress"
    citation: ClassVar[str] = """@article{sieberling2024evopress,
      title   = {{EvoPress}: Towards Optimal Dynamic Model Compression via Evolutionary Search},
      author  = {Sieberling, Oliver and Kuznedelev, Denis and Kurtic, Eldar and Alistarh, Dan},
      journal = {arXiv preprint arXiv:2410.14649},
      year    = {2024}
    }"""
    generations: NonNegativeInt = 50
    offspring: PositiveInt = 16
    max_mutations: PositiveInt = 3
    tokens: tuple[PositiveInt, ...] = (512, 2048, 8192)
    survivors: tuple[PositiveInt, ...] = (4, 2)
    seed: int = 0
    checkpoint: str | None = None

    def validate(self) -> None:
        super().validate()
        if not self.tokens:
            raise RecipeError("allocation 'evopress': tokens needs at least one number")
        if len(self.survivors) != len(self.tokens) - 1:
            raise RecipeError("allocation 'evopress': survivors needs len(tokens) - 1 numbers >= 1")

    def checkpoint_path(self) -> str | None:
        return self.checkpoint


def mutate(
    problem: AllocationProblem, levels: list[int], rng: random.Random, max_mutations: int
) -> list[int]:
    """A copy of ``levels`` after ``min(U, U')`` budget-preserving level switches."""
    child = list(levels)
    n = min(rng.randint(1, max_mutations), rng.randint(1, max_mutations))
    for _ in range(n):
        ups = [i for i in range(len(child)) if moves_from(problem, child, i)]
        if not ups:
            break
        up = rng.choice(ups)
        down = rng.choice(moves_from(problem, child, up))
        child[up] += 1
        child[down] -= 1
    return child


class _State(BaseModel):
    """A checkpoint's schema (the state after a generation)."""

    model_config = ConfigDict(extra="forbid")

    key: str
    generation: int = Field(ge=1)
    parent: list[int]
    fitness: float
    history: list[float]
    evaluations: int = Field(ge=1)
    rng: tuple[int, list[int], float | None]


def _invalid(state: Any, problem: AllocationProblem) -> str | None:
    """What is wrong with a checkpoint's content of this search (``None``: nothing)."""
    try:
        st = _State.model_validate(state)
        if len(st.history) != st.generation:
            return f"{len(st.history)} history entries for generation {st.generation}"
        problem.check(st.parent, "its parent")
        random.Random().setstate((st.rng[0], tuple(st.rng[1]), st.rng[2]))
    except ValidationError as e:
        return "; ".join(
            f"{'.'.join(map(str, err['loc'])) or 'state'}: {err['msg']}" for err in e.errors()[:3]
        )
    except (AllocationError, ValueError, TypeError) as e:
        return str(e) or type(e).__name__
    return None


def _load(path: Path, key: str, problem: AllocationProblem) -> dict[str, Any] | None:
    """The checkpoint's state, or ``None`` to start afresh (no file, or a damaged one).

    A checkpoint is a cache of the search's progress, written only by the search (atomically):
    a damaged one (cut short, not JSON, wrong content) has nothing left to resume, so the
    search restarts with a warning, the damaged bytes kept aside as ``<file>.damaged``. A valid
    JSON object of another search, or of nothing llmpress wrote, is refused: it may be another
    search's progress, or a file the ``checkpoint`` option names by mistake."""
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_bytes())
    except (ValueError, OSError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        why = f"not valid JSON: {e}"
    else:
        if not isinstance(state, dict) or not isinstance(state.get("key"), str):
            raise AllocationError(
                f"{path} is not an evopress checkpoint (a JSON {type(state).__name__} without its search's "
                f"key); choose another 'checkpoint' file, or delete it"
            )
        if state["key"] != key:
            raise AllocationError(
                f"evopress checkpoint {path} belongs to another search (model, level database, calibration "
                f"or options differ); delete it or choose another 'checkpoint'"
            )
        bad = _invalid(state, problem)
        if bad is None:
            return state
        why = f"invalid content: {bad}"
    aside = path.with_name(path.name + ".damaged")
    if distributed.is_main():
        os.replace(path, aside)
    log.warning(
        "evopress checkpoint %s is damaged (%s); restarting the search from the start (the damaged file "
        "is kept as %s)",
        path,
        why,
        aside,
    )
    return None


def _save(path: Path, state: dict[str, Any]) -> None:
    atomic_write(path, json.dumps(state))


def evolve(problem: AllocationProblem, config: EvoPressConfig) -> AllocationResult:
    """The (1 + lambda) search (see the module doc)."""
    steps = [min(t, problem.max_tokens) for t in config.tokens]
    final = steps[-1]
    path = Path(problem.checkpoint) if problem.checkpoint else None
    key = problem.fingerprint + json.dumps(
        [config.offspring, config.max_mutations, list(config.tokens), list(config.survivors), config.seed]
    )
    state = _load(path, key, problem) if path is not None else None
    rng = random.Random(config.seed)
    if state is None:
        parent = list(problem.start)
        state = {
            "key": key,
            "generation": 0,
            "parent": parent,
            "fitness": problem.fitness(parent, final),
            "history": [],
            "evaluations": 1,
        }
    else:
        log.info("evopress: resuming from %s at generation %d", path, state["generation"])
        v, internal, gauss = state["rng"]
        rng.setstate((v, tuple(internal), gauss))
    parent, best, evals = list(state["parent"]), float(state["fitness"]), int(state["evaluations"])
    history = list(state["history"])
    bar = tqdm(range(state["generation"], config.generations), desc="evopress", disable=not problem.progress)
    for gen in bar:
        pool = [mutate(problem, parent, rng, config.max_mutations) for _ in range(config.offspring)]
        for tokens, keep in zip(steps[:-1], config.survivors):
            fits = problem.evaluate(pool, tokens)  # in parallel across ranks under torchrun
            evals += len(pool)
            order = sorted(range(len(pool)), key=lambda i: (fits[i], i))
            pool = [pool[i] for i in order[:keep]]
        fits = problem.evaluate(pool, final)
        evals += len(pool)
        i = min(range(len(pool)), key=lambda j: (fits[j], j))
        if fits[i] <= best:  # elitism: the parent stays unless matched or beaten
            parent, best = pool[i], fits[i]
        history.append(best)
        bar.set_postfix(best=f"{best:.5f}")
        log.info("evopress generation %d: best fitness %.6f (%d evaluations)", gen + 1, best, evals)
        if path is not None and distributed.is_main():  # one writer; every rank holds the same state
            v, internal, gauss = rng.getstate()
            _save(
                path,
                {
                    "key": key,
                    "generation": gen + 1,
                    "parent": parent,
                    "fitness": best,
                    "history": history,
                    "evaluations": evals,
                    "rng": [v, list(internal), gauss],
                },
            )
    return AllocationResult(levels=parent, fitness=best, history=history, evaluations=evals)


@hookimpl
def llmpress_register_methods(register) -> None:  # noqa: ANN001
    register(EvoPressConfig)


@hookimpl
def llmpress_search_allocation(problem: AllocationProblem, config: EvoPressConfig) -> AllocationResult:
    return evolve(problem, config)
