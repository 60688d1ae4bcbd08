"""Method configs: one frozen, typed, versioned dataclass per method, round-tripping to JSON.

A recipe stage such as ``{method: wanda, sparsity: 0.5, pattern: "2:4"}`` becomes
``WandaConfig(sparsity=0.5, pattern="2:4")``. ``to_dict()`` is what goes into the saved
recipe, ``config.json`` and the model card; ``from_dict()`` reads it back.
"""

from __future__ import annotations

import dataclasses
import enum
import types
from collections.abc import Mapping
from typing import Annotated, Any, ClassVar, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import annotated_types
from pydantic import ConfigDict, Field, TypeAdapter, ValidationError
from pydantic.fields import FieldInfo
from typing_extensions import TypedDict

from llmpress.engine.layer_stage import LayerUpdate
from llmpress.engine.stage import StageExecutor
from llmpress.errors import ModelError, RecipeError
from llmpress.math.masks import check_nm_divides
from llmpress.math.targets import SparsityTarget, parse_pattern
from llmpress.quant.grid import QuantSpec, check_spec, grid_problem

C = TypeVar("C", bound="MethodConfig")

#: an integer >= 1 (a count, a block size)
PositiveInt = Annotated[int, Field(ge=1)]
#: an integer >= 0
NonNegativeInt = Annotated[int, Field(ge=0)]
#: a fraction in [0, 1)
Fraction = Annotated[float, Field(ge=0, lt=1)]
#: a quantization bit width
BitWidth = Annotated[int, Field(ge=2, le=8)]

_NAMES: dict[object, tuple[str, str]] = {
    bool: ("true or false", "true/false values"),
    int: ("an integer", "integers"),
    float: ("a number", "numbers"),
    str: ("a string", "strings"),
}


def _bounds(metadata: tuple[object, ...], integer: bool) -> str:
    """The range that ``Field``/``annotated_types`` constraints allow, in words (``">= 1"``,
    ``"in [0, 1)"``, ``"from 2 to 8"``), or ``""``."""
    flat: list[object] = []
    for m in metadata:
        flat.extend(m.metadata if isinstance(m, FieldInfo) else [m])
    lo: tuple[object, str] | None = None
    hi: tuple[object, str] | None = None
    for m in flat:
        if isinstance(m, annotated_types.Ge):
            lo = (m.ge, "[")
        elif isinstance(m, annotated_types.Gt):
            lo = (m.gt, "(")
        elif isinstance(m, annotated_types.Le):
            hi = (m.le, "]")
        elif isinstance(m, annotated_types.Lt):
            hi = (m.lt, ")")
    if lo and hi:
        if integer and lo[1] == "[" and hi[1] == "]":
            return f"from {lo[0]} to {hi[0]}"
        return f"in {lo[1]}{lo[0]}, {hi[0]}{hi[1]}"
    if lo:
        return f"{'>=' if lo[1] == '[' else '>'} {lo[0]}"
    if hi:
        return f"{'<=' if hi[1] == ']' else '<'} {hi[0]}"
    return ""


def expects(hint: object, plural: bool = False) -> str:
    """What a field of type ``hint`` takes, in the words of a recipe (``"an integer >= 1"``,
    ``"'kl' or 'ppl'"``, ``"a list of integers from 2 to 8"``)."""
    origin, args = get_origin(hint), get_args(hint)
    if origin is Annotated:
        base = expects(args[0], plural)
        bounds = _bounds(tuple(hint.__metadata__), args[0] is int)  # type: ignore[attr-defined]
        return f"{base} {bounds}".rstrip()
    if origin is Literal:
        words = [repr(a) for a in args]
        return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"
    if origin in (Union, types.UnionType):
        return " or ".join(expects(a, plural) for a in args if a is not type(None))
    if origin is tuple:
        return f"{'lists' if plural else 'a list'} of {expects(args[0], True)}"
    if origin is dict:
        return f"a mapping of {expects(args[0], True)} to {expects(args[1], True)}"
    named = _NAMES.get(hint)
    if named is not None:
        return named[plural]
    name = hint.__name__ if isinstance(hint, type) else str(hint)
    return f"{'instances' if plural else 'an instance'} of {name}"


