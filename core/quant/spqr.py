"""SpQR's storage math (Dettmers et al., 2023): quantized statistics, sparse outliers, bits.

A SpQR layer ``W[out, in]`` is stored as

* ``bits``-wide codes ``c[out, in]`` on a grid with one (scale, zero) pair per row and per
  group of ``group_size`` (β1) consecutive inputs: ``W_q = s[g] * (c - z[g])``;
* the statistics ``s, z`` [out, G] themselves quantized (``stat_bits``, e.g. 3) along the
  output dimension in groups of ``stat_group`` (β2) rows, each group with a 16-bit (fp16)
  second-level scale and minimum: ``s = code_s * scale_s + min_s`` (unsigned min/max grid,
  so a decoded first-level scale is never below its group's smallest one, which is > 0);
  with ``stat_bits=None`` the statistics are stored plainly (fp16 scales, uint8 zeros);
* outliers: a sparse CSR residual ``R`` (fp16 values, int16/int32 columns, int32 row
  pointers) that is added, ``W = W_q + R``.

Everything here is pure tensor math shared by the ``spqr`` plugin (which builds these during
its sweep) and the ``spqr`` storage format (which decodes them), so both compute the same
float32 weight, bit for bit.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from llmpress.quant.packing import packed_int32_width

#: bits of a second-level statistic (fp16) and of a stored outlier value (fp16)
STAT2_BITS = 16
VALUE_BITS = 16


@dataclasses.dataclass(frozen=True)
class StatCodes:
    """One statistic (scales or zeros, [out, G]) quantized along the output dimension:
    ``x = codes * scale[r // stat_group] + low[r // stat_group]``."""

    codes: Tensor  # uint8 [out, G]
    scale: Tensor  # fp16 [out / stat_group, G], > 0
    low: Tensor  # fp16 [out / stat_group, G]

    def decode(self) -> Tensor:
        """The float32 statistic [out, G]."""
        rep = self.codes.shape[0] // self.scale.shape[0]
        s = self.scale.float().repeat_interleave(rep, dim=0)  # [out, G]
        lo = self.low.float().repeat_interleave(rep, dim=0)
        return self.codes.float() * s + lo


def quantize_stat(x: Tensor, bits: int, stat_group: int, positive: bool = False) -> StatCodes:
    """Min/max (asymmetric, zero not forced into the range) ``bits``-bit quantization of the
    statistic ``x`` [out, G] in groups of ``stat_group`` consecutive rows, with fp16
    second-level scale and minimum. Columns are independent (a column at a time gives the
    same result as all at once). ``positive``: the minimum is kept > 0 in fp16 (scales), so
    every decoded value is > 0."""
    out_f, n_groups = x.shape
    xg = x.float().reshape(out_f // stat_group, stat_group, n_groups)  # [R, β2, G]
    lo, hi = xg.amin(dim=1), xg.amax(dim=1)  # [R, G]
    maxq = (1 << bits) - 1
    scale = (hi - lo) / maxq
    # a flat group (all equal): any positive scale works, every code is 0
    scale = torch.where(scale > 0, scale, lo.abs().clamp_min(1e-6) * 2**-10)
    scale16, low16 = scale.half(), lo.half()
    tiny = torch.finfo(torch.float16).tiny
    scale16 = torch.where(scale16 > 0, scale16, tiny)  # underflow
    if positive:
        low16 = torch.where(low16 > 0, low16, tiny)
    s = scale16.float().repeat_interleave(stat_group, dim=0)  # [out, G]
    low = low16.float().repeat_interleave(stat_group, dim=0)
    codes = torch.clamp(torch.round((x.float() - low) / s), 0, maxq).to(torch.uint8)
    return StatCodes(codes, scale16, low16)


@dataclasses.dataclass(frozen=True)
class CsrOutliers:
    """A sparse residual [out, in] in CSR form (row-major, columns ascending per row)."""

    values: Tensor  # fp16 [nnz]
    cols: Tensor  # int16 (in <= 32768) or int32 [nnz]
    rowptr: Tensor  # int32 [out + 1]

    @property
    def nnz(self) -> int:
        return int(self.values.numel())

    @classmethod
    def from_dense(cls, residual: Tensor, mask: Tensor) -> CsrOutliers:
        """Outliers at ``mask`` [out, in] with values ``residual[mask]`` (fp16)."""
        rows, cols = torch.nonzero(mask, as_tuple=True)  # row-major
        counts = torch.bincount(rows, minlength=mask.shape[0])
        rowptr = torch.zeros(mask.shape[0] + 1, dtype=torch.int32, device=mask.device)
        rowptr[1:] = torch.cumsum(counts, 0).to(torch.int32)
        return cls(
            residual[mask].half(), cols.to(col_dtype(mask.shape[1])), rowptr
        )  # values in row-major order, as nonzero

    def add_to(self, w: Tensor) -> Tensor:
        """``w`` [out, in] (float32) plus this residual, in place."""
        if self.nnz:
            rows = torch.repeat_interleave(
                torch.arange(w.shape[0], device=w.device), (self.rowptr[1:] - self.rowptr[:-1]).long()
            )
            w[rows, self.cols.long()] += self.values.float()
        return w

    def to_sparse(self, shape: tuple[int, int], dtype: torch.dtype) -> Tensor:
        """A ``torch.sparse_csr`` tensor of ``shape`` in ``dtype``."""
        return torch.sparse_csr_tensor(
            self.rowptr.long(), self.cols.long(), self.values.to(dtype), size=shape, check_invariants=True
        )


def col_dtype(in_features: int) -> torch.dtype:
    """The stored dtype of outlier column indices: int16 when they fit."""
    return torch.int16 if in_features <= 32768 else torch.int32


def decode_weight(
    codes: Tensor, scales: Tensor, zeros: Tensor, outliers: CsrOutliers | None = None
) -> Tensor:
    """The float32 weight [out, in]: ``scales[g] * (codes - zeros[g])`` per group of inputs
    (``g = input // group_size``, group_size = in / G), plus the outliers' residual."""
    n, k = codes.shape
    g = scales.shape[1]
    w = codes.view(n, g, k // g).float()
    w = (w - zeros.float().view(n, g, 1)) * scales.float().view(n, g, 1)
    w = w.reshape(n, k)
    return w if outliers is None else outliers.add_to(w)


@dataclasses.dataclass(frozen=True)
class BitBudget:
    """Stored bits per weight of a SpQR layer, by part (their sum is :attr:`total`)."""

    codes: float
    stats: float  # first-level statistics (quantized or plain)
    stats2: float  # second-level statistics
    outliers: float  # values, column indices and row pointers

    @property
    def total(self) -> float:
        return self.codes + self.stats + self.stats2 + self.outliers

    def as_info(self) -> dict[str, float]:
        """The parts for a report (``LayerResult.info``)."""
        return {
            "avg_bits": self.total,
            "bits_codes": self.codes,
            "bits_stats": self.stats + self.stats2,
            "bits_outliers": self.outliers,
        }


def spqr_bits(
    out_f: int, in_f: int, bits: int, group_size: int, stat_bits: int | None, stat_group: int, nnz: int
) -> BitBudget:
    """What a SpQR layer costs on disk, per weight. With ``stat_bits`` and ``n = out * in``:
    codes ``bits``; statistics ``2 * stat_bits / β1``; second-level ``4 * 16 / (β1 * β2)``;
    outliers ``nnz * (16 + column bits) + 32 * (out + 1)`` (none stored when ``nnz == 0``)
    over ``n``; each rounded up to whole int32 words per packed row, as stored."""
    n = out_f * in_f
    g = in_f // group_size
    codes = out_f * packed_int32_width(in_f, bits) * 32
    if stat_bits is None:
        stats, stats2 = out_f * g * (16 + 8), 0
    else:
        stats = 2 * g * packed_int32_width(out_f, stat_bits) * 32
        stats2 = 4 * (out_f // stat_group) * g * STAT2_BITS
    col_bits = 16 if col_dtype(in_f) == torch.int16 else 32
    outl = nnz * (VALUE_BITS + col_bits) + 32 * (out_f + 1) if nnz else 0
    return BitBudget(codes / n, stats / n, stats2 / n, outl / n)


@dataclasses.dataclass(frozen=True)
class SpqrExtra:
    """What a SpQR layer stores beyond an ``int`` grid: its quantized statistics (``None``
    with plain 16-bit statistics) and its outliers (``None``: none)."""

    stat_bits: int | None
    stat_group: int
    scale_q: StatCodes | None = None
    zero_q: StatCodes | None = None
    outliers: CsrOutliers | None = None

    @property
    def nnz(self) -> int:
        return 0 if self.outliers is None else self.outliers.nnz

    def dequantize(self, codes: Tensor, scales: Tensor, zeros: Tensor) -> Tensor:
        """The float32 weight of these codes and decoded statistics, outliers added."""
        return decode_weight(codes, scales, zeros, self.outliers)

    def to(self, device: torch.device | str) -> SpqrExtra:
        def mv(x: object) -> object:
            if x is None:
                return None
            return type(x)(*(getattr(x, f.name).to(device) for f in dataclasses.fields(x)))  # type: ignore[arg-type]

        return dataclasses.replace(
            self,
            scale_q=mv(self.scale_q),  # type: ignore[arg-type]
            zero_q=mv(self.zero_q),  # type: ignore[arg-type]
            outliers=mv(self.outliers),  # type: ignore[arg-type]
        )
