"""The weight-only int4/int8 Triton kernels against an fp32 reference built from codes/scales/zeros.

Kernel runs happen in a subprocess with ``TRITON_INTERPRET=1`` (the flag must be set before triton
is imported), on tiny shapes. Tolerances are relative to the output's scale (``max |reference|``):
fp32 1e-5, fp16 3e-3, bf16 1.5e-2 -- the output is rounded to x's dtype, and the tensor-core paths
also round the dequantized weight to it (as the dequantize-then-matmul fallback does).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("triton")

from llmpress.kernels import triton_int as ti  # noqa: E402

COMMON = textwrap.dedent(
    """
    import torch
    from llmpress.kernels import triton_int as ti

    TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 1.5e-2}

    def make(N, K, gs, bits, asym, dtype, float_zeros=False, seed=0):
        g = torch.Generator().manual_seed(seed)
        G = K // (K if gs is None or gs <= 0 else gs)
        codes = torch.randint(0, 2**bits, (N, K), generator=g).to(torch.uint8)
        scales = (torch.rand(N, G, generator=g) * 0.02 + 0.005).to(dtype)
        zeros = None
        if asym:
            zeros = torch.randint(0, 2**bits, (N, G), generator=g).to(torch.uint8)
            if float_zeros:  # codes-domain zero points need not be integers
                zeros = zeros.float() + 0.25
        return codes, scales, zeros

    def reference_weight(codes, scales, zeros, bits):
        # W[n, k] = (codes[n, k] - zero[n, k // gs]) * scale[n, k // gs], computed independently
        N, K = codes.shape
        gs = K // scales.shape[1]
        z = zeros.double() if zeros is not None else torch.full(scales.shape, 2.0 ** (bits - 1)).double()
        idx = torch.arange(K) // gs
        return ((codes.double() - z[:, idx]) * scales.double()[:, idx]).float()

    def check(y, x, W, what):
        ref = x.float() @ W.T
        assert y.dtype == x.dtype and y.shape == ref.shape, (what, y.dtype, y.shape)
        err = (y.float() - ref).abs().max().item() / ref.abs().max().item()
        assert err <= TOL[x.dtype], (what, err)
    """
)

MATRIX = textwrap.dedent(
    """
    def matrix():
        cases = [
            # (x shape, N, K, group, bits, asym, dtype): path, what it covers
            ((1, 96), 37, 96, 32, 4, True, torch.float16),  # GEMV; odd N; K = 96 < one chunk (256)
            ((1, 512), 64, 512, 128, 4, False, torch.bfloat16),  # GEMV, split K
            ((3, 192), 37, 192, 64, 8, False, torch.bfloat16),  # dot decode; K not a multiple of 128
            ((3, 96), 40, 96, None, 4, True, torch.float16),  # per-channel (group = K = 96)
            ((8, 256), 37, 256, 32, 8, True, torch.bfloat16),  # 16-row tl.dot decode, split K
            ((16, 128), 33, 128, -1, 4, False, torch.float16),  # per-channel, 16-row dot decode
            ((2, 3, 64), 24, 64, 32, 4, True, torch.float16),  # leading dims: 6 rows
            ((17, 96), 37, 96, 32, 4, True, torch.bfloat16),  # GEMM, 2 row tiles
            ((17, 192), 50, 192, 64, 8, True, torch.float16),  # GEMM; partial chunk
            ((33, 512), 40, 512, 128, 8, False, torch.bfloat16),  # GEMM, split K
            ((2, 80), 37, 80, None, 4, True, torch.float32),  # group 80: 16-row slices
            ((20, 160), 24, 160, 32, 8, True, torch.float32),  # fp32 GEMM
        ]
        splits = set()
        for shape, N, K, gs, bits, asym, dtype in cases:
            what = (shape, N, K, gs, bits, asym, dtype)
            codes, scales, zeros = make(N, K, gs, bits, asym, dtype)
            w = ti.repack_int(codes, scales, zeros, bits, gs)
            W = reference_weight(codes, scales, zeros, bits)
            assert torch.allclose(ti.dequantize(w, torch.float32), W, rtol=1e-6, atol=0), what
            x = torch.randn(*shape, dtype=torch.float32).to(dtype)
            y = ti.int_matmul(x, w)
            assert y.shape == (*shape[:-1], N), (what, y.shape)
            check(y.reshape(-1, N), x.reshape(-1, K), W, what)
            M = x.numel() // K
            nom = (1, 32) if M <= ti.DECODE_MAX_ROWS else (16, 32)
            splits.add(ti._split_k(-(-M // nom[0]) * -(-N // nom[1]), w.num_chunks, x.device) > 1)
        assert splits == {True, False}, splits  # both the direct store and the split-K atomics ran

        # float (non-integral) zero points, non-contiguous x
        codes, scales, zeros = make(24, 128, 64, 4, True, torch.float16, float_zeros=True)
        w = ti.repack_int(codes, scales, zeros, 4, 64)
        assert w.zeros is not None and w.zeros.dtype == torch.float32
        x = torch.randn(128, 5).to(torch.float16).T
        check(ti.int_matmul(x, w), x, reference_weight(codes, scales, zeros, 4), "float zeros")

    def fallback():
        calls = []
        launch, threshold = ti._launch, ti.FALLBACK_MIN_ROWS
        def spy(x2, w):
            calls.append(x2.shape[0])
            return launch(x2, w)
        ti._launch, ti.FALLBACK_MIN_ROWS = spy, 4
        try:
            codes, scales, zeros = make(37, 96, 32, 4, True, torch.float16)
            w = ti.repack_int(codes, scales, zeros, 4, 32)
            W = reference_weight(codes, scales, zeros, 4)
            x = torch.randn(4, 96).to(torch.float16)
            check(ti.int_matmul(x, w), x, W, "fallback")  # 4 rows >= threshold: dequantize + matmul
            assert calls == [], calls
            check(ti.int_matmul(x[:3], w), x[:3], W, "kernel")  # 3 rows: the Triton kernel
            assert calls == [3], calls
            assert ti.int_matmul(x[:0], w).shape == (0, 37)
        finally:
            ti._launch, ti.FALLBACK_MIN_ROWS = launch, threshold

    import traceback
    for name, fn in [("matrix", matrix), ("fallback", fallback)]:
        try:
            fn()
            print(name, "OK")
        except Exception:
            traceback.print_exc()
            print(name, "FAILED")
    """
)


@pytest.fixture(scope="module")
def interpreted() -> subprocess.CompletedProcess[str]:
    """One interpreter subprocess for all kernel checks (importing llmpress takes seconds)."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    return subprocess.run(
        [sys.executable, "-c", COMMON + MATRIX], env=env, capture_output=True, text=True, timeout=600
    )


def _passed(res: subprocess.CompletedProcess[str], name: str) -> None:
    assert f"{name} OK" in res.stdout.splitlines(), res.stdout[-1000:] + res.stderr[-3000:]


def test_int_matmul_matches_reference_under_interpreter(
    interpreted: subprocess.CompletedProcess[str],
) -> None:
    _passed(interpreted, "matrix")


def test_fallback_threshold_dispatch_under_interpreter(interpreted: subprocess.CompletedProcess[str]) -> None:
    _passed(interpreted, "fallback")


def _reference(
    codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int
) -> torch.Tensor:
    gs = codes.shape[1] // scales.shape[1]
    z = zeros.float() if zeros is not None else torch.full(scales.shape, 2.0 ** (bits - 1))
    idx = torch.arange(codes.shape[1]) // gs
    return (codes.float() - z[:, idx]) * scales.float()[:, idx]


@pytest.mark.parametrize("bits,gs,asym", [(4, 32, True), (8, None, False), (4, 16, False), (8, 64, True)])
def test_repack_roundtrip_torch(bits: int, gs: int | None, asym: bool) -> None:
    """The layout decodes back to the weight in torch (the CPU path), no kernel involved."""
    torch.manual_seed(0)
    N, K = 19, 192
    G = K // (gs or K)
    codes = torch.randint(0, 2**bits, (N, K), dtype=torch.uint8)
    scales = torch.rand(N, G) + 0.1
    zeros = torch.randint(0, 2**bits, (N, G), dtype=torch.uint8) if asym else None
    w = ti.repack_int(codes, scales, zeros, bits, gs)
    assert w.qweight.dtype == torch.int32 and w.qweight.shape == (w.num_chunks * w.slice_rows, N)
    assert w.group_size == (gs or K) and (w.in_features, w.out_features) == (K, N)
    W = _reference(codes, scales, zeros, bits)
    assert torch.equal(ti._dequantize_t_torch(w, torch.float32).T, W)
    if not ti._can_launch(codes):  # a CPU tensor outside the interpreter: the torch fallback
        x = torch.randn(2, 3, K)
        ref = x @ W.T
        # fp32 sums of K products in another order (the BLAS kernel differs per CPU): relative to their size
        tol = 1e-5 * float((x.abs() @ W.abs().T).max())
        torch.testing.assert_close(ti.int_matmul(x, w), ref, rtol=1e-5, atol=tol)
        assert torch.equal(ti.dequantize(w, torch.float32), W)


def test_repack_rejects_unsupported() -> None:
    codes = torch.zeros(4, 96, dtype=torch.uint8)
    with pytest.raises(ValueError, match="multiple of 16"):
        ti.repack_int(codes, torch.ones(4, 4), None, 4, 24)
    with pytest.raises(ValueError, match="multiple of 16"):
        ti.repack_int(codes, torch.ones(4, 1), None, 3, None)
    with pytest.raises(ValueError, match="0..15"):
        ti.repack_int(codes + 16, torch.ones(4, 3), None, 4, 32)
    assert ti.supports(4, 128, 4096) and not ti.supports(4, 128, 4000) and not ti.supports(2, 64, 128)


def test_without_triton_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    w = ti.repack_int(torch.zeros(4, 32, dtype=torch.uint8), torch.ones(4, 1), None, 4, 32)
    monkeypatch.setattr(ti, "HAVE_TRITON", False)
    with pytest.raises(RuntimeError, match="needs triton"):
        ti.int_matmul(torch.zeros(1, 32), w)