@dataclasses.dataclass(frozen=True)
class _Schema:
    """The field types of one config class, checked by one pydantic ``TypeAdapter``
    (strict: ``True`` is no integer and ``"0.5"`` no number, but ``1`` is a number)."""

    hints: Mapping[str, object]
    tuples: frozenset[str]
    adapter: TypeAdapter[Mapping[str, object]]

    @classmethod
    def of(cls, config_cls: type[MethodConfig]) -> _Schema:
        all_hints = get_type_hints(config_cls, include_extras=True)
        hints = {f.name: all_hints[f.name] for f in dataclasses.fields(config_cls)}
        options = TypedDict(f"{config_cls.__name__}Options", hints, total=False)  # type: ignore[misc]
        options.__pydantic_config__ = ConfigDict(strict=True, arbitrary_types_allowed=True)  # type: ignore[attr-defined]
        tuples = frozenset(n for n, h in hints.items() if _is_tuple(h))
        return cls(hints=hints, tuples=tuples, adapter=TypeAdapter(options))

    def error(self, label: str, values: Mapping[str, object], e: ValidationError) -> RecipeError:
        """One line naming the option, what it got and what it takes."""
        name = str(e.errors()[0]["loc"][0])
        return RecipeError(f"{label}: {name} must be {expects(self.hints[name])}, got {values[name]!r}")


def _is_tuple(hint: object) -> bool:
    """Whether ``hint`` is a tuple type (possibly constrained or optional)."""
    origin = get_origin(hint)
    if origin is Annotated:
        return _is_tuple(get_args(hint)[0])
    if origin in (Union, types.UnionType):
        return any(_is_tuple(a) for a in get_args(hint))
    return origin is tuple


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

    Fields are the method's options with defaults. Their annotations are the schema: on
    construction one pydantic ``TypeAdapter`` per class checks every field strictly (``True``
    is no integer, ``"0.5"`` no number, an integer is a number; a list becomes a tuple for a
    tuple field), including ``Literal`` choices and ``Field(ge=...)`` bounds (``Annotated``;
    see :data:`PositiveInt`, :data:`Fraction`, :data:`BitWidth`), and raises one
    :class:`RecipeError` line naming the option, what it got and what it takes. Then
    ``validate()`` checks what the types cannot say (cross-field rules, special messages).
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
    #: whether the stage needs the model as it was before the recipe's first stage (a
    #: distillation teacher): the runner then keeps a frozen copy
    needs_teacher: ClassVar[bool] = False
    #: whether the stage needs each layer's weight as it was before the run's first commit to it
    #: (EoRA's compression error W - W_hat): the run's record then keeps a CPU copy of each
    #: layer's weight at its first commit (:attr:`llmpress.engine.record.RunRecord.originals`)
    needs_original_weights: ClassVar[bool] = False
    #: whether the stage adds low-rank paths beside the layers' weights (EoRA), which
    #: ``--adapter peft`` can write as a PEFT adapter
    adds_lowrank: ClassVar[bool] = False
    #: BibTeX of the method's paper(s), cited in model cards
    citation: ClassVar[str] = ""
    #: how model cards and reports name the method (``"SparseGPT"``; default: ``method``)
    display_name: ClassVar[str] = ""

    #: whether the stage rotates the model (QuaRot's Hadamard rotations) so that activation
    #: outliers are spread over the channels: 4-bit activations after it are expected to work
    rotates: ClassVar[bool] = False
    #: the type checker of the class's fields (built on first use, per class)
    _llmpress_schema: ClassVar[_Schema | None] = None

    def __post_init__(self) -> None:
        self._check_types()
        self.validate()

    @classmethod
    def label(cls) -> str:
        """How messages name this config (``method 'wanda'``)."""
        return f"method {cls.method!r}"

    def copies_model(self) -> bool:
        """Whether the runner must keep a frozen copy of the model as it was before the first
        stage for this stage (``needs_teacher``; a stage that names its own teacher does not)."""
        return self.needs_teacher

    def describe(self) -> str:
        """One clause saying what the stage does, for model cards (``SparseGPT pruning to 50 %
        unstructured sparsity``). Methods override it to name their options."""
        return self.display_name or self.method

    @classmethod
    def _schema(cls) -> _Schema:
        """The class's :class:`_Schema`, built on first use and kept on the class."""
        schema = cls.__dict__.get("_llmpress_schema")
        if not isinstance(schema, _Schema):
            schema = _Schema.of(cls)
            cls._llmpress_schema = schema
        return schema

    def _check_types(self) -> None:
        """Check every field against its type (lists become tuples for tuple fields);
        raise one :class:`RecipeError` naming the first bad option."""
        schema = type(self)._schema()
        raw = {name: vars(self)[name] for name in schema.hints}
        values = dict(raw)
        for name in schema.tuples:
            if isinstance(values[name], list):
                values[name] = tuple(values[name])
                object.__setattr__(self, name, values[name])
        try:
            schema.adapter.validate_python(values)
        except ValidationError as e:
            raise schema.error(self.label(), raw, e) from None

    def validate(self) -> None:
        """Check option values (ranges, choices, cross-field rules; the types are checked
        before); raise :class:`RecipeError` naming the bad option."""

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

    def refines_mask(self) -> bool:
        """True to refine each layer's keep mask after the weight update
        (``llmpress_refine_mask``; DSnoT on a pruning stage)."""
        return False

    def at_level(self: C, value: float) -> C:
        """This config at one level of an allocation (its sparsity, bits or ratio replaced)."""
        raise NotImplementedError(f"method {self.method!r} has no levels")

    def prunes_hidden(self) -> bool:
        """True when the stage removes hidden (residual-stream) channels of the whole model."""
        return False

    def check_module(self, name: str, in_features: int, out_features: int) -> None:
        """Check that this config can compress a layer of this shape (before any work);
        raise :class:`llmpress.errors.ModelError` naming the module and the fix."""

    def planned_transforms(self, model: Any) -> list[dict[str, Any]]:
        """The online transforms this stage will add to ``model``
        (:class:`llmpress.format.transforms.OnlineTransform` dicts), so that an export can refuse
        one it cannot store before any work (default: none)."""
        return []

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: ``method``, ``version`` and every field."""
        out: dict[str, Any] = {"method": self.method, "version": self.version}
        for f in dataclasses.fields(self):
            v = vars(self)[f.name]
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
        try:
            return cls(**data)
        except TypeError as e:  # pragma: no cover - defensive
            raise RecipeError(f"bad options for method {cls.method!r}: {e}") from e


@dataclasses.dataclass(frozen=True)
class DSnoTOptions:
    """Options of DSnoT's training-free mask refinement (Zhang et al., ICLR 2024), run on
    every layer after the stage's mask and weight update (``llmpress_refine_mask``).

    ``max_cycles``: at most this many prune-and-regrow swaps per output row;
    ``update_threshold``: a row stops once its expected reconstruction error
    ``|sum_j (W0 - W)_ij E[x_j]|`` is at most this; ``var_power``: regrowth candidates are
    ranked by ``W_ij E[x_j] / Var(x_j)^var_power``. Defaults are the paper's.
    """

    max_cycles: PositiveInt = 50
    update_threshold: Annotated[float, Field(ge=0)] = 0.1
    var_power: Annotated[float, Field(ge=0)] = 1.0

    @classmethod
    def parse(cls, value: object, label: str) -> DSnoTOptions:
        """From a recipe's mapping (or an instance); one :class:`RecipeError` line on bad input."""
        if isinstance(value, cls):
            return value
        if value is True:
            return cls()
        names = [f.name for f in dataclasses.fields(cls)]
        if not isinstance(value, Mapping):
            raise RecipeError(
                f"{label}: dsnot must be a mapping with keys {names} (or omitted), got {value!r}"
            )
        unknown = sorted(set(map(str, value)) - set(names))
        if unknown:
            raise RecipeError(f"{label}: unknown dsnot option(s) {unknown}; valid options: {names}")
        hints = get_type_hints(cls, include_extras=True)
        for name, v in value.items():
            try:
                TypeAdapter(hints[name], config=ConfigDict(strict=True)).validate_python(v)
            except ValidationError:
                raise RecipeError(
                    f"{label}: dsnot.{name} must be {expects(hints[name])}, got {v!r}"
                ) from None
        d = cls()
        return cls(
            max_cycles=int(value.get("max_cycles", d.max_cycles)),
            update_threshold=float(value.get("update_threshold", d.update_threshold)),  # an int is a number
            var_power=float(value.get("var_power", d.var_power)),
        )


