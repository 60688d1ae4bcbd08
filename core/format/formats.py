"""The packed on-disk layout of a compressed linear layer (format version 1).

For a layer ``name`` with weight [out, in] the checkpoint holds, by ``format``:

``int``      ``name.weight``        int32 [out, ceil(in*bits/32)]  codes, continuous little-endian
                                     bitstream per row (value j at stream bits [j*bits, (j+1)*bits))
             ``name.weight_scale``  fp16/bf16 [out, n_groups]     one scale per group of
                                     ``group_size`` consecutive inputs (n_groups = 1 per channel)
             ``name.weight_zero``   uint8 [out, n_groups]          zero points (asymmetric only;
                                     symmetric uses 2**(bits-1))
``int-2:4``  as ``int`` but the codes are those of the 2 kept values of every 4 inputs,
             [out, ceil(in/2*bits/32)], plus ``name.weight_meta`` uint8 [out, ceil(in/8)]: each
             group of 4 stores its two kept indices in 4 bits (2 bits each, lower first), two
             groups per byte, low nibble first
``2:4``      ``name.weight`` fp16/bf16 [out, in/2] kept values + ``name.weight_meta`` as above
``bitmask``  ``name.weight`` fp16/bf16 [nnz] kept values in row-major order +
             ``name.weight_bitmask`` uint8 [out, ceil(in/8)] (bit j of byte k = input 8k+j)

``fp8``      ``name.weight`` float8_e4m3fn [out, in] + ``name.weight_scale`` fp32 [out, 1]
             (``W = fp8 * scale``)

W8A8 layers (``activations`` set: ``int8-dynamic``, ``int8-static``, ``fp8-dynamic``,
``fp8-static``; ``int`` layers then are 8-bit symmetric per channel) quantize their inputs at
run time; a static scheme stores its calibrated ``name.input_scale`` fp32 [1]. W4A8 and W4A4
layers are 4-bit ``int`` layers (any group size) with ``int8-dynamic`` or ``int4-dynamic``
inputs (per token, nothing more stored).

``spqr``     SpQR codes, quantized statistics and CSR outliers (:mod:`llmpress.format.spqr_format`)

``dense``    ``name.weight`` fp16/bf16/fp32 [out, in]: a plain layer whose shape differs from what the
             model's config builds (structured pruning with per-layer widths)
``dropped``  no tensors: a sub-block (attention or MLP) that adds nothing to the residual stream

Low-rank compensation (EoRA), beside any format but ``dropped``: an entry with ``lowrank: r``
also stores ``name.weight_lora_a`` fp16 [r, in] and ``name.weight_lora_b`` fp16 [out, r], and the
layer computes ``W x + B (A x)`` (:mod:`llmpress.format.lowrank`).

Value rules (:attr:`FormatSpec.values`, checked at every load whatever the checkpoint's size):
scales and input scales are finite and positive; zero points are at most ``2**bits - 1``.

A dequantized weight is ``scale[g] * (code - zero[g])`` with ``g = input // group_size``;
pruned weights hold the zero point's code, i.e. exactly 0. ``name.bias`` is unchanged.
Loaded in another dtype than stored (``from_pretrained(dtype=...)``), packed tensors keep their
stored dtypes (the kernels compute in the input's dtype); ``dense`` weights and all biases
take the requested dtype, like the rest of the model.
Packed tensors are stored under ``weight`` on purpose: without llmpress, transformers
refuses the shapes instead of silently loading random weights.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Literal

import torch
from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from torch import nn

from llmpress.errors import CheckpointError
from llmpress.format.spqr_format import spqr_pack, spqr_tensors, spqr_unpack, spqr_values
from llmpress.model.results import LayerResult, QuantState
from llmpress.quant.activations import FP8_DTYPE, is_static
from llmpress.quant.grid import IntCodes, grid_problem
from llmpress.quant.packing import (
    pack_24,
    pack_bitmask,
    pack_int32,
    packed_int32_width,
    unpack_24,
    unpack_bitmask,
    unpack_int32,
)

#: 2: the value dtype is stored as ``storage_dtype`` (version 1 said ``dtype``, a key transformers
#: rewrites in nested config dicts); 3: ``checksum_algorithm`` (absent: sha256), which an older
#: llmpress cannot verify. Older versions still load.
FORMAT_VERSION = 3
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
Shapes = dict[str, tuple[tuple[int, ...], torch.dtype]]


def _problems(e: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'entry'}: {err['msg']}" for err in e.errors())


def _grid_problem(f: ModuleFormat) -> str | None:
    """What is wrong with an entry's quantization grid, or ``None``."""
    if not f.quantized:
        has_grid = f.bits is not None or f.group_size is not None
        return f"format {f.format!r} stores no quantization grid (bits/group_size)" if has_grid else None
    if f.bits is None or f.group_size is None:
        return f"format {f.format!r} needs bits and group_size"
    problem = grid_problem(f.bits, f.group_size, f.symmetric)
    if problem:
        return problem
    if f.group_size != -1 and f.in_features % f.group_size:
        return f"group_size {f.group_size} does not divide in_features {f.in_features}"
    return None


