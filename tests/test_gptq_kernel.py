"""The GPTQ block kernel (Triton) against its pure-torch twin, under TRITON_INTERPRET=1 on CPU.

Runs in a subprocess: the interpreter flag must be set before triton is imported.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

SCRIPT = textwrap.dedent(
    """
    import torch
    from llmpress.kernels.gptq_block import gptq_block_torch, gptq_block_triton
    from llmpress.math.linalg import inverse_cholesky_upper
    from llmpress.plugins.gptq import GPTQConfig, gptq_quantize
    torch.manual_seed(0)
    # one block: identical codes and errors
    for c, n, masked in [(128, 70, False), (37, 33, True), (16, 5, True)]:
        A = torch.randn(c, c)
        U = inverse_cholesky_upper(A @ A.T + c * torch.eye(c), 0.01)
        W1 = torch.randn(c, n)
        S = torch.rand(c, n) * 0.3 + 0.05
        Z = torch.randint(0, 16, (c, n)).float()
        K = (torch.rand(c, n) > 0.5) if masked else None
        qa, ea = gptq_block_triton(W1.contiguous(), U, S, Z, 15, K)
        qb, eb = gptq_block_torch(W1, U, S, Z, 15, K)
        assert torch.equal(qa, qb), (c, n)
        assert torch.allclose(ea, eb, atol=1e-5), (c, n, (ea - eb).abs().max())
    # whole layers: the Triton sweep gives GPTQ's codes (lazy, per-channel, act-order, masked)
    X = torch.randn(512, 64) @ torch.randn(64, 256)
    H = X.T @ X
    W = torch.randn(40, 256)
    keep = torch.rand(40, 256) > 0.3
    for gs, sym, act, kp in [(64, False, False, None), (-1, True, False, keep), (32, False, True, keep)]:
        cfg = GPTQConfig(bits=4, group_size=gs, symmetric=sym)
        perm = torch.sort(torch.diagonal(H), descending=True, stable=True).indices if act else None
        U = inverse_cholesky_upper(H[perm][:, perm] if act else H, 0.01)
        _, sa, _ = gptq_quantize(W, U, cfg, perm, kp, 128, use_triton=False)
        _, sb, _ = gptq_quantize(W, U, cfg, perm, kp, 128, use_triton=True)
        assert torch.equal(sa.codes, sb.codes), (gs, sym, act)
        # grids fitted mid-block see rank-1 vs one matmul's rounding: equal up to float error
        assert torch.allclose(sa.scales, sb.scales, rtol=1e-5) and torch.equal(sa.zeros, sb.zeros)
    print("OK")
    """
)


def test_gptq_block_kernel_matches_torch_under_interpreter() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    res = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().endswith("OK")
