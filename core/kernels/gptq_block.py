"""Triton kernel for one block of GPTQ's column sweep.

Inside a block of ``c <= 128`` columns the sweep is sequential: column ``i`` is quantized,
its error ``e_i = (w_i - q_i) / U_ii`` is subtracted from the later columns of the block as
``U[i, i+1:]^T e_i``. The torch path launches ~10 kernels per column; here one program
keeps a [128, BLOCK_N] tile of the (transposed) block in registers and runs all ``c``
steps, so a block costs one launch. Grids (scale, zero per column) are given per column,
so lazy grids are fitted by the caller at block starts (group size dividing the block).
"""

from __future__ import annotations

import torch

try:  # triton is optional (the ``kernels`` extra)
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover
    HAVE_TRITON = False


if HAVE_TRITON:

    @triton.jit
    def _gptq_block_kernel(
        W_ptr,
        U_ptr,
        S_ptr,
        Z_ptr,
        K_ptr,
        Q_ptr,
        E_ptr,
        c,
        N,
        stride_w,
        stride_u,
        maxq,
        HAS_KEEP: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        pid = tl.program_id(0)
        offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] output channels
        rows = tl.arange(0, BLOCK_C)  # [BC] columns of the block
        nmask = offs_n < N
        tile_mask = (rows[:, None] < c) & nmask[None, :]
        W = tl.load(W_ptr + rows[:, None] * stride_w + offs_n[None, :], mask=tile_mask, other=0.0)  # [BC, BN]
        E = tl.zeros((BLOCK_C, BLOCK_N), dtype=tl.float32)
        for i in range(0, c):
            sel = rows[:, None] == i
            w = tl.sum(tl.where(sel, W, 0.0), axis=0)  # [BN] current column i
            s = tl.load(S_ptr + i * N + offs_n, mask=nmask, other=1.0)
            z = tl.load(Z_ptr + i * N + offs_n, mask=nmask, other=0.0)
            x = tl.div_rn(w, s)
            r = tl.floor(x + 0.5)
            r = tl.where((r - x == 0.5) & (r - 2.0 * tl.floor(r * 0.5) != 0.0), r - 1.0, r)  # half to even
            q = tl.minimum(tl.maximum(r + z, 0.0), maxq)
            if HAS_KEEP:
                k = tl.load(K_ptr + i * N + offs_n, mask=nmask, other=1)
                q = tl.where(k != 0, q, z)  # pruned: zero point -> exactly 0
            tl.store(Q_ptr + i * N + offs_n, q.to(tl.uint8), mask=nmask)
            d = tl.load(U_ptr + i * stride_u + i)
            err = tl.div_rn(w - s * (q - z), d)  # [BN]
            E = tl.where(sel, err[None, :], E)
            u = tl.load(U_ptr + i * stride_u + rows, mask=(rows > i) & (rows < c), other=0.0)  # [BC]
            W = W - u[:, None] * err[None, :]
        tl.store(E_ptr + rows[:, None] * N + offs_n[None, :], E, mask=tile_mask)


def gptq_block_triton(
    W1: torch.Tensor,
    U1: torch.Tensor,
    S: torch.Tensor,
    Z: torch.Tensor,
    maxq: int,
    keep: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One block: W1 [c, N] (rows = columns of W, contiguous), U1 [c, c] (a view of U is
    fine), per-column grids S, Z [c, N], keep [c, N] (bool) -> (codes uint8 [c, N], err [c, N])."""
    c, N = W1.shape
    assert c <= 128 and W1.stride(1) == 1, "W1 must be [c <= 128, N] with contiguous rows"
    if U1.stride(1) != 1:
        U1 = U1.contiguous()
    Q = torch.empty(c, N, dtype=torch.uint8, device=W1.device)
    E = torch.empty(c, N, dtype=torch.float32, device=W1.device)
    K = keep.to(torch.uint8).contiguous() if keep is not None else Q  # dummy pointer without a mask
    BLOCK_N = 32
    grid = (triton.cdiv(N, BLOCK_N),)
    _gptq_block_kernel[grid](
        W1,
        U1,
        S.contiguous(),
        Z.contiguous(),
        K,
        Q,
        E,
        c,
        N,
        W1.stride(0),
        U1.stride(0),
        float(maxq),
        HAS_KEEP=keep is not None,
        BLOCK_C=128,
        BLOCK_N=BLOCK_N,
        num_warps=4,
    )
    return Q, E


def gptq_block_torch(
    W1: torch.Tensor,
    U1: torch.Tensor,
    S: torch.Tensor,
    Z: torch.Tensor,
    maxq: int,
    keep: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The pure-torch twin of :func:`gptq_block_triton` (the reference in tests)."""
    W1 = W1.clone()
    c, N = W1.shape
    Q = torch.empty(c, N, dtype=torch.uint8, device=W1.device)
    E = torch.empty(c, N, dtype=torch.float32, device=W1.device)
    for i in range(c):
        w = W1[i]
        q = torch.clamp(torch.round(w / S[i]) + Z[i], 0, maxq)
        if keep is not None:
            q = torch.where(keep[i], q, Z[i])
        Q[i] = q.to(torch.uint8)
        E[i] = (w - S[i] * (q - Z[i])) / U1[i, i]
        W1[i + 1 :] -= U1[i, i + 1 :].unsqueeze(1) * E[i].unsqueeze(0)
    return Q, E
