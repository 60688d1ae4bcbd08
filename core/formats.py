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

A dequantized weight is ``scale[g] * (code - zero[g])`` with ``g = input // group_size``;
pruned weights hold the zero point's code, i.e. exactly 0. ``name.bias`` is unchanged.
Packed tensors are stored under ``weight`` on purpose: without llmpress, transformers
refuses the shapes instead of silently loading random weights.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from llmpress.errors import CheckpointError
from llmpress.quant.packing import (
    pack_24,
    pack_bitmask,
    pack_int32,
    packed_int32_width,
    unpack_24,
    unpack_bitmask,
    unpack_int32,
)

FORMAT_VERSION = 1
FORMATS = ("int", "int-2:4", "2:4", "bitmask")
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclasses.dataclass(frozen=True)
class ModuleFormat:
    """How one layer is stored: the per-module entry of ``quantization_config``."""

    format: str
    in_features: int
    out_features: int
    bits: int | None = None
    group_size: int | None = None
    symmetric: bool = False
    dtype: str = "float16"
    nnz: int | None = None  # bitmask: number of stored values

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise CheckpointError(f"unknown module format {self.format!r}; this llmpress reads {FORMATS}")
        if self.quantized and (self.bits is None or self.group_size is None):
            raise CheckpointError(f"format {self.format!r} needs bits and group_size")
        if self.dtype not in _DTYPES:
            raise CheckpointError(f"unknown scale/value dtype {self.dtype!r}")

    @property
    def quantized(self) -> bool:
        return self.format.startswith("int")

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    @property
    def n_groups(self) -> int:
        return 1 if self.group_size in (None, -1) else self.in_features // int(self.group_size)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, d: dict[str, Any], name: str = "module") -> ModuleFormat:
        try:
            return cls(**d)
        except TypeError as e:
            raise CheckpointError(f"bad quantization_config entry for {name}: {e}") from None

    def tensor_shapes(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Suffix -> (shape, dtype) of every stored tensor."""
        nnz = self.nnz
        o, i = self.out_features, self.in_features
        meta = ((o, (i + 7) // 8), torch.uint8)
        if self.format == "bitmask":
            return {"weight": ((nnz if nnz is not None else 0,), self.torch_dtype), "weight_bitmask": meta}
        if self.format == "2:4":
            return {"weight": ((o, i // 2), self.torch_dtype), "weight_meta": meta}
        assert self.bits is not None
        cols = i // 2 if self.format == "int-2:4" else i
        out: dict[str, tuple[tuple[int, ...], torch.dtype]] = {
            "weight": ((o, packed_int32_width(cols, self.bits)), torch.int32),
            "weight_scale": ((o, self.n_groups), self.torch_dtype),
        }
        if not self.symmetric:
            out["weight_zero"] = ((o, self.n_groups), torch.uint8)
        if self.format == "int-2:4":
            out["weight_meta"] = meta
        return out


def choose_format(quant: dict[str, Any] | None, keep: torch.Tensor | None, sparse: str) -> str | None:
    """The storage format of a layer; ``sparse`` is ``"auto"``, ``"dense"``, ``"bitmask"`` or
    ``"2:4"``. ``None`` means a plain dense weight (no packing)."""
    is24 = keep is not None and _is_24(keep)
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
    fmt: ModuleFormat, weight: torch.Tensor, quant: dict[str, Any] | None, keep: torch.Tensor | None
) -> dict[str, torch.Tensor]:
    """Tensors to store for a layer: weight [out, in] (dequantized), its quant record and mask."""
    dt = fmt.torch_dtype
    if fmt.format == "bitmask":
        k = keep if keep is not None else weight != 0
        return {"weight": weight[k].to(dt).contiguous(), "weight_bitmask": pack_bitmask(k)}
    if fmt.format == "2:4":
        values, meta = pack_24(weight)
        return {"weight": values.to(dt).contiguous(), "weight_meta": meta}
    assert quant is not None and fmt.bits is not None
    codes = quant["codes"].to(weight.device)
    out: dict[str, torch.Tensor] = {}
    if fmt.format == "int-2:4":
        assert keep is not None
        _, meta = pack_24(keep.to(weight.device).float())  # slot indices of the kept weights
        # padding slots point at pruned weights, whose code is the zero point: they decode to 0
        codes = codes.gather(1, _slot_columns(meta, fmt.out_features, fmt.in_features))  # [out, in/2]
        out["weight_meta"] = meta
    out["weight"] = pack_int32(codes, fmt.bits)
    out["weight_scale"] = quant["scales"].to(device=weight.device, dtype=dt).contiguous()
    if not fmt.symmetric:
        out["weight_zero"] = quant["zeros"].to(device=weight.device).round().to(torch.uint8).contiguous()
    return out


def unpack_module(
    fmt: ModuleFormat, t: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Dense weight [out, in] in ``dtype`` from the stored tensors."""
    o, i = fmt.out_features, fmt.in_features
    if fmt.format == "bitmask":
        keep = unpack_bitmask(t["weight_bitmask"], i)
        w = torch.zeros(o, i, dtype=dtype, device=t["weight"].device)
        w[keep] = t["weight"].to(dtype)
        return w
    if fmt.format == "2:4":
        return unpack_24(t["weight"].to(dtype), t["weight_meta"], i)
    assert fmt.bits is not None
    cols = i // 2 if fmt.format == "int-2:4" else i
    codes = unpack_int32(t["weight"], fmt.bits, cols).to(torch.float32)  # [out, cols]
    scale = t["weight_scale"].to(torch.float32)  # [out, G]
    zero = (
        t["weight_zero"].to(torch.float32)
        if "weight_zero" in t
        else torch.full_like(scale, 2 ** (fmt.bits - 1))
    )
    gs = i if fmt.group_size in (None, -1) else int(fmt.group_size)
    if fmt.format == "int-2:4":
        g = _slot_columns(t["weight_meta"], o, i) // gs  # group of each slot's original column
        vals = (codes - zero.gather(1, g)) * scale.gather(1, g)
        return unpack_24(vals.to(dtype), t["weight_meta"], i)
    g = torch.arange(i, device=codes.device) // gs
    return ((codes - zero[:, g]) * scale[:, g]).to(dtype)


def _slot_columns(meta: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """Original input column of each stored 2:4 slot: int64 [out, in/2]."""
    ones = torch.ones(out_features, in_features // 2, device=meta.device)
    dense = unpack_24(ones, meta, in_features)  # 1 at both slots of every group
    return torch.nonzero(dense, as_tuple=False)[:, 1].view(out_features, in_features // 2)