def _layout_problem(f: ModuleFormat) -> str | None:
    """What is wrong with an entry's sparse layout, sub-block kind or activations, or ``None``."""
    if f.format in ("2:4", "int-2:4") and f.in_features % 4:
        return f"format {f.format!r} needs in_features divisible by 4"
    if f.format == "bitmask" and (f.nnz is None or f.nnz > f.in_features * f.out_features):
        return "format 'bitmask' needs nnz between 0 and in_features * out_features"
    if f.format not in ("bitmask", "spqr") and f.nnz is not None:
        return f"format {f.format!r} has no nnz"
    if f.format == "spqr":
        if not f.stat_group_size or f.out_features % f.stat_group_size:
            return "format 'spqr' needs stat_group_size dividing out_features"
    elif f.stat_bits is not None or f.stat_group_size is not None:
        return "stat_bits and stat_group_size go with format 'spqr' only"
    if (f.format == "dropped") != (f.kind is not None):
        return "'kind' (attention or mlp) goes with format 'dropped' only"
    if f.activations is not None:
        if f.format not in ("int", "fp8"):
            return f"format {f.format!r} cannot quantize activations"
        w8a8 = (f.bits, f.group_size, f.symmetric) == (8, -1, True)
        if f.format == "int" and f.activations.startswith("int4") and f.bits != 4:
            return "INT4 activations go with 4-bit weights (W4A4)"
        if f.format == "int" and f.activations == "int8-static" and not w8a8:
            return "static INT8 activations go with 8-bit symmetric per-channel weights (W8A8)"
        if f.format == "int" and f.activations.startswith("fp8") and not w8a8:
            return "FP8 activations on an 'int' layer go with 8-bit symmetric per-channel weights"
        if f.format == "int" and f.activations.startswith("int8") and not (w8a8 or f.bits == 4):
            return (
                "INT8 activations go with 8-bit symmetric per-channel weights (W8A8) or 4-bit weights (W4A8)"
            )
    return None


