"""Group-wise uniform (min/max) quantization grids.

The math follows the GPTQ reference ``quant.py`` (Frantar et al., 2022):

* the grid of a row always contains 0 (``xmin <= 0 <= xmax``);
* ``scale = (xmax - xmin) / maxq`` with ``maxq = 2**bits - 1``;
* asymmetric: ``zero = round(-xmin / scale)``, an integer in ``[0, maxq]``;
  symmetric: ``zero = (maxq + 1) / 2`` (this keeps the reference's quirk that a
  row with no negative entry keeps ``xmin = 0``, so its positive range is only
  about half of ``xmax``);
* ``code = clamp(round(w / scale) + zero, 0, maxq)``, ``w_hat = scale * (code - zero)``.

Because the zero point is an integer inside ``[0, maxq]``, a weight that is
exactly ``0`` quantizes to ``code == zero`` and dequantizes to exactly ``0``
(asymmetric, and also symmetric since ``(maxq + 1) / 2`` is an integer <= maxq).
This is how pruned weights stay pruned after quantization.

Weights are ``W[out_features, in_features]``; groups are contiguous runs of
``group_size`` input columns (``group_size == -1``: one group per output row).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "QuantSpec",
    "check_spec",
    "grid_problem",
    "compute_qparams",
    "quantize",
    "dequantize",
    "default_g_idx",
    "group_qparams",
    "quantize_weight",
    "dequantize_weight",
]

_COMMON_GROUP_SIZES = (8, 16, 32, 64, 128, 256, 512, 1024)


@dataclass(frozen=True)
class QuantSpec:
    """Uniform quantization settings.

    bits: code width in [2, 8]. group_size: -1 for one group per output channel,
    else the number of contiguous input columns sharing one (scale, zero) pair
    (typically 32/64/128; must divide in_features, see ``check_spec``).
    symmetric: use the symmetric grid (fixed zero point ``2**(bits-1)``).
    """

    bits: int = 4
    group_size: int = 128
    symmetric: bool = False

    def __post_init__(self) -> None:
        problem = grid_problem(self.bits, self.group_size, self.symmetric)
        if problem is not None:
            raise ValueError(problem)

    @property
    def maxq(self) -> int:
        """Largest code value, ``2**bits - 1``."""
        return (1 << self.bits) - 1

    def n_groups(self, in_features: int) -> int:
        """Number of groups along the input dimension (1 for per-channel)."""
        return 1 if self.group_size == -1 else in_features // self.group_size


def grid_problem(bits: object, group_size: object, symmetric: object) -> str | None:
    """What is wrong with these grid settings (a message naming the fix), or ``None``.

    The one place quantization grid options are validated: :class:`QuantSpec`, every
    quantization method's config and checkpoint loading all ask here.
    """
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        return f"bits must be an integer from 2 to 8, got {bits!r}"
    if (
        isinstance(group_size, bool)
        or not isinstance(group_size, int)
        or (group_size != -1 and group_size < 1)
    ):
        return (
            f"group_size must be -1 (per output channel) or a positive integer such as 128, "
            f"got {group_size!r}"
        )
    if not isinstance(symmetric, bool):
        return f"symmetric must be true or false, got {symmetric!r}"
    return None


def check_spec(spec: QuantSpec, in_features: int, name: str) -> None:
    """Raise ValueError unless ``spec`` can quantize a module with ``in_features`` columns.

    Groups must tile the input dimension exactly (no partial last group).
    """
    if in_features < 1:
        raise ValueError(f"module {name!r}: in_features must be >= 1, got {in_features}")
    gs = spec.group_size
    if gs == -1 or in_features % gs == 0:
        return
    valid = [g for g in _COMMON_GROUP_SIZES if g <= in_features and in_features % g == 0]
    hint = ", ".join(["-1 (per output channel)"] + [str(g) for g in valid])
    raise ValueError(
        f"module {name!r}: in_features={in_features} is not divisible by group_size={gs} "
        f"(partial groups are not supported); valid group sizes include: {hint}; or exclude "
        f"the module with 'ignore'"
    )


def compute_qparams(w: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """Per-row min/max grid of ``w[rows, cols]`` -> (scale[rows, 1], zero[rows, 1]), float32.

    ``zero`` holds integer values (stored as float), exactly as in the GPTQ reference.
    """
    if w.dim() != 2:
        raise ValueError(f"compute_qparams expects a 2-D tensor [rows, cols], got {tuple(w.shape)}")
    maxq = spec.maxq
    w = w.float()
    zero_ = torch.zeros(w.shape[0], device=w.device)
    xmin = torch.minimum(w.min(dim=1).values, zero_)  # (rows,)
    xmax = torch.maximum(w.max(dim=1).values, zero_)  # (rows,)
    if spec.symmetric:
        xmax = torch.maximum(xmin.abs(), xmax)
        neg = xmin < 0
        xmin = torch.where(neg, -xmax, xmin)
    dead = (xmin == 0) & (xmax == 0)
    xmin = torch.where(dead, -1.0, xmin)
    xmax = torch.where(dead, 1.0, xmax)
    scale = (xmax - xmin) / maxq  # (rows,)
    zero = torch.full_like(scale, (maxq + 1) / 2) if spec.symmetric else torch.round(-xmin / scale)
    return scale.unsqueeze(1), zero.unsqueeze(1)


def quantize(w: Tensor, scale: Tensor, zero: Tensor, maxq: int) -> Tensor:
    """Codes ``clamp(round(w / scale) + zero, 0, maxq)`` as uint8 (same shape as broadcast)."""
    q = torch.clamp(torch.round(w / scale) + zero, 0, int(maxq))
    return q.to(torch.uint8)


def dequantize(codes: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    """Grid values ``scale * (codes - zero)`` (float)."""
    return scale * (codes.to(scale.dtype) - zero)


def default_g_idx(in_features: int, group_size: int, device: torch.device | str | None = None) -> Tensor:
    """Group index of each input column: ``arange(in) // group_size`` (zeros if per-channel), int32."""
    idx = torch.arange(in_features, device=device, dtype=torch.int32)
    if group_size == -1:
        return torch.zeros_like(idx)
    return idx // group_size


