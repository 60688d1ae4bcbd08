"""Property tests for llmpress.quant.packing (bit packing, bitmasks, 2:4)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llmpress.quant.packing import (
    pack_24,
    pack_bitmask,
    pack_int32,
    packed_int32_width,
    unpack_24,
    unpack_bitmask,
    unpack_int32,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
SETTINGS = settings(max_examples=50, deadline=None)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _reference_pack_row(row: list[int], bits: int) -> list[int]:
    """Bit-by-bit oracle: one big integer little-endian bitstream, cut into signed int32 words."""
    stream = sum(v << (i * bits) for i, v in enumerate(row))
    words = []
    for k in range(-(-len(row) * bits // 32)):
        w = (stream >> (32 * k)) & 0xFFFFFFFF
        words.append(w - (1 << 32) if w >= 1 << 31 else w)
    return words


rows_st = st.integers(1, 17)
in_st = st.integers(1, 200)
seed_st = st.integers(0, 2**31 - 1)


# --------------------------------------------------------------------------- int32 bitstream


@SETTINGS
@given(rows_st, in_st, st.integers(1, 8), seed_st, st.sampled_from([torch.uint8, torch.int32, torch.int64]))
def test_pack_int32_roundtrip_and_layout(
    rows: int, in_f: int, bits: int, seed: int, dtype: torch.dtype
) -> None:
    codes = torch.randint(0, 1 << bits, (rows, in_f), generator=_gen(seed)).to(dtype)
    packed = pack_int32(codes, bits)
    assert packed.dtype == torch.int32
    assert packed.shape == (rows, -(-in_f * bits // 32)) == (rows, packed_int32_width(in_f, bits))
    for r in range(min(rows, 3)):
        assert packed[r].tolist() == _reference_pack_row(codes[r].tolist(), bits)
    out = unpack_int32(packed, bits, in_f)
    assert out.dtype == torch.uint8 and torch.equal(out, codes.to(torch.uint8))


@SETTINGS
@given(rows_st, in_st, st.integers(1, 8))
def test_pack_int32_all_ones_sign_bit(rows: int, in_f: int, bits: int) -> None:
    codes = torch.full((rows, in_f), (1 << bits) - 1, dtype=torch.uint8)
    packed = pack_int32(codes, bits)
    if in_f * bits >= 32:
        assert packed[0, 0].item() == -1  # all 32 bits set -> sign bit handled
    assert torch.equal(unpack_int32(packed, bits, in_f), codes)


def test_pack_int32_known_layouts() -> None:
    c4 = torch.arange(1, 9, dtype=torch.uint8)[None]  # 8 nibbles -> 0x87654321
    assert pack_int32(c4, 4).item() == 0x87654321 - (1 << 32)
    c8 = torch.tensor([[0x01, 0x02, 0x03, 0xFF]], dtype=torch.uint8)
    assert pack_int32(c8, 8).item() == 0xFF030201 - (1 << 32)
    c2 = torch.tensor([[1, 2, 3]], dtype=torch.uint8)
    assert pack_int32(c2, 2).item() == 0b111001
    # 3-bit: code 10 occupies stream bits [30, 33) -> straddles words 0 and 1
    c3 = torch.zeros(1, 11, dtype=torch.uint8)
    c3[0, 10] = 0b111
    assert pack_int32(c3, 3).tolist() == [[-(1 << 31) + (1 << 30), 1]]


def test_pack_int32_leading_dims_and_empty() -> None:
    codes = torch.randint(0, 8, (2, 3, 45), generator=_gen(0), dtype=torch.uint8)
    packed = pack_int32(codes, 3)
    assert packed.shape == (2, 3, 5)
    assert torch.equal(unpack_int32(packed, 3, 45), codes)
    empty = torch.zeros(0, 45, dtype=torch.uint8)
    assert torch.equal(unpack_int32(pack_int32(empty, 5), 5, 45), empty)


def test_pack_int32_validation() -> None:
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        pack_int32(torch.tensor([[16]]), 4)
    with pytest.raises(ValueError):
        pack_int32(torch.tensor([[-1]]), 4)
    with pytest.raises(ValueError, match="integer"):
        pack_int32(torch.tensor([[1.0]]), 4)
    with pytest.raises(ValueError, match="bits"):
        pack_int32(torch.tensor([[1]]), 9)
    with pytest.raises(ValueError, match="expected 2"):
        unpack_int32(torch.zeros(1, 3, dtype=torch.int32), 4, 16)
    with pytest.raises(ValueError, match="int32"):
        unpack_int32(torch.zeros(1, 2, dtype=torch.int64), 4, 16)


# --------------------------------------------------------------------------- bitmask / sparse


@SETTINGS
@given(rows_st, in_st, seed_st, st.floats(0.0, 1.0))
def test_bitmask_roundtrip_and_layout(rows: int, in_f: int, seed: int, density: float) -> None:
    mask = torch.rand(rows, in_f, generator=_gen(seed)) < density
    packed = pack_bitmask(mask)
    assert packed.dtype == torch.uint8 and packed.shape == (rows, -(-in_f // 8))
    col = in_f - 1  # bit j of byte k is column 8k + j
    assert torch.equal(((packed[:, col // 8] >> (col % 8)) & 1).bool(), mask[:, col])
    assert torch.equal(unpack_bitmask(packed, in_f), mask)


def test_bitmask_known_layout() -> None:
    mask = torch.zeros(1, 10, dtype=torch.bool)
    mask[0, [0, 7, 9]] = True
    assert pack_bitmask(mask).tolist() == [[0x81, 0x02]]


# --------------------------------------------------------------------------- 2:4


def _random_24(rows: int, in_f: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Random weight where each group of 4 columns keeps 0, 1 or 2 entries."""
    gen = _gen(seed)
    W = torch.randn(rows, in_f // 4, 4, generator=gen)
    rank = torch.rand(rows, in_f // 4, 4, generator=gen).argsort(-1).argsort(-1)  # random permutation
    keep = torch.randint(0, 3, (rows, in_f // 4, 1), generator=gen)  # nnz per group
    return (W * (rank < keep)).reshape(rows, in_f).to(dtype)


@SETTINGS
@given(rows_st, st.integers(1, 40), seed_st, st.sampled_from([torch.float32, torch.float16]))
def test_24_roundtrip(rows: int, n_grp: int, seed: int, dtype: torch.dtype) -> None:
    in_f = 4 * n_grp
    W = _random_24(rows, in_f, seed, dtype)
    values, meta = pack_24(W)
    assert values.shape == (rows, in_f // 2) and values.dtype == dtype
    assert meta.dtype == torch.uint8 and meta.shape == (rows, -(-in_f // 8))
    idx0, idx1 = meta[:, 0] & 3, (meta[:, 0] >> 2) & 3
    assert (idx0 < idx1).all()
    assert torch.equal(unpack_24(values, meta, in_f), W)
    assert int((values != 0).sum()) == int((W != 0).sum())


def test_24_known_layout() -> None:
    W = torch.tensor([[0.0, 5.0, 0.0, 7.0, 0.0, 0.0, 3.0, 0.0]])
    values, meta = pack_24(W)
    assert values.tolist() == [[5.0, 7.0, 0.0, 3.0]]  # group 1 pads with its first zero (col 4)
    assert meta.tolist() == [[(1 | 3 << 2) | (0 | 2 << 2) << 4]]


@SETTINGS
@given(rows_st, st.integers(1, 40), seed_st)
def test_24_violation_raises(rows: int, n_grp: int, seed: int) -> None:
    W = _random_24(rows, 4 * n_grp, seed)
    gen = _gen(seed + 1)
    r, g = int(torch.randint(0, rows, (1,), generator=gen)), int(torch.randint(0, n_grp, (1,), generator=gen))
    W[r, 4 * g : 4 * g + 3] = 1.0  # three nonzeros in one group
    with pytest.raises(ValueError, match="not 2:4"):
        pack_24(W)


def test_24_validation() -> None:
    with pytest.raises(ValueError, match=r"row 1, columns \[4, 8\)"):
        pack_24(torch.tensor([[1.0, 1, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 1, 1, 1, 0]]))
    with pytest.raises(ValueError, match="% 4"):
        pack_24(torch.zeros(2, 6))
    values, meta = pack_24(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="corrupt"):
        unpack_24(values, torch.zeros_like(meta), 4)


# --------------------------------------------------------------------------- devices


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_on_device_matches_cpu(device: str, bits: int) -> None:
    codes = torch.randint(0, 1 << bits, (9, 131), generator=_gen(bits), dtype=torch.uint8)
    packed = pack_int32(codes.to(device), bits)
    assert packed.device.type == device
    assert torch.equal(packed.cpu(), pack_int32(codes, bits))
    assert torch.equal(unpack_int32(packed, bits, 131).cpu(), codes)
    mask = codes.to(device) > 0
    assert torch.equal(unpack_bitmask(pack_bitmask(mask), 131), mask)
    W = _random_24(9, 132, bits).to(device)
    values, meta = pack_24(W)
    assert torch.equal(unpack_24(values, meta, 132), W)
