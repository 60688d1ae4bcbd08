"""Method configs: one frozen, typed, versioned dataclass per method, round-tripping to JSON.

A recipe stage such as ``{method: wanda, sparsity: 0.5, pattern: "2:4"}`` becomes
``WandaConfig(sparsity=0.5, pattern="2:4")``. ``to_dict()`` is what goes into the saved
recipe, ``config.json`` and the model card; ``from_dict()`` reads it back.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any, ClassVar, TypeVar, get_type_hints

from llmpress.engine.layer_stage import LayerUpdate
from llmpress.engine.stage import StageExecutor
from llmpress.errors import ModelError, RecipeError
from llmpress.math.masks import check_nm_divides
from llmpress.math.targets import SparsityTarget, parse_pattern
from llmpress.quant.grid import QuantSpec, check_spec, grid_problem

C = TypeVar("C", bound="MethodConfig")


class LevelKind(str, enum.Enum):
    """What an allocation search distributes over a stage's units."""

    SPARSITY = "sparsity"  # the fraction of each layer's weights pruned
    BITS = "bits"  # each layer's bit width
    BLOCKS = "blocks"  # blocks or sub-blocks kept or dropped
    WIDTHS = "widths"  # the fraction of each block's parameters removed (structured)


@dataclasses.dataclass(frozen=True)
class Allocatable:
    """How a stage can be allocated: the kind of level and the stage's own budget
    (its sparsity, bit width, number of blocks dropped or removed fraction)."""

    kind: LevelKind
    target: float


@dataclasses.dataclass(frozen=True)
class MethodConfig:
    """Base class of every method config.

    Subclasses set ``method`` (the registered name), ``version`` (bumped when the meaning
    of a field changes) and declare what the engine needs to know:

    * ``stats``: the statistics to collect for each target layer's input (names from
      :data:`llmpress.engine.stats.STATISTICS`: ``"hessian"``, ``"sq_norms"``, ``"mean_var"``,
      ``"absmax"``, ``"token_norms"``, ``"grad"``);
    * ``needs_calibration``: whether the method needs calibration data at all;
    * ``kind``: the stage kind that runs it (:mod:`llmpress.engine.stage`): by default
      :class:`llmpress.engine.layer_stage.LayerUpdate` (score -> mask -> update on each
      target layer); block-level methods name :class:`llmpress.structure.block_stage.BlockChange`;
      a plugin may bring its own kind;
    * :meth:`allocatable`: what an ``allocation:`` search can distribute over the stage;
    * ``default_allocation``: the search used when a stage has no ``allocation:`` section
      (``None``: the stage runs without one);
    * ``own_allocations``: values of ``allocation:`` that set the method's own option
      rather than name a search;
    * :meth:`sparsity_target`: the mask a scoring method must select (``None``: no mask);
    * :meth:`sequential`: compress a block's layers input group by input group.

    Fields are the method's options with defaults; ``validate()`` raises
    :class:`RecipeError` on bad values.
    """

    method: ClassVar[str] = ""
    version: ClassVar[int] = 1
    stats: ClassVar[frozenset[str]] = frozenset({"sq_norms"})
    needs_calibration: ClassVar[bool] = True
    kind: ClassVar[type[StageExecutor]] = LayerUpdate
    default_allocation: ClassVar[str | None] = None
    own_allocations: ClassVar[tuple[str, ...]] = ()
    #: whether the method writes quantized weights (an integer grid or FP8 codes)
    quantizes: ClassVar[bool] = False
    #: BibTeX of the method's paper(s), cited in model cards
    citation: ClassVar[str] = ""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check option values; raise :class:`RecipeError` naming the bad option."""

    def sparsity_target(self) -> SparsityTarget | None:
        """What mask selection must achieve for this config, or ``None`` (no mask selection)."""
        return None

    def sequential(self) -> bool:
        """True to compress a block's layers input group by input group (q/k/v, then o, ...),
        each group seeing the already-compressed groups' outputs (GPTQ's true-sequential)."""
        return False

    def statistics(self) -> frozenset[str]:
        """The statistics to collect with these options (default: the class's ``stats``)."""
        return frozenset(type(self).stats)

    def calibrated(self) -> bool:
        """Whether these options need calibration data (default: ``needs_calibration``)."""
        return type(self).needs_calibration

    def allocatable(self) -> Allocatable | None:
        """What an allocation search can distribute over this stage (``None``: nothing)."""
        return None

    def at_level(self: C, value: float) -> C:
        """This config at one level of an allocation (its sparsity, bits or ratio replaced)."""
        raise NotImplementedError(f"method {self.method!r} has no levels")

    def prunes_hidden(self) -> bool:
        """True when the stage removes hidden (residual-stream) channels of the whole model."""
        return False

    def check_module(self, name: str, in_features: int, out_features: int) -> None:
        """Check that this config can compress a layer of this shape (before any work);
        raise :class:`llmpress.errors.ModelError` naming the module and the fix."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: ``method``, ``version`` and every field."""
        out: dict[str, Any] = {"method": self.method, "version": self.version}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any]) -> C:
        """Build from a dict (a recipe stage or a saved ``to_dict()``), checking keys."""
        data = dict(data)
        method = data.pop("method", cls.method)
        if method != cls.method:
            raise RecipeError(f"config for method {method!r} given to {cls.__name__} ({cls.method!r})")
        version = data.pop("version", cls.version)
        if int(version) > cls.version:
            raise RecipeError(
                f"{cls.method} config version {version} is newer than this llmpress supports "
                f"({cls.version}); upgrade llmpress"
            )
        names = set(cls.field_names())
        unknown = sorted(set(data) - names)
        if unknown:
            raise RecipeError(
                f"unknown option(s) {unknown} for method {cls.method!r}; valid options: {sorted(names)}"
            )
        hints = get_type_hints(cls)
        kwargs = {}
        for k, v in data.items():
            if isinstance(v, list) and "tuple" in str(hints.get(k, "")):
                v = tuple(v)
            kwargs[k] = v
        try:
            return cls(**kwargs)
        except TypeError as e:  # pragma: no cover - defensive
            raise RecipeError(f"bad options for method {cls.method!r}: {e}") from e


