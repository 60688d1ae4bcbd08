"""Activation quantization (the ``A8`` of W8A8) and the FP8 E4M3 weight grid: pure math.

An activation scheme is one of :data:`SCHEMES`:

* ``int8-dynamic``: per token (each row of ``x``), ``s = max|x_row| / 127``,
  ``q = clamp(round(x / s), -128, 127)``;
* ``int4-dynamic``: per token, ``s = max|x_row| / 7``, ``q = clamp(round(x / s), -8, 7)`` (the
  ``A4`` of W4A4; codes held in int8);
* ``int8-static``: one calibrated scale for the tensor, ``s = input_scale``;
* ``fp8-dynamic``: per token, ``s = max|x_row| / 448``, ``q = fp8_e4m3(x / s)``;
* ``fp8-static``: ``s = input_scale``, values beyond the grid saturate at +-448.

:func:`fake_quantize` returns ``q * s`` in ``x``'s dtype: what a real int8/fp8 GEMM computes
with, up to the order of the fp32 sums. Every W8A8 kernel is tested against it.

:func:`fake_quantize_groups` is the integer KV cache's rounding (``kv_cache: int4|int8``):
symmetric and dynamic, one scale per token and per group of ``group_size`` consecutive
channels of the head dimension (``s = max|x_group| / (2**(bits-1) - 1)``).
"""

from __future__ import annotations

import torch

SCHEMES = ("int8-dynamic", "int8-static", "int4-dynamic", "fp8-dynamic", "fp8-static")
INT8_MAX = 127.0
INT4_MAX = 7.0
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
_EPS = 1e-12


def is_static(scheme: str | None) -> bool:
    return scheme is not None and scheme.endswith("-static")


def grid_max(scheme: str) -> float:
    """The largest code of a scheme's grid (127, 7 or 448)."""
    if scheme.startswith("int4"):
        return INT4_MAX
    return INT8_MAX if scheme.startswith("int8") else FP8_MAX


def activation_bits(scheme: str | None) -> int | None:
    """The bits of a scheme's codes (8 or 4), ``None`` without activation quantization."""
    if scheme is None:
        return None
    return 4 if scheme.startswith("int4") else 8


def static_scale(absmax: torch.Tensor | float, scheme: str) -> torch.Tensor:
    """The per-tensor scale of a static scheme from the calibration inputs' max ``|x|``."""
    m = torch.as_tensor(absmax, dtype=torch.float32).max()
    return (m.clamp_min(_EPS) / grid_max(scheme)).reshape(1)


def quantize(
    x: torch.Tensor, scheme: str, input_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, s)``: codes (int8 for int8 and int4, or fp8 values) and fp32 scales ``[rows, 1]``
    (static: ``[1, 1]``)."""
    xf = x.float()
    if is_static(scheme):
        if input_scale is None:
            raise ValueError(f"scheme {scheme!r} needs the layer's calibrated input_scale")
        s = input_scale.float().reshape(1, 1).to(x.device)
    else:
        s = xf.abs().amax(dim=-1, keepdim=True).clamp_min(_EPS) / grid_max(scheme)
    if scheme.startswith("int"):
        top = grid_max(scheme)
        q = torch.clamp(torch.round(xf / s), -top - 1, top).to(torch.int8)
    else:
        q = torch.clamp(xf / s, -FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, s


def fake_quantize(x: torch.Tensor, scheme: str, input_scale: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` rounded to the scheme's grid, in ``x``'s dtype (the reference of every W8A8 kernel)."""
    q, s = quantize(x, scheme, input_scale)
    return (q.float() * s).to(x.dtype)


def fake_quantize_groups(x: torch.Tensor, bits: int, group_size: int | None = None) -> torch.Tensor:
    """``x`` [..., d] rounded symmetrically to ``bits`` with one dynamic scale per group of
    ``group_size`` consecutive entries of its last dimension (``None``: the whole of it), in
    ``x``'s dtype: the integer KV cache's rounding of each token's key or value head."""
    d = x.shape[-1]
    g = d if group_size is None else int(group_size)
    if g <= 0 or d % g:
        raise ValueError(f"group_size {group_size} does not divide the last dimension {d}")
    top = float(2 ** (bits - 1) - 1)
    xf = x.float().reshape(*x.shape[:-1], d // g, g)
    s = xf.abs().amax(dim=-1, keepdim=True).clamp_min(_EPS) / top
    q = torch.clamp(torch.round(xf / s), -top - 1, top)
    return (q * s).reshape(x.shape).to(x.dtype)


def fp8_weight(weight: torch.Tensor, per_channel: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """E4M3 weights: ``(w_fp8 [out, in], scale fp32 [out, 1])``, ``w ~= w_fp8 * scale``.

    ``per_channel=False`` uses one scale for the tensor (repeated per row)."""
    w = weight.float()
    absmax = w.abs().amax(dim=1, keepdim=True) if per_channel else w.abs().amax().expand(w.shape[0], 1)
    scale = absmax.clamp_min(_EPS) / FP8_MAX
    return torch.clamp(w / scale, -FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale.contiguous()
