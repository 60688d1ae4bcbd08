"""Allocation configs: what a stage's ``allocation:`` section says, validated before any work.

:class:`AllocationConfig` is the base of every search's config (uniform, OWL, EvoPress,
ShortGPT, SLEB, explicit); :class:`DropBlocksConfig` is the ``drop_blocks`` stage, which always
runs under a search. :func:`resolve_allocation` turns a section into its config for a stage.
The problem a search solves lives in :mod:`llmpress.allocation.problem`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

from pydantic import Field

from llmpress.errors import AllocationError, RecipeError
from llmpress.recipe.config import (
    Allocatable,
    BitWidth,
    Fraction,
    LevelKind,
    MethodConfig,
    NonNegativeInt,
    PositiveInt,
)

if TYPE_CHECKING:
    from llmpress.plugin_manager import Llmpress


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

    stats: ClassVar[frozenset[str]] = frozenset()
    #: what the search can allocate
    handles: ClassVar[frozenset[LevelKind]] = frozenset(LevelKind)
    database: str | None = None
    metric: Literal["kl", "ppl"] = "kl"
    fitness_samples: NonNegativeInt = 0
    sparsity_step: Annotated[float, Field(gt=0, le=1)] = 0.05
    sparsity_span: Fraction = 0.25
    max_sparsity: Annotated[float, Field(gt=0, lt=1)] = 0.95
    bits: tuple[BitWidth, ...] = (2, 3, 4, 5, 6, 7, 8)
    average: float | None = None

    @classmethod
    def label(cls) -> str:
        return f"allocation {cls.method!r}"

    def validate(self) -> None:
        super().validate()
        if not self.bits:
            raise AllocationError(f"allocation {self.method!r}: the bit-width level list is empty")

    def fixed_levels(self) -> dict[str, float] | None:
        """Each unit's level when the allocation is given rather than searched (``explicit``);
        ``None`` for a search."""
        return None

    def checkpoint_path(self) -> str | None:
        """The file a resumable search keeps its state in (``None``: none, or the default one
        in the level database's folder)."""
        return None


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
    stats: ClassVar[frozenset[str]] = frozenset()
    default_allocation: ClassVar[str | None] = "shortgpt"
    blocks: PositiveInt = 1
    granularity: Literal["block", "sub_block"] = "block"

    def allocatable(self) -> Allocatable | None:
        return Allocatable(LevelKind.BLOCKS, float(self.blocks))


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
    pm: Llmpress,
    index: int,
    section: dict[str, Any] | None,
    stage_config: MethodConfig,
    average: float | None = None,
) -> AllocationConfig | None:
    """The validated allocation config of stage ``index`` (``None`` without a section).

    A stage whose method has a ``default_allocation`` (``drop_blocks``: ``shortgpt``) gets it
    without a section. An allocation method used as a stage, or a stage method no allocation
    applies to, is a :class:`RecipeError`."""
    name = f"stage {index} ({stage_config.method})"
    if isinstance(stage_config, AllocationConfig):
        raise RecipeError(
            f"{name}: {stage_config.method!r} is an allocation search; put it under a compression "
            f"stage's 'allocation:' key, e.g. {{method: sparsegpt, sparsity: 0.7, allocation: "
            f"{{method: {stage_config.method}}}}}"
        )
    if section is None:
        if stage_config.default_allocation is None:
            return None
        section = {"method": stage_config.default_allocation}
    d = dict(section)
    if average is not None:
        d.setdefault("average", average)
    info = pm.method(str(d.get("method")))
    if not issubclass(info.config_cls, AllocationConfig):
        raise RecipeError(f"{name}: allocation method {info.name!r} is a compression method, not a search")
    try:
        cfg = info.config_cls.from_dict(d)
    except RecipeError as e:
        raise RecipeError(f"{name}: allocation: {e}") from None
    space = stage_config.allocatable()
    if space is None:
        raise RecipeError(
            f"{name}: an 'allocation:' section needs a pruning (sparsity), quantization (bits), "
            f"structured (widths) or drop_blocks stage"
        )
    if space.kind not in cfg.handles:
        handled = ", ".join(sorted(k.value for k in cfg.handles))
        raise RecipeError(f"{name}: allocation {cfg.method!r} handles {handled}, not {space.kind.value}")
    if space.kind is LevelKind.BITS:  # the budget must be reachable, before any work
        budget = cfg.average if cfg.average is not None else space.target
        try:
            check_bits_budget(float(budget), cfg.bits)
        except RecipeError as e:
            raise RecipeError(f"{name}: {e}") from None
    return cfg