@dataclasses.dataclass(frozen=True)
class PruningConfig(MethodConfig):
    """Shared options of pruning methods.

    ``sparsity`` is the fraction of weights set to zero in each target layer. ``pattern``
    is ``"unstructured"`` or ``"N:M"`` (N weights kept in every M consecutive input
    weights, NVIDIA's convention: ``"2:4"`` is 50 %). With an ``N:M`` pattern ``sparsity``
    may be omitted; if given it must equal ``1 - N/M``.
    """

    sparsity: float | None = None
    pattern: str = "unstructured"

    def validate(self) -> None:
        super().validate()
        nm = parse_pattern(self.pattern)  # raises on a bad pattern
        s = self.sparsity
        if s is None:
            if nm is None:
                raise RecipeError(
                    f"method {self.method!r}: 'sparsity' is required with an unstructured pattern"
                )
            return
        if isinstance(s, bool) or not isinstance(s, (int, float)):
            raise RecipeError(f"method {self.method!r}: sparsity must be a number, got {s!r}")
        if not 0.0 <= float(s) < 1.0:
            raise RecipeError(
                f"method {self.method!r}: sparsity {s} is outside [0, 1); use e.g. 0.5 for 50 %"
            )
        if nm is not None:
            n, m = nm
            implied = 1.0 - n / m
            if abs(float(s) - implied) > 1e-9:
                raise RecipeError(
                    f"method {self.method!r}: sparsity {s} contradicts pattern {self.pattern!r} "
                    f"(which keeps {n} of every {m}, i.e. sparsity {implied:g}); drop 'sparsity' "
                    f"or make them agree"
                )

    def check_module(self, name: str, in_features: int, out_features: int) -> None:
        nm = parse_pattern(self.pattern)
        if nm is not None:
            check_nm_divides(in_features, nm[0], nm[1], name)

    #: the comparison group of unstructured selection: ``"row"`` or ``"layer"``
    selection_group: ClassVar[str] = "row"

    def allocatable(self) -> Allocatable | None:
        return Allocatable(LevelKind.SPARSITY, self.sparsity_target().sparsity)

    def at_level(self: C, value: float) -> C:
        return dataclasses.replace(self, sparsity=float(value))  # type: ignore[call-arg]

    def sparsity_target(self) -> SparsityTarget:
        """The :class:`SparsityTarget` this config asks for."""
        nm = parse_pattern(self.pattern)
        s = float(self.sparsity) if self.sparsity is not None else 1.0 - nm[0] / nm[1]  # type: ignore[index]
        return SparsityTarget(sparsity=s, nm=nm, group=self.selection_group)


