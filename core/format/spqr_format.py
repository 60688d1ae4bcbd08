"""The ``spqr`` storage format (SpQR, Dettmers et al., 2023; math in :mod:`llmpress.quant.spqr`).

For a layer ``name`` with weight [out, in], ``G = in / group_size`` (β1), ``R = out /
stat_group_size`` (β2):

``name.weight``               int32 [out, ceil(in*bits/32)]   codes, packed as in ``int``
with ``stat_bits`` (quantized statistics, one set for the scales and one for the zeros):
``name.weight_scale_codes``   int32 [G, ceil(out*stat_bits/32)]  first-level scale codes,
                              packed along the output dimension
``name.weight_scale_scale``   fp16 [R, G]  second-level scale (> 0)
``name.weight_scale_min``     fp16 [R, G]  second-level minimum (> 0: scales stay positive)
``name.weight_zero_codes``, ``name.weight_zero_scale`` (> 0), ``name.weight_zero_min``: the same
for the (real-valued) zero points
without ``stat_bits``: ``name.weight_scale`` fp16 [out, G] (> 0) and ``name.weight_zero`` uint8
[out, G] (at most ``2**bits - 1``)
with ``nnz`` > 0 outliers (a CSR residual added to the grid's weight):
``name.outlier_values``       fp16 [nnz]
``name.outlier_cols``         int16 [nnz] (int32 when in > 32768), each < in
``name.outlier_rowptr``       int32 [out + 1]

A weight decodes as ``s[g] * (code - z[g])`` (``g = input // group_size``) plus its residual;
statistics decode as ``code * scale[r // β2] + min[r // β2]``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from llmpress.errors import CheckpointError
from llmpress.model.results import LayerResult
from llmpress.quant.packing import pack_int32, packed_int32_width, unpack_int32
from llmpress.quant.spqr import CsrOutliers, StatCodes, col_dtype, decode_weight

if TYPE_CHECKING:
    from llmpress.format.formats import ModuleFormat, Shapes, Values

_STATS = ("scale", "zero")


def spqr_tensors(fmt: ModuleFormat) -> Shapes:
    """Suffix -> (shape, dtype) of a ``spqr`` layer's stored tensors."""
    assert fmt.bits is not None
    o, i, g = fmt.out_features, fmt.in_features, fmt.n_groups
    out: Shapes = {"weight": ((o, packed_int32_width(i, fmt.bits)), torch.int32)}
    if fmt.stat_bits is None:
        out["weight_scale"] = ((o, g), torch.float16)
        out["weight_zero"] = ((o, g), torch.uint8)
    else:
        r = o // int(fmt.stat_group_size or 1)
        for stat in _STATS:
            out[f"weight_{stat}_codes"] = ((g, packed_int32_width(o, fmt.stat_bits)), torch.int32)
            out[f"weight_{stat}_scale"] = ((r, g), torch.float16)
            out[f"weight_{stat}_min"] = ((r, g), torch.float16)
    if fmt.nnz:
        out["outlier_values"] = ((fmt.nnz,), torch.float16)
        out["outlier_cols"] = ((fmt.nnz,), col_dtype(i))
        out["outlier_rowptr"] = ((o + 1,), torch.int32)
    return out


def spqr_values(fmt: ModuleFormat) -> dict[str, Values]:
    """The value rules checked at every load."""
    from llmpress.format.formats import SCALE, Values

    assert fmt.bits is not None
    out: dict[str, Values] = {}
    if fmt.stat_bits is None:
        out = {"weight_scale": SCALE, "weight_zero": Values(at_most=2**fmt.bits - 1)}
    else:
        out = {"weight_scale_scale": SCALE, "weight_scale_min": SCALE, "weight_zero_scale": SCALE}
    if fmt.nnz:
        out["outlier_cols"] = Values(at_most=fmt.in_features - 1)
    return out


def spqr_pack(fmt: ModuleFormat, weight: torch.Tensor, result: LayerResult | None) -> dict[str, torch.Tensor]:
    """The stored tensors of a layer compressed by SpQR (its committed quantization state)."""
    quant = None if result is None else result.quant
    extra = None if quant is None else quant.spqr
    if quant is None or extra is None or fmt.bits is None:
        raise CheckpointError("format 'spqr' needs the layer's SpQR quantization state")
    dev = weight.device
    out = {"weight": pack_int32(quant.codes.to(dev), fmt.bits)}
    if extra.scale_q is None or extra.zero_q is None:
        out["weight_scale"] = quant.scales.to(dev, torch.float16).contiguous()
        out["weight_zero"] = quant.zeros.to(dev).round().to(torch.uint8).contiguous()
    else:
        assert fmt.stat_bits is not None
        for stat, q in zip(_STATS, (extra.scale_q, extra.zero_q)):
            out[f"weight_{stat}_codes"] = pack_int32(q.codes.t().contiguous().to(dev), fmt.stat_bits)
            out[f"weight_{stat}_scale"] = q.scale.to(dev).contiguous()
            out[f"weight_{stat}_min"] = q.low.to(dev).contiguous()
    if extra.outliers is not None and extra.outliers.nnz:
        o = extra.outliers
        out |= {"outlier_values": o.values, "outlier_cols": o.cols, "outlier_rowptr": o.rowptr}
    return {k: v.to(dev).contiguous() for k, v in out.items()}


def spqr_parts(
    fmt: ModuleFormat, t: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, CsrOutliers | None]:
    """Decode a ``spqr`` layer's stored tensors: (codes uint8 [out, in], scales and zeros
    float32 [out, G], outliers or ``None``)."""
    if fmt.format != "spqr" or fmt.bits is None:
        raise CheckpointError(f"spqr_parts needs a 'spqr' layer, got format {fmt.format!r}")
    codes = unpack_int32(t["weight"], fmt.bits, fmt.in_features)
    if fmt.stat_bits is None:
        scales, zeros = t["weight_scale"].float(), t["weight_zero"].float()
    else:
        stats = []
        for stat in _STATS:
            c = unpack_int32(t[f"weight_{stat}_codes"], fmt.stat_bits, fmt.out_features).t()
            stats.append(StatCodes(c, t[f"weight_{stat}_scale"], t[f"weight_{stat}_min"]).decode())
        scales, zeros = stats
    outliers = None
    if fmt.nnz:
        ptr = t["outlier_rowptr"]
        if int(ptr[0]) != 0 or int(ptr[-1]) != fmt.nnz or bool((ptr[1:] < ptr[:-1]).any()):
            raise CheckpointError(
                f"outlier_rowptr of a 'spqr' layer must rise from 0 to nnz={fmt.nnz}; the file was damaged "
                f"or edited: re-download the checkpoint or save it again"
            )
        outliers = CsrOutliers(t["outlier_values"], t["outlier_cols"], ptr)
    return codes, scales, zeros, outliers


def spqr_unpack(fmt: ModuleFormat, t: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """The dense weight [out, in] in ``dtype`` (computed in float32, as the sweep did)."""
    codes, scales, zeros, outliers = spqr_parts(fmt, t)
    return decode_weight(codes, scales, zeros, outliers).to(dtype)
