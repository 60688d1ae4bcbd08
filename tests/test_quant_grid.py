"""Property tests for llmpress.quant.grid (uniform group-wise quantization)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llmpress.quant.grid import (
    QuantSpec,
    check_spec,
    compute_qparams,
    dequantize,
    dequantize_weight,
    group_qparams,
    quantize,
    quantize_weight,
)

GROUP_SIZES = [-1, 8, 16, 32, 64, 128]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def fake_quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Quantize then dequantize in one step (the reference ``quantize``); returns float."""
    q = torch.clamp(torch.round(w / scale) + zero, 0, int(maxq))
    return scale * (q - zero)


def _reference_qparams(x: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Verbatim logic of GPTQ ``Quantizer.find_params`` (perchannel, no MSE search)."""
    maxq = torch.tensor(2**bits - 1)
    tmp = torch.zeros(x.shape[0])
    xmin = torch.minimum(x.min(1)[0], tmp)
    xmax = torch.maximum(x.max(1)[0], tmp)
    if sym:
        xmax = torch.maximum(torch.abs(xmin), xmax)
        tmp = xmin < 0
        if torch.any(tmp):
            xmin[tmp] = -xmax[tmp]
    tmp = (xmin == 0) & (xmax == 0)
    xmin[tmp] = -1
    xmax[tmp] = +1
    scale = (xmax - xmin) / maxq
    zero = torch.full_like(scale, (maxq + 1) / 2) if sym else torch.round(-xmin / scale)
    return scale.unsqueeze(1), zero.unsqueeze(1)


@st.composite
def weights(draw: st.DrawFn) -> tuple[torch.Tensor, QuantSpec]:
    """A random weight W[out, in] with sprinkled exact zeros / zero rows, plus a valid spec."""
    bits = draw(st.integers(2, 8))
    gs = draw(st.sampled_from(GROUP_SIZES))
    n_groups = draw(st.integers(1, 4))
    in_f = n_groups * gs if gs > 0 else draw(st.integers(1, 200))
    out_f = draw(st.integers(1, 17))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    scale = draw(st.sampled_from([1e-3, 1.0, 50.0]))
    W = torch.randn(out_f, in_f, generator=gen) * scale
    kind = draw(st.sampled_from(["dense", "sparse", "positive", "negative", "zero_row"]))
    if kind == "sparse":
        W = W * (torch.rand(out_f, in_f, generator=gen) < 0.5)
    elif kind == "positive":
        W = W.abs()
    elif kind == "negative":
        W = -W.abs()
    elif kind == "zero_row":
        W[0] = 0
    spec = QuantSpec(bits=bits, group_size=gs, symmetric=draw(st.booleans()))
    return W, spec


# --------------------------------------------------------------------------- spec


@pytest.mark.parametrize("bits", [0, 1, 9, 16, 2.5, True, "4"])
def test_spec_rejects_bad_bits(bits: object) -> None:
    with pytest.raises(ValueError, match="bits"):
        QuantSpec(bits=bits, group_size=128)  # type: ignore[arg-type]


@pytest.mark.parametrize("gs", [0, -2, -128, 1.5, True])
def test_spec_rejects_bad_group_size(gs: object) -> None:
    with pytest.raises(ValueError, match="group_size"):
        QuantSpec(bits=4, group_size=gs)  # type: ignore[arg-type]


def test_spec_basics() -> None:
    spec = QuantSpec(bits=3, group_size=-1)
    assert spec.maxq == 7 and spec.n_groups(100) == 1
    assert QuantSpec(4, 32).n_groups(128) == 4
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.bits = 4  # type: ignore[misc]


@settings(max_examples=50, deadline=None)
@given(in_f=st.integers(1, 5000), gs=st.sampled_from(GROUP_SIZES + [7, 100]))
def test_check_spec(in_f: int, gs: int) -> None:
    spec = QuantSpec(bits=4, group_size=gs)
    if gs == -1 or in_f % gs == 0:
        check_spec(spec, in_f, "model.layers.0.mlp.down_proj")
        return
    with pytest.raises(ValueError) as exc:
        check_spec(spec, in_f, "model.layers.0.mlp.down_proj")
    msg = str(exc.value)
    assert "model.layers.0.mlp.down_proj" in msg and str(in_f) in msg and str(gs) in msg
    assert "-1" in msg  # per-channel is always suggested
    for g in (32, 64, 128):
        assert (f" {g}" in msg) == (in_f % g == 0 and g <= in_f)


def test_check_spec_message_example() -> None:
    with pytest.raises(ValueError, match=r"'fc'.*4544.*128.*32, 64"):
        check_spec(QuantSpec(4, 128), 4544, "fc")


# --------------------------------------------------------------------------- qparams


@settings(max_examples=50, deadline=None)
@given(weights())
def test_qparams_match_gptq_reference(ws: tuple[torch.Tensor, QuantSpec]) -> None:
    W, spec = ws
    scale, zero = compute_qparams(W, spec)
    ref_s, ref_z = _reference_qparams(W.clone(), spec.bits, spec.symmetric)
    assert scale.shape == zero.shape == (W.shape[0], 1)
    assert scale.dtype == zero.dtype == torch.float32
    assert torch.equal(scale, ref_s) and torch.equal(zero, ref_z)
    assert (scale > 0).all()
    assert torch.equal(zero, zero.round()) and (zero >= 0).all() and (zero <= spec.maxq).all()


@settings(max_examples=50, deadline=None)
@given(weights())
def test_roundtrip_error_within_half_step(ws: tuple[torch.Tensor, QuantSpec]) -> None:
    W, spec = ws
    scales, zeros = group_qparams(W, spec)
    codes, s2, z2 = quantize_weight(W, spec)
    assert codes.dtype == torch.uint8 and codes.shape == W.shape
    assert int(codes.max()) <= spec.maxq
    assert torch.equal(s2, scales) and torch.equal(z2, zeros)
    W_hat = dequantize_weight(codes, scales, zeros, spec.group_size)
    assert W_hat.dtype == torch.float32 and W_hat.shape == W.shape
    gs = W.shape[1] if spec.group_size == -1 else spec.group_size
    s = scales.repeat_interleave(gs, dim=1)  # (out, in)
    z = zeros.repeat_interleave(gs, dim=1)
    lo, hi = s * (0 - z), s * (spec.maxq - z)  # clamp range of the grid
    inside = ((W - lo) >= -s / 2) & ((W - hi) <= s / 2)
    if not spec.symmetric:  # asymmetric grids cover [xmin, xmax] up to half a step
        assert inside.all()
    err = (W - W_hat).abs()
    tol = s * (0.5 + 1e-4) + 1e-30
    assert (err[inside] <= tol[inside]).all()


@settings(max_examples=50, deadline=None)
@given(weights())
def test_exact_zeros_stay_zero(ws: tuple[torch.Tensor, QuantSpec]) -> None:
    W, spec = ws
    W = W * (torch.arange(W.numel()).reshape(W.shape) % 3 != 0)  # force some exact zeros
    codes, scales, zeros = quantize_weight(W, spec)
    W_hat = dequantize_weight(codes, scales, zeros, spec.group_size)
    assert (W_hat[W == 0] == 0).all()


@settings(max_examples=50, deadline=None)
@given(weights())
def test_weight_path_matches_fake_quantize(ws: tuple[torch.Tensor, QuantSpec]) -> None:
    W, spec = ws
    codes, scales, zeros = quantize_weight(W, spec)
    W_hat = dequantize_weight(codes, scales, zeros, spec.group_size)
    gs = W.shape[1] if spec.group_size == -1 else spec.group_size
    for g in range(W.shape[1] // gs):  # the GPTQ reference way: one group at a time
        cols = slice(g * gs, (g + 1) * gs)
        s, z = compute_qparams(W[:, cols], spec)
        assert torch.equal(W_hat[:, cols], fake_quantize(W[:, cols], s, z, spec.maxq))
        q = quantize(W[:, cols], s, z, spec.maxq)
        assert torch.equal(q, codes[:, cols])
        assert torch.equal(dequantize(q, s, z), W_hat[:, cols])


@settings(max_examples=50, deadline=None)
@given(weights(), st.integers(0, 2**31 - 1))
def test_g_idx_permuted_groups(ws: tuple[torch.Tensor, QuantSpec], seed: int) -> None:
    W, spec = ws
    gen = torch.Generator().manual_seed(seed)
    n_groups = spec.n_groups(W.shape[1])
    g_idx = torch.randint(0, n_groups, (W.shape[1],), generator=gen, dtype=torch.int32)
    scales = torch.rand(W.shape[0], n_groups, generator=gen) + 0.01
    zeros = torch.randint(0, spec.maxq + 1, (W.shape[0], n_groups), generator=gen).float()
    codes, _, _ = quantize_weight(W, spec, scales, zeros, g_idx=g_idx)
    W_hat = dequantize_weight(codes, scales, zeros, spec.group_size, g_idx=g_idx)
    g = g_idx.long()
    expected = fake_quantize(W, scales[:, g], zeros[:, g], spec.maxq)
    assert torch.equal(W_hat, expected)
    # the default g_idx is the contiguous grouping
    if spec.group_size > 0:
        contiguous = torch.arange(W.shape[1], dtype=torch.int32) // spec.group_size
        a = dequantize_weight(codes, scales, zeros, spec.group_size)
        b = dequantize_weight(codes, scales, zeros, spec.group_size, g_idx=contiguous)
        assert torch.equal(a, b)


def test_all_zero_weight_and_half_input() -> None:
    W = torch.zeros(3, 64)
    codes, scales, zeros = quantize_weight(W, QuantSpec(4, 32))
    assert (scales == 2 / 15).all()
    assert (dequantize_weight(codes, scales, zeros, 32) == 0).all()
    Wh = torch.randn(4, 64).half()
    codes, scales, zeros = quantize_weight(Wh, QuantSpec(8, 16))
    assert scales.dtype == torch.float32
    err = (dequantize_weight(codes, scales, zeros, 16) - Wh.float()).abs()
    assert (err <= scales.repeat_interleave(16, 1) * 0.5001).all()


def test_argument_validation() -> None:
    W = torch.randn(4, 96)
    with pytest.raises(ValueError, match="group_size=64"):
        quantize_weight(W, QuantSpec(4, 64))
    with pytest.raises(ValueError, match="both"):
        quantize_weight(W, QuantSpec(4, 32), scales=torch.ones(4, 3))
    codes, s, z = quantize_weight(W, QuantSpec(4, 32))
    with pytest.raises(ValueError, match="g_idx"):
        dequantize_weight(codes, s, z, 32, g_idx=torch.full((96,), 3, dtype=torch.int32))
    with pytest.raises(ValueError, match="g_idx"):
        dequantize_weight(codes, s, z, 32, g_idx=torch.zeros(95, dtype=torch.int32))
    with pytest.raises(ValueError):
        compute_qparams(torch.randn(3), QuantSpec(4, -1))


@pytest.mark.parametrize("device", DEVICES)
def test_device_consistency(device: str) -> None:
    W = torch.randn(16, 256, generator=torch.Generator().manual_seed(0))
    spec = QuantSpec(3, 64)
    codes, s, z = quantize_weight(W.to(device), spec)
    assert codes.device.type == device
    W_hat = dequantize_weight(codes, s, z, 64).cpu()
    ref_c, ref_s, ref_z = quantize_weight(W, spec)
    assert torch.equal(codes.cpu(), ref_c)
    assert torch.allclose(W_hat, dequantize_weight(ref_c, ref_s, ref_z, 64))