@dataclasses.dataclass(frozen=True)
class QuantConfig(MethodConfig):
    """Shared options of weight quantization methods.

    ``bits``: 2 to 8. ``group_size``: -1 for one scale per output channel, else the number of
    consecutive input weights sharing a scale (32, 64, 128, ...; must divide the layer's
    in_features). ``symmetric``: symmetric grid (no zero point stored). ``activations``:
    ``None`` (weight-only), ``"int8"`` (W8A8: inputs quantized per token at run time) or
    ``"int8-static"`` (one input scale per layer, calibrated); W8A8 needs ``bits: 8``,
    ``group_size: -1`` and ``symmetric: true`` (what int8 GEMM kernels compute).
    """

    quantizes: ClassVar[bool] = True
    bits: int = 4
    group_size: int = 128
    symmetric: bool = False
    activations: str | None = None

    def validate(self) -> None:
        super().validate()
        problem = grid_problem(self.bits, self.group_size, self.symmetric)
        if problem is not None:
            raise RecipeError(f"method {self.method!r}: {problem}")
        if self.activations is not None:
            if self.activations not in ("int8", "int8-dynamic", "int8-static"):
                raise RecipeError(
                    f"method {self.method!r}: activations must be 'int8' (dynamic per token) or "
                    f"'int8-static', got {self.activations!r}"
                )
            if (self.bits, self.group_size, self.symmetric) != (8, -1, True):
                raise RecipeError(
                    f"method {self.method!r}: activations {self.activations!r} (INT8 W8A8) needs bits: 8, "
                    f"group_size: -1, symmetric: true; got bits {self.bits}, group_size "
                    f"{self.group_size}, symmetric {self.symmetric}"
                )

    def allocatable(self) -> Allocatable | None:
        return Allocatable(LevelKind.BITS, float(self.bits))

    def at_level(self: C, value: float) -> C:
        return dataclasses.replace(self, bits=int(value))  # type: ignore[call-arg]

    def activation_scheme(self) -> str | None:
        """The activation scheme (:data:`llmpress.quant.activations.SCHEMES`) or ``None``."""
        if self.activations is None:
            return None
        return "int8-static" if self.activations == "int8-static" else "int8-dynamic"

    def statistics(self) -> frozenset[str]:
        extra = {"absmax"} if self.activations == "int8-static" else set()
        return frozenset(type(self).stats) | extra

    def calibrated(self) -> bool:
        return type(self).needs_calibration or self.activations == "int8-static"

    def check_module(self, name: str, in_features: int, out_features: int) -> None:
        try:
            check_spec(self.quant_spec(), in_features, name)
        except ValueError as e:
            raise ModelError(str(e)) from None

    def quant_spec(self) -> QuantSpec:
        """The grid these options describe."""
        return QuantSpec(bits=self.bits, group_size=self.group_size, symmetric=self.symmetric)


@dataclasses.dataclass(frozen=True)
class OBSConfig(MethodConfig):
    """Options of the OBS column sweep shared by SparseGPT and GPTQ (:mod:`llmpress.math.obs`).

    ``blocksize``: columns per lazy-update block; ``percdamp``: damping as a fraction of
    ``mean(diag H)``. Needs the input Hessian. Put it first among a method config's bases
    (``class GPTQConfig(OBSConfig, QuantConfig)``) so the grid options come first in its dict.
    """

    stats: ClassVar[frozenset[str]] = frozenset({"hessian"})
    blocksize: int = 128
    percdamp: float = 0.01

    def validate(self) -> None:
        super().validate()
        if isinstance(self.blocksize, bool) or not isinstance(self.blocksize, int) or self.blocksize < 1:
            raise RecipeError(f"{self.method}: blocksize must be an integer >= 1, got {self.blocksize!r}")
        if (
            isinstance(self.percdamp, bool)
            or not isinstance(self.percdamp, (int, float))
            or not 0 <= self.percdamp < 10
        ):
            raise RecipeError(f"{self.method}: percdamp must be a number in [0, 10), got {self.percdamp!r}")