@dataclasses.dataclass(frozen=True)
class PruningConfig(MethodConfig):
    """Shared options of pruning methods.

    ``sparsity`` is the fraction of weights set to zero in each target layer. ``pattern``
    is ``"unstructured"`` or ``"N:M"`` (N weights kept in every M consecutive input
    weights, NVIDIA's convention: ``"2:4"`` is 50 %). With an ``N:M`` pattern ``sparsity``
    may be omitted; if given it must equal ``1 - N/M``. ``dsnot``: refine each layer's mask
    with DSnoT after the method (:class:`DSnoTOptions`; a recipe gives a mapping, ``{}``
    or ``true`` for the defaults); ``None`` (the default) leaves the method's mask as it is.
    """

    sparsity: float | None = None
    pattern: str = "unstructured"
    dsnot: DSnoTOptions | None = None

    def __post_init__(self) -> None:
        if self.dsnot is not None:
            object.__setattr__(self, "dsnot", DSnoTOptions.parse(self.dsnot, self.label()))
        super().__post_init__()

    def refines_mask(self) -> bool:
        return self.dsnot is not None

    def statistics(self) -> frozenset[str]:
        extra = {"mean_var", "sq_norms"} if self.dsnot is not None else set()
        return super().statistics() | extra

    def calibrated(self) -> bool:
        return super().calibrated() or self.dsnot is not None

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        if self.dsnot is None:
            del out["dsnot"]  # no refinement: the dict (and saved configs) as before DSnoT existed
        else:
            out["dsnot"] = dataclasses.asdict(self.dsnot)
        return out

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

    def describe(self) -> str:
        s = self.sparsity_target().sparsity
        return f"{self.display_name or self.method} pruning to {100 * s:.0f} % {self.pattern} sparsity"

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