def group_qparams(W: Tensor, spec: QuantSpec, name: str = "weight") -> tuple[Tensor, Tensor]:
    """RTN grid per contiguous group: W[out, in] -> (scales[out, n_groups], zeros[out, n_groups])."""
    if W.dim() != 2:
        raise ValueError(f"{name!r}: expected a 2-D weight [out, in], got {tuple(W.shape)}")
    out_f, in_f = W.shape
    check_spec(spec, in_f, name)
    if spec.group_size == -1:
        return compute_qparams(W, spec)  # (out, 1) each
    n_groups = in_f // spec.group_size
    flat = W.reshape(out_f * n_groups, spec.group_size)  # (out * n_groups, group_size)
    scale, zero = compute_qparams(flat, spec)  # (out * n_groups, 1)
    return scale.reshape(out_f, n_groups), zero.reshape(out_f, n_groups)


def _expand(scales: Tensor, zeros: Tensor, g_idx: Tensor) -> tuple[Tensor, Tensor]:
    """Per-column grid: scales/zeros[out, n_groups] -> [out, in] via g_idx[in]."""
    if scales.shape != zeros.shape or scales.dim() != 2:
        raise ValueError(
            f"scales and zeros must both be [out, n_groups], got {tuple(scales.shape)} and {tuple(zeros.shape)}"
        )
    g = g_idx.to(device=scales.device, dtype=torch.long)
    if g.numel() and (int(g.min()) < 0 or int(g.max()) >= scales.shape[1]):
        raise ValueError(
            f"g_idx values must be in [0, {scales.shape[1]}), got [{int(g.min())}, {int(g.max())}]"
        )
    return scales[:, g].float(), zeros[:, g].float()


def quantize_weight(
    W: Tensor,
    spec: QuantSpec,
    scales: Tensor | None = None,
    zeros: Tensor | None = None,
    g_idx: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Quantize W[out, in] -> (codes uint8 [out, in], scales [out, n_groups], zeros [out, n_groups]).

    Without ``scales``/``zeros`` this is round-to-nearest (RTN) with ``group_qparams``.
    ``g_idx`` (int [in]) maps each column to its group; default contiguous groups.
    """
    if W.dim() != 2:
        raise ValueError(f"quantize_weight expects W[out, in], got {tuple(W.shape)}")
    if (scales is None) != (zeros is None):
        raise ValueError("pass both scales and zeros, or neither")
    if scales is None:
        scales, zeros = group_qparams(W, spec)
    assert zeros is not None
    if g_idx is None:
        check_spec(spec, W.shape[1], "weight")
        g_idx = default_g_idx(W.shape[1], spec.group_size, W.device)
    if g_idx.shape != (W.shape[1],):
        raise ValueError(f"g_idx must have shape ({W.shape[1]},), got {tuple(g_idx.shape)}")
    s, z = _expand(scales, zeros, g_idx)  # (out, in) each
    if s.shape[0] != W.shape[0]:
        raise ValueError(f"scales has {s.shape[0]} rows but W has {W.shape[0]}")
    codes = quantize(W.float(), s, z, spec.maxq)  # (out, in) uint8
    return codes, scales, zeros


def dequantize_weight(
    codes: Tensor,
    scales: Tensor,
    zeros: Tensor,
    group_size: int,
    g_idx: Tensor | None = None,
) -> Tensor:
    """Rebuild W_hat[out, in] (float32) from codes[out, in] and per-group scales/zeros[out, n_groups].

    ``g_idx`` (int32 [in]) gives each column's group (act-order); default ``arange(in) // group_size``.
    """
    if codes.dim() != 2:
        raise ValueError(f"dequantize_weight expects codes[out, in], got {tuple(codes.shape)}")
    in_f = codes.shape[1]
    if g_idx is None:
        if group_size != -1 and (group_size < 1 or in_f % group_size != 0):
            raise ValueError(f"group_size={group_size} does not tile in_features={in_f}")
        g_idx = default_g_idx(in_f, group_size, codes.device)
    if g_idx.shape != (in_f,):
        raise ValueError(f"g_idx must have shape ({in_f},), got {tuple(g_idx.shape)}")
    s, z = _expand(scales, zeros, g_idx)  # (out, in) each
    if s.shape[0] != codes.shape[0]:
        raise ValueError(f"scales has {s.shape[0]} rows but codes has {codes.shape[0]}")
    return dequantize(codes, s, z)


@dataclasses.dataclass(frozen=True)
class IntCodes:
    """The integer grid of an ``int`` layer, unpacked: ``W = (codes - zeros[g]) * scales[g]``
    with ``g = input // group_size`` (what kernels repack from)."""

    codes: torch.Tensor  # uint8 [out, in]
    scales: torch.Tensor  # [out, G], the stored dtype
    zeros: torch.Tensor  # float32 [out, G] (2**(bits-1) when symmetric)
    bits: int
    group_size: int  # in_features when per channel

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """The dense weight [out, in] in ``dtype`` (broadcast per group: no gathers)."""
        n, k = self.codes.shape
        g = k // self.group_size
        w = self.codes.view(n, g, self.group_size).to(torch.float32)
        w.sub_(self.zeros.view(n, g, 1)).mul_(self.scales.view(n, g, 1).to(torch.float32))
        return w.view(n, k).to(dtype)
