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

from llmpress.errors import AllocationError, RecipeError
from llmpress.recipe.config import MethodConfig

#: fitness(levels, tokens) -> a number to minimise (KL to the dense model, or log-perplexity)
FitnessFn = Callable[[Sequence[int], int], float]


@dataclasses.dataclass(frozen=True)
class AllocationConfig(MethodConfig):
    """Base of every allocation search's config (registered like a method, used under a
    stage's ``allocation:`` key, never as a stage of its own).

    Options shared by every search: ``database`` (a folder for the level database on disk;
    ``None`` keeps it in memory), ``metric`` (``kl`` to the dense model's next-token
    distribution, or ``ppl``), ``fitness_samples`` (calibration sequences the fitness may use;
    0: all), ``sparsity_step`` (the absolute step between sparsity levels, as a fraction of the
    mean target layer size), ``sparsity_span`` (levels cover the stage's sparsity plus or
    minus this, per layer), ``max_sparsity``, ``bits`` (the bit-width levels), ``average``
    (the budget as an average, e.g. 2.5 bits; default: the stage's ``sparsity``/``bits``; a
    fractional ``bits:`` on the stage sets it).
    """

    scope: ClassVar[str] = "allocation"
    stats: ClassVar[frozenset[str]] = frozenset()
    #: what the search can allocate: ``sparsity``, ``bits``, ``blocks``, ``widths``
    kinds: ClassVar[tuple[str, ...]] = ("sparsity", "bits", "blocks", "widths")
    database: str | None = None
    metric: str = "kl"
    fitness_samples: int = 0
    sparsity_step: float = 0.05
    sparsity_span: float = 0.25
    max_sparsity: float = 0.95
    bits: tuple[int, ...] = (2, 3, 4, 5, 6, 7, 8)
    average: float | None = None

    def validate(self) -> None:
        super().validate()
        if self.metric not in ("kl", "ppl"):
            raise RecipeError(
                f"allocation {self.method!r}: metric must be 'kl' or 'ppl', got {self.metric!r}"
            )
        if not 0 < float(self.sparsity_step) <= 1:
            raise RecipeError(f"allocation {self.method!r}: sparsity_step must be in (0, 1]")
        if not 0 <= float(self.sparsity_span) < 1 or not 0 < float(self.max_sparsity) < 1:
            raise RecipeError(f"allocation {self.method!r}: sparsity_span and max_sparsity must be in [0, 1)")
        if not self.bits:
            raise AllocationError(f"allocation {self.method!r}: the bit-width level list is empty")
        if any(isinstance(b, bool) or not isinstance(b, int) or not 2 <= b <= 8 for b in self.bits):
            raise RecipeError(
                f"allocation {self.method!r}: bits levels must be integers in 2..8, got {self.bits}"
            )
        if self.average is not None and (
            isinstance(self.average, bool) or not isinstance(self.average, (int, float))
        ):
            raise RecipeError(f"allocation {self.method!r}: average must be a number, got {self.average!r}")
        if isinstance(self.fitness_samples, bool) or int(self.fitness_samples) < 0:
            raise RecipeError(f"allocation {self.method!r}: fitness_samples must be >= 0")


@dataclasses.dataclass(frozen=True)
class DropBlocksConfig(MethodConfig):
    """``method: drop_blocks``: remove ``blocks`` whole transformer blocks (``granularity:
    block``) or that many attention/MLP sub-blocks (``sub_block``); which ones is decided by
    the stage's ``allocation:`` (shortgpt by default; sleb, evopress)."""

    method: ClassVar[str] = "drop_blocks"
    citation: ClassVar[str] = """@article{gromov2024unreasonable,
      title   = {The Unreasonable Ineffectiveness of the Deeper Layers},
      author  = {Gromov, Andrey and Tirumala, Kushal and Shapourian, Hassan and Glorioso, Paolo and Roberts, Daniel A.},
      journal = {arXiv preprint arXiv:2403.17887},
      year    = {2024}
    }"""
    scope: ClassVar[str] = "model"
    stats: ClassVar[frozenset[str]] = frozenset()
    blocks: int = 1
    granularity: str = "block"

    def validate(self) -> None:
        super().validate()
        if isinstance(self.blocks, bool) or not isinstance(self.blocks, int) or self.blocks < 1:
            raise RecipeError(f"drop_blocks: blocks must be an integer >= 1, got {self.blocks!r}")
        if self.granularity not in ("block", "sub_block"):
            raise RecipeError(
                f"drop_blocks: granularity must be 'block' or 'sub_block', got {self.granularity!r}"
            )


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