def activations_problem(activations: str | None, bits: int, group_size: int, symmetric: bool) -> str | None:
    """What is wrong with quantizing a stage's inputs to ``activations`` with this weight grid,
    or ``None``: W8A8 (8-bit symmetric per-channel weights, static or dynamic INT8 inputs),
    W4A8 and W4A4 (4-bit weights, dynamic per-token INT8 or INT4 inputs)."""
    if activations is None:
        return None
    w8a8 = (bits, group_size, symmetric) == (8, -1, True)
    if activations.startswith("int4") and bits != 4:
        return (
            f"activations {activations!r} (W4A4) needs bits: 4, got bits {bits}; use activations: int8 "
            f"(W8A8 or W4A8) or bits: 4"
        )
    if activations == "int8-static" and not w8a8:
        return (
            f"activations 'int8-static' (W8A8, one calibrated input scale) needs bits: 8, group_size: -1, "
            f"symmetric: true; got bits {bits}, group_size {group_size}, symmetric {symmetric} (W4A8 takes "
            f"activations: int8, per token)"
        )
    if activations.startswith("int8") and not (w8a8 or bits == 4):
        return (
            f"activations {activations!r} goes with W8A8 (bits: 8, group_size: -1, symmetric: true) or W4A8 "
            f"(bits: 4); got bits {bits}, group_size {group_size}, symmetric {symmetric}"
        )
    return None


@dataclasses.dataclass(frozen=True)
class QuantConfig(MethodConfig):
    """Shared options of weight quantization methods.

    ``bits``: 2 to 8. ``group_size``: -1 for one scale per output channel, else the number of
    consecutive input weights sharing a scale (32, 64, 128, ...; must divide the layer's
    in_features). ``symmetric``: symmetric grid (no zero point stored). ``activations``:
    ``None`` (weight-only), ``"int8"`` (inputs quantized to INT8 per token at run time),
    ``"int8-static"`` (one input scale per layer, calibrated) or ``"int4"`` (INT4 per token at
    run time). W8A8 needs ``bits: 8``, ``group_size: -1`` and ``symmetric: true`` (what int8 GEMM
    kernels compute); W4A8 (``int8``) and W4A4 (``int4``) need ``bits: 4`` (any group size).
    ``int8-static`` goes with W8A8 only.
    """

    quantizes: ClassVar[bool] = True
    bits: BitWidth = 4
    group_size: int = 128
    symmetric: bool = False
    activations: Literal["int8", "int8-dynamic", "int8-static", "int4", "int4-dynamic"] | None = None

    def validate(self) -> None:
        super().validate()
        problem = grid_problem(self.bits, self.group_size, self.symmetric)
        if problem is not None:
            raise RecipeError(f"method {self.method!r}: {problem}")
        problem = activations_problem(self.activations, self.bits, self.group_size, self.symmetric)
        if problem is not None:
            raise RecipeError(f"method {self.method!r}: {problem}")

    def allocatable(self) -> Allocatable | None:
        return Allocatable(LevelKind.BITS, float(self.bits))

    def describe(self) -> str:
        gs = self.group_size
        group = "per output channel" if gs == -1 else f"group size {gs}"
        text = f"{self.display_name or self.method} quantization to {self.bits} bits ({group})"
        scheme = self.activation_scheme()
        if scheme is not None:
            kind, _, how = scheme.partition("-")
            when = (
                "with one calibrated scale per layer (static)"
                if how == "static"
                else "per token at run time (dynamic)"
            )
            text += f"; activations quantized to {kind.upper()} {when}"
            text += f" (W{self.bits}A{kind.removeprefix('int')})"
        return text

    def at_level(self: C, value: float) -> C:
        return dataclasses.replace(self, bits=int(value))  # type: ignore[call-arg]

    def activation_scheme(self) -> str | None:
        """The activation scheme (:data:`llmpress.quant.activations.SCHEMES`) or ``None``."""
        if self.activations is None:
            return None
        if self.activations.startswith("int4"):
            return "int4-dynamic"
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
    blocksize: PositiveInt = 128
    percdamp: Annotated[float, Field(ge=0, lt=10)] = 0.01