class ModuleFormat(BaseModel):
    """How one layer is stored: the per-module entry of ``quantization_config.modules``, one
    pydantic model in memory and in ``config.json`` (validated both ways by the same rules).

    ``resized``: the layer's shape differs from what the model's config builds (structured
    pruning); ``kind``: ``attention`` or ``mlp`` for a ``dropped`` sub-block. On disk the value
    dtype is ``storage_dtype`` (``dtype`` in format version 1), ``None`` fields and a false
    ``resized`` are left out (:meth:`to_dict`). Built in code, a bad entry raises pydantic's
    ``ValidationError``; read with :meth:`from_dict`, :class:`CheckpointError`; inside a
    ``quantization_config``, one of the schema's errors (with the field's path).
    """

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    format: str
    in_features: int = Field(ge=0)
    out_features: int = Field(ge=0)
    bits: int | None = Field(default=None, ge=2, le=8)
    group_size: int | None = None
    symmetric: bool = False
    #: the dtype of scales and stored values; ``storage_dtype`` on disk, ``dtype`` in format version 1
    dtype: Literal["float16", "bfloat16", "float32"] = Field(
        default="float16",
        validation_alias=AliasChoices("storage_dtype", "dtype"),
        serialization_alias="storage_dtype",
    )
    nnz: int | None = Field(default=None, ge=0)  # bitmask: number of stored values
    resized: bool = False
    kind: Literal["attention", "mlp"] | None = None
    #: W8A8, W4A8, W4A4: how the layer's inputs are quantized (``llmpress.quant.activations.SCHEMES``)
    activations: (
        Literal["int8-dynamic", "int8-static", "int4-dynamic", "fp8-dynamic", "fp8-static"] | None
    ) = None
    #: whether a resized layer has an output bias (structured pruning may add one); absent: as the
    #: model builds it
    bias: bool | None = None
    #: ``spqr``: bits of the quantized statistics (``None``: plain 16-bit) and the output rows
    #: sharing one second-level statistic
    stat_bits: int | None = Field(default=None, ge=2, le=8)
    stat_group_size: int | None = Field(default=None, ge=1)

    #: rank of a low-rank compensation path stored beside the weight (EoRA), or ``None``
    lowrank: int | None = Field(default=None, ge=1)

    def __init__(
        self,
        format: str | None = None,  # noqa: A002 - the on-disk key
        in_features: int | None = None,
        out_features: int | None = None,
        /,
        **fields: object,
    ) -> None:
        """``ModuleFormat("int", in_features, out_features, bits=4, ...)`` or all by keyword."""
        for key, value in (("format", format), ("in_features", in_features), ("out_features", out_features)):
            if value is not None:
                fields[key] = value
        super().__init__(**fields)  # pydantic's ValidationError (with the field) if it is not valid

    @field_validator("format")
    @classmethod
    def _known_format(cls, v: str) -> str:
        if v not in FORMATS:
            raise ValueError(f"unknown format {v!r}; this llmpress reads {sorted(FORMATS)}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> ModuleFormat:
        problem = _grid_problem(self) or _layout_problem(self) or _lowrank_problem(self)
        if problem is not None:
            raise ValueError(problem)
        return self

    @property
    def spec(self) -> FormatSpec:
        return FORMATS[self.format]

    @property
    def quantized(self) -> bool:
        return self.format.startswith("int") or self.format == "spqr"

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    @property
    def group_width(self) -> int:
        """Inputs per quantization group (``in_features`` when per channel)."""
        return self.in_features if self.group_size in (None, -1) else int(self.group_size)

    @property
    def n_groups(self) -> int:
        return 1 if self.group_size in (None, -1) else self.in_features // int(self.group_size)

    def to_dict(self) -> dict[str, Any]:
        """The entry as ``config.json`` stores it."""
        d = self.model_dump(by_alias=True, exclude_none=True)
        if not self.resized:
            d.pop("resized")
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], name: str = "module") -> ModuleFormat:
        """An entry of ``config.json`` (any format version); :class:`CheckpointError` naming
        ``name`` if it is not a valid one."""
        try:
            return cls.model_validate(d)
        except ValidationError as e:
            raise CheckpointError(f"bad quantization_config entry for {name}: {_problems(e)}") from None

    def tensor_shapes(self) -> Shapes:
        """Suffix -> (shape, dtype) of every stored tensor (with the low-rank path's, if any)."""
        return self.spec.tensors(self) | lowrank_shapes(self)


# ------------------------------------------------------------------------------ low-rank path

#: the stored tensors of a low-rank compensation path (A [r, in], B [out, r])
LOWRANK_A, LOWRANK_B = "weight_lora_a", "weight_lora_b"


def _lowrank_problem(f: ModuleFormat) -> str | None:
    """What is wrong with an entry's low-rank rank, or ``None``."""
    if f.lowrank is None:
        return None
    if f.format == "dropped":
        return "a 'dropped' sub-block has no low-rank path"
    if f.lowrank > min(f.in_features, f.out_features):
        return f"lowrank {f.lowrank} exceeds min(in_features, out_features) = {min(f.in_features, f.out_features)}"
    return None


