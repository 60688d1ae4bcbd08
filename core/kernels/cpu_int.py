"""Weight-only integer matmul on CPU through PyTorch's own packed kernels.

* 2 to 4 bits, any group size that is a multiple of 32: ``aten._weight_int4pack_mm_for_cpu``.
  Codes below 16 fit its 4-bit grid whatever the stored width; the kernel computes
  ``(c - 8) * s + z'`` per group, so our ``(c - zero) * s`` is ``z' = s * (8 - zero)`` (exact).
  The kernel takes groups of 32, 64, 128 or 256: a larger group (per channel included) is
  cut into kernel groups sharing one scale. ``N`` is padded to a multiple of 16.
* 5 to 8 bits, one group per channel, ``K`` a multiple of 32: ``aten._weight_int8pack_mm`` (signed codes, one scale per
  output). An asymmetric grid is ``s * (x . (c - 128)) - s * (zero - 128) * sum(x)``.

Both kernels run with bf16 activations (fp16 and fp32 inputs take 10-100x longer on x86
CPUs without AMX): ``x`` is rounded to bf16 and the result returned in ``x``'s dtype, so
results match the dense fp32 layer to bf16 precision (about 3 significant digits).
Above :data:`MAX_ROWS` rows (prefill) the weight is decoded for the call and multiplied
densely, which is faster there.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from llmpress.quant.grid import IntCodes

#: above this many rows a call decodes the weight and runs a dense matmul (measured on a
#: 2-core AVX2 EPYC: the packed kernels win up to ~100 rows for an 8192x2048 layer)
MAX_ROWS = 96
_INT4_GROUPS = (256, 128, 64, 32)


def available() -> bool:
    """Whether the installed torch has the CPU packed kernels."""
    ops = torch.ops.aten
    return all(
        hasattr(ops, name)
        for name in (
            "_weight_int8pack_mm",
            "_weight_int4pack_mm_for_cpu",
            "_convert_weight_to_int4pack_for_cpu",
        )
    )


def supports(bits: int, group_size: int, in_features: int) -> bool:
    """Whether a layer of this grid has a CPU kernel."""
    if bits <= 4:
        return group_size % 32 == 0 and in_features % group_size == 0
    # the int8 kernel reads past rows whose length is not a multiple of 8 (a crash, not an error)
    return bits <= 8 and group_size == in_features and in_features % 32 == 0


@dataclasses.dataclass(frozen=True)
class CpuIntWeight:
    """A layer repacked for one of the CPU kernels."""

    kind: str  # "int4" or "int8"
    packed: torch.Tensor
    scales: torch.Tensor  # int4: bf16 [K/g, N_pad, 2] (scale, zero'); int8: bf16 [N]
    offsets: torch.Tensor | None  # int8 asymmetric: fp32 [N] = scale * (zero - 128)
    group_size: int  # the kernel's group (int4)
    out_features: int
    source: IntCodes  # for the dense path above MAX_ROWS


def _kernel_group(group_size: int) -> int:
    return next(g for g in _INT4_GROUPS if group_size % g == 0)


def repack(q: IntCodes) -> CpuIntWeight:
    """Repack an ``int`` layer's codes once for the CPU kernels (see the module docstring)."""
    n, k = q.codes.shape
    if not supports(q.bits, q.group_size, k):
        raise ValueError(f"no CPU kernel for {q.bits}-bit codes with group size {q.group_size}")
    scale = q.scales.to(torch.float32)
    if q.bits <= 4:
        g = _kernel_group(q.group_size)
        rep = q.group_size // g
        s = scale.repeat_interleave(rep, dim=1)  # [N, K/g]
        z = q.zeros.repeat_interleave(rep, dim=1)
        pad = (-n) % 16
        codes = F.pad(q.codes.to(torch.int32), (0, 0, 0, pad))
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2)
        sz = torch.stack([s, s * (8.0 - z)], dim=-1)  # [N, K/g, 2]
        sz = F.pad(sz, (0, 0, 0, 0, 0, pad)).transpose(0, 1).contiguous().to(torch.bfloat16)
        return CpuIntWeight("int4", packed, sz, None, g, n, q)
    signed = (q.codes.to(torch.int16) - 128).to(torch.int8).contiguous()
    zero = q.zeros[:, 0]
    offsets = None if bool((zero == 128).all()) else (scale[:, 0] * (zero - 128.0)).contiguous()
    return CpuIntWeight(
        "int8", signed, scale[:, 0].to(torch.bfloat16).contiguous(), offsets, q.group_size, n, q
    )


def dense_weight(q: IntCodes, dtype: torch.dtype) -> torch.Tensor:
    """The dense [N, K] weight of ``q``."""
    return q.dequantize(dtype)


def matmul(x: torch.Tensor, w: CpuIntWeight) -> torch.Tensor:
    """``x @ W^T`` for ``x`` [..., K]; returned in ``x``'s dtype."""
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    if x2.shape[0] > MAX_ROWS:
        return F.linear(x, dense_weight(w.source, x.dtype))
    xb = x2.to(torch.bfloat16)
    if w.kind == "int4":
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(xb, w.packed, w.group_size, w.scales)
        y = y[:, : w.out_features]
    else:
        y = torch.ops.aten._weight_int8pack_mm(xb, w.packed, w.scales)
        if w.offsets is not None:
            y = y.float() - xb.float().sum(-1, keepdim=True) * w.offsets
    return y.to(x.dtype).reshape(*lead, w.out_features)
