"""The OBS column sweep shared by SparseGPT and GPTQ (Frantar et al.).

Input columns are processed left to right in blocks. Column ``j`` is replaced by its
compressed value (pruned and/or quantized) and the error ``(w_j - q_j) / U_jj`` is spread
over the columns not yet processed through the upper Cholesky factor ``U`` of the damped
inverse Hessian: immediately inside the block, lazily (one matmul) for the rest.

The weight is held transposed, ``WT[in, out]``, so each column is one contiguous row and a
column step costs a few kernels. Methods supply the per-column step (and optionally a
per-block step, e.g. SparseGPT's mask selection).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

#: step(j, i, w, d_i, err) -> None: compress column ``j`` (``i`` within the block), whose
#: current values are ``w`` [out]; write ``(w - q) / d_i`` into ``err`` [out].
ColumnStep = Callable[[int, int, torch.Tensor, torch.Tensor, torch.Tensor], None]
#: begin(i1, i2, W1, d): called before each block with its rows ``WT[i1:i2]`` and ``diag(U1)``.
BlockStep = Callable[[int, int, torch.Tensor, torch.Tensor], None]


@torch.no_grad()
def obs_sweep(
    WT: torch.Tensor,
    U: torch.Tensor,
    step: ColumnStep,
    blocksize: int = 128,
    begin_block: BlockStep | None = None,
    P: torch.Tensor | None = None,
) -> float:
    """Run the sweep over ``WT`` [in, out] (float32, updated in place).

    ``P`` [in, in] (strictly upper triangular, in the order of ``U``): GPTAQ's asymmetric
    correction (:func:`asymmetric_correction`); column ``j``'s value ``w`` before it is
    compressed also moves the later columns by ``+ w * P[j, j:]`` (inside a block the
    current ``w``, across blocks the block's compressed values, as the reference code does).

    After the sweep, row ``j`` of ``WT`` holds ``q_j`` up to float rounding; methods that
    need exact values (pruned zeros, grid points) rebuild them from their own record.
    Returns the layer's loss as the reference code reports it,
    ``sum((w - q)^2 / U_jj^2) / 2`` (:func:`obs_loss` of the errors).
    """
    cols = WT.shape[0]
    loss = torch.zeros((), dtype=torch.float64, device=WT.device)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = WT[i1:i2]  # view [c, out]
        U1 = U[i1:i2, i1:i2]  # [c, c]
        d = torch.diagonal(U1)  # [c]
        if begin_block is not None:
            begin_block(i1, i2, W1, d)
        Err1 = torch.empty_like(W1)  # [c, out]
        P1 = None if P is None else P[i1:i2, i1:i2]
        for i in range(i2 - i1):
            step(i1 + i, i, W1[i], d[i], Err1[i])
            if P1 is not None:  # before W1[i] changes; P[j, j] = 0
                W1[i + 1 :].addr_(P1[i, i + 1 :], W1[i])
            W1[i:].addr_(U1[i, i:], Err1[i], alpha=-1.0)  # spread over the block's later columns
        WT[i2:].addmm_(U[i1:i2, i2:].t(), Err1, alpha=-1.0)  # lazy update of the rest
        if P is not None:
            WT[i2:].addmm_(P[i1:i2, i2:].t(), W1)
        loss += obs_loss(Err1)
    return float(loss)


def obs_loss(err: torch.Tensor) -> torch.Tensor:
    """Loss of a block of scaled errors ``(w - q) / U_jj``: ``sum(err^2) / 2`` (float64 scalar)."""
    return torch.linalg.vector_norm(err, dtype=torch.float64).square() / 2


def asymmetric_correction(dxxt: torch.Tensor, U: torch.Tensor, alpha: float) -> torch.Tensor:
    """GPTAQ's ``P = alpha * triu(dXX^T U^T, 1) U`` (Li et al., 2025), float32 [in, in].

    ``dxxt``: ``(X - X~)^T X~`` and ``U``: the upper Cholesky factor of the damped inverse of
    ``X~^T X~``, both summed (or both averaged) over the same tokens and in the same column
    order; ``P`` does not depend on that common scale. Strictly upper triangular.
    """
    return (dxxt @ U.t()).triu_(1).matmul(U).mul_(alpha)