def lowrank_shapes(fmt: ModuleFormat) -> Shapes:
    """The low-rank path's stored tensors (fp16), or none."""
    r = fmt.lowrank
    if r is None:
        return {}
    return {
        LOWRANK_A: ((r, fmt.in_features), torch.float16),
        LOWRANK_B: ((fmt.out_features, r), torch.float16),
    }


def pack_lowrank(fmt: ModuleFormat, result: LayerResult | None) -> dict[str, torch.Tensor]:
    """The low-rank path's tensors from the committed result (fp16), or none."""
    if fmt.lowrank is None:
        return {}
    if result is None or result.lowrank is None or result.lowrank[0].shape[0] != fmt.lowrank:
        raise CheckpointError(f"format entry with lowrank {fmt.lowrank} needs the layer's low-rank factors")
    a, b = result.lowrank
    return {LOWRANK_A: a.to(torch.float16).contiguous(), LOWRANK_B: b.to(torch.float16).contiguous()}


@dataclasses.dataclass(frozen=True)
class Values:
    """What the values of a small stored tensor (a scale, a zero point) must be.

    ``positive``: finite and > 0 (a NaN, 0 or negative scale gives NaN or silently wrong
    outputs); ``at_most``: integers in ``[0, at_most]`` (zero points on the grid).
    """

    positive: bool = False
    at_most: int | None = None

    def problem(self, t: torch.Tensor) -> str | None:
        """What is wrong with ``t``'s values (the first bad one and where), or ``None``."""
        x = t.detach().reshape(-1)
        if self.positive:
            bad = ~(x > 0) | torch.isinf(x)  # NaN > 0 is False
            rule = "finite and positive"
        elif self.at_most is not None:
            bad = x.to(torch.int64) > self.at_most
            rule = f"at most {self.at_most}"
        else:
            return None
        if not bool(bad.any()):
            return None
        first = i = int(bad.nonzero()[0, 0])
        where: list[int] = []
        for d in reversed(t.shape):  # the flat index as [row, column, ...]
            i, c = divmod(i, int(d))
            where.insert(0, c)
        n = int(bad.sum())
        return f"holds {x[first].item()} at {where} ({n} bad value{'s' * (n > 1)}); its values must be {rule}"


#: a scale: finite and positive
SCALE = Values(positive=True)


def _no_values(fmt: ModuleFormat) -> dict[str, Values]:
    return {}


@dataclasses.dataclass(frozen=True)
class FormatSpec:
    """One storage format of the registry, used both when saving and when loading.

    ``tensors(fmt)`` names the stored tensors (suffix -> shape, dtype); ``pack(fmt, weight,
    result)`` makes them from a layer's weight [out, in] and its committed result;
    ``unpack(fmt, tensors, dtype)`` rebuilds the dense weight;
    ``runtime(fmt, bias, device, dtype)`` makes the module that computes with the stored
    tensors in the compute dtype ``dtype`` (the model's; ``None``: the storage dtype): packed
    tensors keep their stored dtypes (loaded bit for bit), while plain weights and biases
    follow ``dtype``. ``packed``: the runtime is an :class:`llmpress.format.runtime.LlmpressLinear`,
    run by a kernel chosen at load. ``values(fmt)``: suffix -> :class:`Values` of the small
    tensors whose values are checked at every load. ``restore(fmt, tensors)``: the committed
    result the stored layer stands for (keep mask, quantization state), so that a loaded model
    can be compressed further or trained (:mod:`llmpress.pipeline.resume`); ``None`` where a
    format cannot go back (FP8).
    """

    name: str
    tensors: Callable[[ModuleFormat], Shapes]
    pack: Callable[[ModuleFormat, torch.Tensor, LayerResult | None], dict[str, torch.Tensor]]
    unpack: Callable[[ModuleFormat, dict[str, torch.Tensor], torch.dtype], torch.Tensor] | None
    runtime: Callable[[ModuleFormat, bool, torch.device | None, torch.dtype | None], nn.Module]
    packed: bool = True
    values: Callable[[ModuleFormat], dict[str, Values]] = _no_values
    restore: Callable[[ModuleFormat, dict[str, torch.Tensor]], LayerResult] | None = None