def split_average(
    options: dict[str, Any], section: dict[str, Any] | None
) -> tuple[dict[str, Any], float | None]:
    """A stage's options with ``bits`` an integer for the method's config, and the average
    a fractional ``bits`` sets: ``(options, average)``.

    A whole number written as a float (``4.0``) is that integer. A fractional value (``2.5``)
    is an average-bits budget over the layers: it needs an ``allocation:`` section and must
    lie within the section's bit-width levels; otherwise :class:`RecipeError`."""
    opts = dict(options)
    bits = opts.get("bits")
    if isinstance(bits, bool) or not isinstance(bits, float):
        return opts, None
    if bits.is_integer():
        opts["bits"] = int(bits)
        return opts, None
    if section is None:
        raise RecipeError(
            f"bits must be an integer from 2 to 8, got {bits!r}; a fractional bits value is an "
            f"average-bits budget over the layers, which needs an allocation search, e.g. "
            f"allocation: {{method: evopress}}"
        )
    levels = section.get("bits", AllocationConfig.bits)
    if not (
        isinstance(levels, (list, tuple)) and levels and all(type(b) is int and 2 <= b <= 8 for b in levels)
    ):
        levels = AllocationConfig.bits  # malformed levels: the section's own check names them
    check_bits_budget(bits, levels)
    opts["bits"] = int(bits)  # within the levels, so a valid width for the config's checks
    return opts, bits


def check_bits_budget(budget: float, levels: Sequence[int]) -> None:
    """Raise :class:`RecipeError` unless the average-bits ``budget`` of an allocation lies
    within its bit-width ``levels`` (no mix of levels can average outside them)."""
    lo, hi = min(levels), max(levels)
    if lo <= budget <= hi:
        return
    if budget < lo:
        need = f"at least {lo} (the lowest bit-width level)"
    elif budget > hi:
        need = f"at most {hi} (the highest bit-width level)"
    else:  # nan
        need = f"a number from {lo} to {hi}"
    raise RecipeError(
        f"bits {budget:g} under an allocation is the average-bits budget over the layers; it must be {need}; "
        f"the levels are {list(levels)}"
    )


def resolve_allocation(
    pm: Any,
    index: int,
    section: dict[str, Any] | None,
    stage_config: MethodConfig,
    average: float | None = None,
) -> MethodConfig | None:
    """The validated allocation config of stage ``index`` (``None`` without a section).

    A ``drop_blocks`` stage without a section uses ``shortgpt``. An allocation method used
    as a stage, or a stage method no allocation applies to, is a :class:`RecipeError`."""
    name = f"stage {index} ({stage_config.method})"
    if stage_config.scope == "allocation":
        raise RecipeError(
            f"{name}: {stage_config.method!r} is an allocation search; put it under a compression "
            f"stage's 'allocation:' key, e.g. {{method: sparsegpt, sparsity: 0.7, allocation: "
            f"{{method: {stage_config.method}}}}}"
        )
    if section is None:
        if stage_config.scope != "model":
            return None
        section = {"method": "shortgpt"}
    d = dict(section)
    if average is not None:
        d.setdefault("average", average)
    info = pm.method(str(d.get("method")))
    if info.config_cls.scope != "allocation":
        raise RecipeError(f"{name}: allocation method {info.name!r} is a compression method, not a search")
    try:
        cfg = info.config_cls.from_dict(d)
    except RecipeError as e:
        raise RecipeError(f"{name}: allocation: {e}") from None
    kinds = getattr(cfg, "kinds", ())
    kind = allocation_kind(stage_config)
    if kind is None:
        raise RecipeError(
            f"{name}: an 'allocation:' section needs a pruning (sparsity), quantization (bits), "
            f"structured (widths) or drop_blocks stage"
        )
    if kinds and kind not in kinds:
        raise RecipeError(f"{name}: allocation {cfg.method!r} handles {', '.join(kinds)}, not {kind}")
    if kind == "bits":  # the budget must be reachable, before any work
        budget = cfg.average if cfg.average is not None else stage_config.bits  # type: ignore[attr-defined]
        try:
            check_bits_budget(float(budget), cfg.bits)  # type: ignore[attr-defined]
        except RecipeError as e:
            raise RecipeError(f"{name}: {e}") from None
    return cfg


def allocation_kind(config: MethodConfig) -> str | None:
    """``sparsity``, ``bits``, ``blocks`` or ``widths`` (structured pruning's removed fraction
    per block): what an allocation over this stage distributes."""
    from llmpress.recipe.config import PruningConfig, QuantConfig

    if config.scope == "model" and hasattr(config, "blocks"):
        return "blocks"
    if config.scope == "block" and hasattr(config, "ratio") and hasattr(config, "structures"):
        return "widths"
    if isinstance(config, PruningConfig):
        return "sparsity"
    if isinstance(config, QuantConfig):
        return "bits"
    return None
