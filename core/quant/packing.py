"""Dense bit packing for quantized codes, sparsity bitmasks and 2:4 sparse weights.

Layouts (all row-wise: each row of ``[out, in]`` is packed independently):

* ``pack_int32``: a little-endian bitstream. Code ``i`` of a row occupies stream
  bits ``[i*bits, (i+1)*bits)``; stream bit ``t`` is bit ``t % 32`` of int32 word
  ``t // 32``. For bits in {2, 4, 8} no code straddles a word (value ``j`` of a
  word sits at bits ``[j*bits, (j+1)*bits)``, ``32 // bits`` values per word);
  for 3, 5, 6, 7 codes straddle words, so a row uses exactly
  ``ceil(in * bits / 32)`` words. Words are stored as (two's complement) int32.
* ``pack_uint8_nibbles``: two 4-bit codes per byte, even index in the low nibble.
* ``pack_bitmask``: bit ``j`` (LSB first) of byte ``k`` is column ``8k + j``.
* ``pack_24``: for each group of 4 input columns, 2 values plus their 2 column
  indices (``idx0 < idx1``, 2 bits each, ``idx0`` in bits 0-1, ``idx1`` in bits 2-3);
  group ``2k`` is the low nibble of meta byte ``k``, group ``2k+1`` the high one.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "packed_int32_width",
    "pack_int32",
    "unpack_int32",
    "pack_bitmask",
    "unpack_bitmask",
    "pack_24",
    "unpack_24",
]

_WORD_MASK = 0xFFFFFFFF


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an int in [1, 8], got {bits!r}")


def _check_codes(codes: Tensor, bits: int) -> None:
    if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
        raise ValueError(f"codes must have an integer dtype, got {codes.dtype}")
    if codes.dim() < 1:
        raise ValueError("codes must have at least one dimension")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= (1 << bits)):
        raise ValueError(
            f"codes must be in [0, {(1 << bits) - 1}] for bits={bits}, "
            f"got [{int(codes.min())}, {int(codes.max())}]"
        )


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def packed_int32_width(in_features: int, bits: int) -> int:
    """Words per row written by ``pack_int32``: ``ceil(in_features * bits / 32)``."""
    return _ceil_div(in_features * bits, 32)


def pack_int32(codes: Tensor, bits: int) -> Tensor:
    """Pack codes[..., in] (uint8/int, values < 2**bits) -> int32[..., ceil(in*bits/32)]."""
    _check_bits(bits)
    _check_codes(codes, bits)
    *lead, in_f = codes.shape
    rows = codes.reshape(math.prod(lead), in_f).to(torch.int64)  # (R, in)
    n_blk = _ceil_div(in_f, 32)  # a block of 32 codes fills exactly `bits` words
    rows = torch.nn.functional.pad(rows, (0, n_blk * 32 - in_f))
    blk = rows.reshape(rows.shape[0], n_blk, 32)  # (R, n_blk, 32)
    words = torch.zeros(rows.shape[0], n_blk, bits, dtype=torch.int64, device=codes.device)
    for j in range(32):
        k, s = divmod(j * bits, 32)
        v = blk[:, :, j]  # (R, n_blk)
        words[:, :, k] |= (v << s) & _WORD_MASK
        if s + bits > 32:  # straddles into the next word
            words[:, :, k + 1] |= v >> (32 - s)
    words = words.reshape(rows.shape[0], n_blk * bits)[:, : packed_int32_width(in_f, bits)]
    words = torch.where(words >= 1 << 31, words - (1 << 32), words)  # wrap to signed
    return words.to(torch.int32).reshape(*lead, words.shape[1])


def unpack_int32(packed: Tensor, bits: int, in_features: int) -> Tensor:
    """Inverse of ``pack_int32``: int32[..., ceil(in*bits/32)] -> uint8[..., in_features]."""
    _check_bits(bits)
    if packed.dtype != torch.int32 or packed.dim() < 1:
        raise ValueError(f"packed must be an int32 tensor with >= 1 dim, got {packed.dtype}")
    width = packed_int32_width(in_features, bits)
    if packed.shape[-1] != width:
        raise ValueError(
            f"packed has {packed.shape[-1]} words per row, expected {width} "
            f"for in_features={in_features}, bits={bits}"
        )
    *lead, _ = packed.shape
    words = packed.reshape(math.prod(lead), width).to(torch.int64) & _WORD_MASK  # (R, width), unsigned
    n_blk = _ceil_div(in_features, 32)
    words = torch.nn.functional.pad(words, (0, n_blk * bits - width))
    words = words.reshape(words.shape[0], n_blk, bits)  # (R, n_blk, bits)
    mask = (1 << bits) - 1
    out = torch.empty(words.shape[0], n_blk, 32, dtype=torch.uint8, device=packed.device)
    for j in range(32):
        k, s = divmod(j * bits, 32)
        v = words[:, :, k] >> s
        if s + bits > 32:
            v = v | (words[:, :, k + 1] << (32 - s))
        out[:, :, j] = (v & mask).to(torch.uint8)
    return out.reshape(out.shape[0], n_blk * 32)[:, :in_features].reshape(*lead, in_features)


def pack_bitmask(mask: Tensor) -> Tensor:
    """bool mask[..., in] -> uint8[..., ceil(in/8)]; bit j of byte k is column 8k + j."""
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor, got {mask.dtype}")
    in_f = mask.shape[-1]
    m = torch.nn.functional.pad(mask.to(torch.uint8), (0, _ceil_div(in_f, 8) * 8 - in_f))
    m = m.unflatten(-1, (-1, 8))  # (..., n_bytes, 8)
    weights = torch.tensor([1 << j for j in range(8)], dtype=torch.uint8, device=mask.device)
    return (m * weights).sum(dim=-1, dtype=torch.int32).to(torch.uint8)


def unpack_bitmask(bits: Tensor, in_features: int) -> Tensor:
    """Inverse of ``pack_bitmask``: uint8[..., ceil(in/8)] -> bool[..., in_features]."""
    if bits.dtype != torch.uint8:
        raise ValueError(f"bitmask must be uint8, got {bits.dtype}")
    if bits.shape[-1] != _ceil_div(in_features, 8):
        raise ValueError(f"bitmask has {bits.shape[-1]} bytes per row, expected {_ceil_div(in_features, 8)}")
    shifts = torch.arange(8, dtype=torch.uint8, device=bits.device)
    m = (bits.unsqueeze(-1) >> shifts) & 1  # (..., n_bytes, 8)
    return m.flatten(-2)[..., :in_features].bool()


def pack_24(W: Tensor) -> tuple[Tensor, Tensor]:
    """2:4 weight W[out, in] -> (values[out, in/2], meta uint8[out, ceil(in/8)]).

    Every group of 4 consecutive input columns must have <= 2 nonzeros. Each
    group stores 2 slots (nonzeros first, padded with zero entries) in column order.
    """
    if W.dim() != 2 or W.shape[1] % 4 != 0:
        raise ValueError(f"pack_24 expects W[out, in] with in % 4 == 0, got {tuple(W.shape)}")
    out_f, in_f = W.shape
    n_grp = in_f // 4
    G = W.reshape(out_f, n_grp, 4)  # (out, n_grp, 4)
    nz = G != 0
    count = nz.sum(dim=-1)  # (out, n_grp)
    bad = count > 2
    if bool(bad.any()):
        r, g = (int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"weight is not 2:4 sparse: {int(bad.sum())} group(s) of 4 have > 2 nonzeros; "
            f"first at row {r}, columns [{4 * g}, {4 * g + 4}) with {int(count[r, g])} nonzeros"
        )
    # stable sort puts nonzeros first, each part in column order; keep 2 slots
    order = torch.sort((~nz).to(torch.uint8), dim=-1, stable=True).indices[..., :2]
    idx = torch.sort(order, dim=-1).values  # (out, n_grp, 2), idx0 < idx1
    values = G.gather(-1, idx).reshape(out_f, 2 * n_grp)  # (out, in/2)
    nib = (idx[..., 0] | (idx[..., 1] << 2)).to(torch.uint8)  # (out, n_grp)
    nib = torch.nn.functional.pad(nib, (0, n_grp % 2))
    meta = nib[:, 0::2] | (nib[:, 1::2] << 4)  # (out, ceil(n_grp/2))
    return values, meta


def unpack_24(values: Tensor, meta: Tensor, in_features: int) -> Tensor:
    """Inverse of ``pack_24``: values[out, in/2], meta[out, ceil(in/8)] -> dense [out, in]."""
    if in_features % 4 != 0:
        raise ValueError(f"in_features must be a multiple of 4, got {in_features}")
    n_grp = in_features // 4
    if values.dim() != 2 or values.shape[1] != 2 * n_grp:
        raise ValueError(f"values must be [out, {2 * n_grp}], got {tuple(values.shape)}")
    if meta.dtype != torch.uint8 or meta.shape != (values.shape[0], _ceil_div(n_grp, 2)):
        raise ValueError(
            f"meta must be uint8 [{values.shape[0]}, {_ceil_div(n_grp, 2)}], got {meta.dtype} {tuple(meta.shape)}"
        )
    nib = torch.stack([meta & 0xF, meta >> 4], dim=-1).flatten(-2)[:, :n_grp]  # (out, n_grp)
    idx = torch.stack([nib & 3, (nib >> 2) & 3], dim=-1).long()  # (out, n_grp, 2)
    if bool((idx[..., 0] >= idx[..., 1]).any()):
        raise ValueError("corrupt 2:4 metadata: slot indices must satisfy idx0 < idx1")
    out = torch.zeros(values.shape[0], n_grp, 4, dtype=values.dtype, device=values.device)
    out.scatter_(-1, idx, values.reshape(values.shape[0], n_grp, 2))
    return out.reshape(values.shape[0], in_features)