FORMATS: dict[str, FormatSpec] = {}


def register_format(spec: FormatSpec) -> None:
    """Add a storage format (names are unique)."""
    if spec.name in FORMATS:
        raise ValueError(f"format {spec.name!r} is already registered")
    FORMATS[spec.name] = spec


# ------------------------------------------------------------------------------ int, int-2:4


def _meta_shape(fmt: ModuleFormat) -> tuple[tuple[int, ...], torch.dtype]:
    return (fmt.out_features, (fmt.in_features + 7) // 8), torch.uint8


def _int_tensors(fmt: ModuleFormat) -> Shapes:
    assert fmt.bits is not None
    o, i = fmt.out_features, fmt.in_features
    cols = i // 2 if fmt.format == "int-2:4" else i
    out: Shapes = {
        "weight": ((o, packed_int32_width(cols, fmt.bits)), torch.int32),
        "weight_scale": ((o, fmt.n_groups), fmt.torch_dtype),
    }
    if not fmt.symmetric:
        out["weight_zero"] = ((o, fmt.n_groups), torch.uint8)
    if fmt.format == "int-2:4":
        out["weight_meta"] = _meta_shape(fmt)
    return out | _input_scale_shape(fmt)


def _int_values(fmt: ModuleFormat) -> dict[str, Values]:
    assert fmt.bits is not None
    out = {"weight_scale": SCALE}
    if not fmt.symmetric:
        out["weight_zero"] = Values(at_most=2**fmt.bits - 1)
    return out | _input_scale_values(fmt)


def _input_scale_values(fmt: ModuleFormat) -> dict[str, Values]:
    return {"input_scale": SCALE} if is_static(fmt.activations) else {}


def _input_scale_shape(fmt: ModuleFormat) -> Shapes:
    return {"input_scale": ((1,), torch.float32)} if is_static(fmt.activations) else {}


def _pack_input_scale(fmt: ModuleFormat, quant: QuantState) -> dict[str, torch.Tensor]:
    if not is_static(fmt.activations):
        return {}
    if quant.input_scale is None:
        raise CheckpointError(f"activations {fmt.activations!r} need the layer's calibrated input scale")
    return {"input_scale": quant.input_scale.float().reshape(1).contiguous()}


def _int_pack(fmt: ModuleFormat, weight: torch.Tensor, result: LayerResult | None) -> dict[str, torch.Tensor]:
    quant = None if result is None else result.quant
    if quant is None or fmt.bits is None:
        raise CheckpointError(f"format {fmt.format!r} needs the layer's quantization state")
    codes = quant.codes.to(weight.device)
    out: dict[str, torch.Tensor] = {}
    if fmt.format == "int-2:4":
        keep = result.mask if result is not None and result.mask is not None else weight != 0
        _, meta = pack_24(keep.to(weight.device).float())  # slot indices of the kept weights
        # padding slots point at pruned weights, whose code is the zero point: they decode to 0
        codes = codes.gather(1, _slot_columns(meta, fmt.out_features, fmt.in_features))  # [out, in/2]
        out["weight_meta"] = meta
    out["weight"] = pack_int32(codes, fmt.bits)
    out["weight_scale"] = quant.scales.to(device=weight.device, dtype=fmt.torch_dtype).contiguous()
    if not fmt.symmetric:
        out["weight_zero"] = quant.zeros.to(device=weight.device).round().to(torch.uint8).contiguous()
    return out | _pack_input_scale(fmt, quant)


def int_codes(fmt: ModuleFormat, t: dict[str, torch.Tensor]) -> IntCodes:
    """Unpack the codes, scales and zero points of an ``int`` layer."""
    if fmt.format != "int" or fmt.bits is None:
        raise CheckpointError(f"int_codes needs an 'int' layer, got format {fmt.format!r}")
    codes = unpack_int32(t["weight"], fmt.bits, fmt.in_features)
    scale = t["weight_scale"]
    zero = (
        t["weight_zero"].to(torch.float32)
        if "weight_zero" in t
        else torch.full(scale.shape, float(2 ** (fmt.bits - 1)), device=scale.device)
    )
    gs = fmt.group_width
    return IntCodes(codes, scale, zero, fmt.bits, gs)


def _int_unpack(fmt: ModuleFormat, t: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    assert fmt.bits is not None
    o, i = fmt.out_features, fmt.in_features
    if fmt.format == "int":
        return int_codes(fmt, t).dequantize(dtype)
    codes = unpack_int32(t["weight"], fmt.bits, i // 2).to(torch.float32)  # [out, in/2]
    scale = t["weight_scale"].to(torch.float32)  # [out, G]
    zero = (
        t["weight_zero"].to(torch.float32)
        if "weight_zero" in t
        else torch.full_like(scale, 2 ** (fmt.bits - 1))
    )
    gs = fmt.group_width
    g = _slot_columns(t["weight_meta"], o, i) // gs  # group of each slot's original column
    vals = (codes - zero.gather(1, g)) * scale.gather(1, g)
    return unpack_24(vals.to(dtype), t["weight_meta"], i)


def _int_restore(fmt: ModuleFormat, t: dict[str, torch.Tensor]) -> LayerResult:
    """Codes [out, in] (a 2:4 layer's pruned slots hold the zero point: they decode to 0),
    scales and zero points; for ``int-2:4`` also the keep mask."""
    assert fmt.bits is not None
    o, i = fmt.out_features, fmt.in_features
    scale = t["weight_scale"].to(torch.float32)
    zero = (
        t["weight_zero"].to(torch.float32)
        if "weight_zero" in t
        else torch.full_like(scale, float(2 ** (fmt.bits - 1)))
    )
    mask = None
    if fmt.format == "int":
        codes = unpack_int32(t["weight"], fmt.bits, i)
    else:
        cols = _slot_columns(t["weight_meta"], o, i)  # [out, in/2]
        codes = zero.repeat_interleave(fmt.group_width, dim=1).round().to(torch.uint8)
        codes.scatter_(1, cols, unpack_int32(t["weight"], fmt.bits, i // 2))
        mask = unpack_24(torch.ones(o, i // 2), t["weight_meta"].cpu(), i) != 0
    quant = QuantState(
        codes=codes.to(torch.uint8).cpu(),
        scales=scale.cpu(),
        zeros=zero.cpu(),
        bits=fmt.bits,
        group_size=fmt.group_width,
        symmetric=fmt.symmetric,
        method="checkpoint",
        activations=fmt.activations,
    )
    return LayerResult(mask=mask, quant=quant)


def _slot_columns(meta: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """Original input column of each stored 2:4 slot: int64 [out, in/2]."""
    ones = torch.ones(out_features, in_features // 2, device=meta.device)
    dense = unpack_24(ones, meta, in_features)  # 1 at both slots of every group
    return torch.nonzero(dense, as_tuple=False)[:, 1].view(out_features, in_features // 2)


# ------------------------------------------------------------------------------ 2:4, bitmask


def _24_tensors(fmt: ModuleFormat) -> Shapes:
    return {
        "weight": ((fmt.out_features, fmt.in_features // 2), fmt.torch_dtype),
        "weight_meta": _meta_shape(fmt),
    }


def _24_pack(fmt: ModuleFormat, weight: torch.Tensor, result: LayerResult | None) -> dict[str, torch.Tensor]:
    values, meta = pack_24(weight)
    return {"weight": values.to(fmt.torch_dtype).contiguous(), "weight_meta": meta}


def _24_unpack(fmt: ModuleFormat, t: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    return unpack_24(t["weight"].to(dtype), t["weight_meta"], fmt.in_features)


def _24_restore(fmt: ModuleFormat, t: dict[str, torch.Tensor]) -> LayerResult:
    ones = torch.ones(fmt.out_features, fmt.in_features // 2)
    return LayerResult(mask=unpack_24(ones, t["weight_meta"].cpu(), fmt.in_features) != 0)


def _bitmask_restore(fmt: ModuleFormat, t: dict[str, torch.Tensor]) -> LayerResult:
    return LayerResult(mask=unpack_bitmask(t["weight_bitmask"].cpu(), fmt.in_features))


def _bitmask_tensors(fmt: ModuleFormat) -> Shapes:
    nnz = fmt.nnz if fmt.nnz is not None else 0
    return {"weight": ((nnz,), fmt.torch_dtype), "weight_bitmask": _meta_shape(fmt)}


def _bitmask_pack(
    fmt: ModuleFormat, weight: torch.Tensor, result: LayerResult | None
) -> dict[str, torch.Tensor]:
    k = result.mask.to(weight.device) if result is not None and result.mask is not None else weight != 0
    return {"weight": weight[k].to(fmt.torch_dtype).contiguous(), "weight_bitmask": pack_bitmask(k)}


def _bitmask_unpack(fmt: ModuleFormat, t: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    keep = unpack_bitmask(t["weight_bitmask"], fmt.in_features)
    w = torch.zeros(fmt.out_features, fmt.in_features, dtype=dtype, device=t["weight"].device)
    w[keep] = t["weight"].to(dtype)
    return w


# ------------------------------------------------------------------------------ dense, dropped


# ------------------------------------------------------------------------------ fp8


def _fp8_tensors(fmt: ModuleFormat) -> Shapes:
    return {
        "weight": ((fmt.out_features, fmt.in_features), FP8_DTYPE),
        "weight_scale": ((fmt.out_features, 1), torch.float32),
    } | _input_scale_shape(fmt)


def _fp8_values(fmt: ModuleFormat) -> dict[str, Values]:
    return {"weight_scale": SCALE} | _input_scale_values(fmt)


def _fp8_pack(fmt: ModuleFormat, weight: torch.Tensor, result: LayerResult | None) -> dict[str, torch.Tensor]:
    quant = None if result is None else result.quant
    if quant is None or quant.kind != "fp8":
        raise CheckpointError("format 'fp8' needs the layer's FP8 quantization state")
    return {
        "weight": quant.codes.to(weight.device).view(FP8_DTYPE).contiguous(),
        "weight_scale": quant.scales.to(device=weight.device, dtype=torch.float32)
        .reshape(-1, 1)
        .contiguous(),
    } | _pack_input_scale(fmt, quant)


def _fp8_unpack(fmt: ModuleFormat, t: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    return (t["weight"].to(torch.float32) * t["weight_scale"].to(torch.float32)).to(dtype)


def _dense_tensors(fmt: ModuleFormat) -> Shapes:
    return {"weight": ((fmt.out_features, fmt.in_features), fmt.torch_dtype)}


def _dense_pack(
    fmt: ModuleFormat, weight: torch.Tensor, result: LayerResult | None
) -> dict[str, torch.Tensor]:
    return {"weight": weight.to(fmt.torch_dtype).contiguous()}


def _dense_runtime(
    fmt: ModuleFormat, bias: bool, device: torch.device | None, dtype: torch.dtype | None
) -> nn.Module:
    dtype = dtype or fmt.torch_dtype
    if fmt.lowrank is not None:
        from llmpress.format.lowrank import LowRankLinear

        return LowRankLinear(fmt, bias=bias, device=device, dtype=dtype)
    return nn.Linear(fmt.in_features, fmt.out_features, bias=bias, device=device, dtype=dtype)


def _dropped_runtime(
    fmt: ModuleFormat, bias: bool, device: torch.device | None, dtype: torch.dtype | None
) -> nn.Module:
    from llmpress.model.dropped import DroppedModule

    return DroppedModule(fmt.kind or "mlp")


def _packed_runtime(
    fmt: ModuleFormat, bias: bool, device: torch.device | None, dtype: torch.dtype | None
) -> nn.Module:
    from llmpress.format.runtime import LlmpressLinear

    return LlmpressLinear(fmt, bias=bias, device=device, dtype=dtype)


for _spec in (
    FormatSpec(
        "int", _int_tensors, _int_pack, _int_unpack, _packed_runtime, values=_int_values, restore=_int_restore
    ),
    FormatSpec(
        "int-2:4",
        _int_tensors,
        _int_pack,
        _int_unpack,
        _packed_runtime,
        values=_int_values,
        restore=_int_restore,
    ),
    FormatSpec("2:4", _24_tensors, _24_pack, _24_unpack, _packed_runtime, restore=_24_restore),
    FormatSpec(
        "bitmask", _bitmask_tensors, _bitmask_pack, _bitmask_unpack, _packed_runtime, restore=_bitmask_restore
    ),
    FormatSpec("fp8", _fp8_tensors, _fp8_pack, _fp8_unpack, _packed_runtime, values=_fp8_values),
    FormatSpec("spqr", spqr_tensors, spqr_pack, spqr_unpack, _packed_runtime, values=spqr_values),
    FormatSpec("dense", _dense_tensors, _dense_pack, None, _dense_runtime, packed=False),
    FormatSpec("dropped", lambda f: {}, lambda f, w, r: {}, None, _dropped_runtime, packed=False),
):
    register_format(_spec)

#: the formats of packed layers (stored compressed, run by an LlmpressLinear)
PACKED_FORMATS = tuple(n for n, s in FORMATS.items() if s.packed)


def choose_format(quant: QuantState | None, keep: torch.Tensor | None, sparse: str) -> str | None:
    """The storage format of a layer; ``sparse`` is ``"auto"``, ``"dense"``, ``"bitmask"`` or
    ``"2:4"``. ``None`` means a plain dense weight (no packing)."""
    is24 = keep is not None and _is_24(keep)
    if quant is not None and getattr(quant, "kind", "int") in ("fp8", "spqr"):
        return quant.kind
    if quant is not None:
        return "int-2:4" if is24 and sparse in ("auto", "2:4") else "int"
    if keep is None or sparse == "dense":
        return None
    if sparse == "2:4" or (sparse == "auto" and is24):
        if not is24:
            raise CheckpointError("sparse format '2:4' asked for a layer that is not 2:4 sparse")
        return "2:4"
    density = float(keep.float().mean())
    # bitmask costs 1 bit per weight + the kept values: worth it below ~15/16 density
    return "bitmask" if density < 0.9 else None


def _is_24(keep: torch.Tensor) -> bool:
    o, i = keep.shape
    return i % 4 == 0 and bool((keep.reshape(o, i // 4, 4).sum(-1) <= 2).all())


def pack_module(
    fmt: ModuleFormat, weight: torch.Tensor, result: LayerResult | None = None, name: str = "a layer"
) -> dict[str, torch.Tensor]:
    """Tensors to store for a layer: its weight [out, in] and its committed result. Their
    values pass the format's rules (:attr:`FormatSpec.values`): what is saved loads."""
    tensors = fmt.spec.pack(fmt, weight, result) | pack_lowrank(fmt, result)
    for suffix, rule in fmt.spec.values(fmt).items():
        problem = rule.problem(tensors[suffix]) if suffix in tensors else None
        if problem:
            raise CheckpointError(
                f"cannot save {name}: its {suffix} (stored as {tensors[suffix].dtype}) {problem}; the "
                f"compression gave a grid this format cannot store: check the calibration data, save the "
                f"scales as float32 or bfloat16, or leave the layer out with 'ignore'"
            )
    return tensors


def unpack_module(
    fmt: ModuleFormat, t: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Dense weight [out, in] in ``dtype`` from the stored tensors."""
    if fmt.spec.unpack is None:
        if fmt.format == "dense":
            return t["weight"].to(dtype)
        raise CheckpointError(f"format {fmt.format!r} stores no weight")
    return fmt.spec.unpack(fmt, t, dtype)
