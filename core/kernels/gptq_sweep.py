"""The GPTQ column sweep (Frantar et al., 2023), shared by the ``gptq`` and ``gptaq`` methods.

Quantize columns one by one on a grid (lazy per-group grids, or static groups fitted up front
with act-order) and spread each rounding error over the not-yet-quantized columns through the
inverse-Hessian Cholesky factor: in torch (:func:`llmpress.math.obs.obs_sweep`) or one Triton
launch per block (:mod:`llmpress.kernels.gptq_block`). A weight pruned by an earlier stage
keeps the zero point's code: exactly 0.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

import torch

from llmpress.kernels.gptq_block import HAVE_TRITON, gptq_block_triton
from llmpress.math.obs import obs_loss, obs_sweep
from llmpress.model.results import QuantState
from llmpress.quant.grid import QuantSpec, compute_qparams, group_qparams

if TYPE_CHECKING:
    from llmpress.engine.stats import LayerStats
    from llmpress.recipe.config import QuantConfig


@torch.no_grad()
def gptq_quantize(
    weight: torch.Tensor,
    U: torch.Tensor,
    config: QuantConfig,
    perm: torch.Tensor | None = None,
    keep: torch.Tensor | None = None,
    blocksize: int = 128,
    use_triton: bool | None = None,
    P: torch.Tensor | None = None,
) -> tuple[torch.Tensor, QuantState, float]:
    """Quantize ``weight`` [out, in]; ``U`` is the inverse-Hessian Cholesky factor *in the
    processing order* ``perm`` (``None``: natural order). Returns (dequantized W, quant state,
    the reference code's loss ``sum((w - q)^2 / U_jj^2) / 2``).

    Groups are contiguous in the original column order. Without ``perm`` each group's grid
    is fitted when its first column is reached (the reference's lazy grid); with ``perm``
    (act-order) all grids are fitted up front on the original weights (static groups).
    ``use_triton``: run each block as one Triton kernel (default: on CUDA when available).
    ``P``: GPTAQ's asymmetric correction in the processing order (:func:`llmpress.math.obs.obs_sweep`);
    the sweep then runs in torch (the Triton kernel has no correction term).
    """
    spec = config.quant_spec()
    out_f, in_f = weight.shape
    gs = in_f if config.group_size == -1 else config.group_size
    W = weight.float()
    order = perm if perm is not None else torch.arange(in_f, device=W.device)
    WT = W.t()[order].contiguous()  # [in, out], processing order
    keepT = None if keep is None else keep.t()[order].contiguous()  # [in, out]
    n_groups = in_f // gs
    scalesT = torch.zeros(n_groups, out_f, device=W.device)  # [G, out]: one contiguous row per group
    zerosT = torch.zeros(n_groups, out_f, device=W.device)
    if perm is not None:  # static groups, fitted before any update
        sc, zc = group_qparams(W, dataclasses.replace(spec, group_size=gs))  # [out, G]
        scalesT, zerosT = sc.t().contiguous(), zc.t().contiguous()
    codesT = torch.empty(in_f, out_f, dtype=torch.uint8, device=W.device)  # [in, out], original order
    maxq = float(spec.maxq)
    order_list = order.tolist()
    buf = torch.empty(out_f, device=W.device)

    def step(j: int, i: int, w: torch.Tensor, d_i: torch.Tensor, err: torch.Tensor) -> None:
        col = order_list[j]
        g = col // gs
        if perm is None and col % gs == 0:  # lazy grid for the group starting here
            sg, zg = compute_qparams(WT[j : j + gs].t(), spec)  # [out, 1] each
            scalesT[g], zerosT[g] = sg[:, 0], zg[:, 0]
        s, z = scalesT[g], zerosT[g]  # [out]
        torch.div(w, s, out=buf).round_().add_(z).clamp_(0.0, maxq)  # codes as float
        if keepT is not None:
            torch.where(keepT[j], buf, z, out=buf)  # pruned: zero point -> exactly 0
        codesT[col].copy_(buf)
        buf.sub_(z)
        torch.addcmul(w, s, buf, value=-1.0, out=err).div_(d_i)  # (w - q) / d

    if use_triton is None:
        use_triton = W.is_cuda and HAVE_TRITON and P is None
    if use_triton and P is not None:
        raise ValueError("the Triton GPTQ sweep has no asymmetric correction term P")
    if use_triton:
        loss = _sweep_triton(
            WT, U, order, scalesT, zerosT, codesT, keepT, spec, gs, blocksize, lazy=perm is None
        )
    else:
        loss = obs_sweep(WT, U, step, blocksize, P=P)
    codes = codesT.t().contiguous()  # [out, in]
    state = QuantState.of(codes, scalesT.t().contiguous(), zerosT.t().contiguous(), config)  # scales [out, G]
    return state.dequantize(), state, loss


def _sweep_triton(
    WT: torch.Tensor,
    U: torch.Tensor,
    order: torch.Tensor,
    scalesT: torch.Tensor,
    zerosT: torch.Tensor,
    codesT: torch.Tensor,
    keepT: torch.Tensor | None,
    spec: QuantSpec,
    gs: int,
    blocksize: int,
    lazy: bool,
) -> float:
    """The same sweep with one Triton launch per block. Lazy grids are fitted at block starts,
    so blocks are cut at group boundaries (the block size changes float rounding only)."""
    bs = min(blocksize, 128)
    if lazy:
        bs = math.gcd(gs, bs)
    cols = WT.shape[0]
    loss = torch.zeros((), dtype=torch.float64, device=WT.device)
    for i1 in range(0, cols, bs):
        i2 = min(i1 + bs, cols)
        W1 = WT[i1:i2]  # [c, out]
        if lazy:
            for j in range(-(-i1 // gs) * gs, i2, gs):  # groups starting in this block
                sg, zg = compute_qparams(WT[j : j + gs].t(), spec)  # [out, 1]
                scalesT[j // gs], zerosT[j // gs] = sg[:, 0], zg[:, 0]
        cols_orig = order[i1:i2]
        g = torch.div(cols_orig, gs, rounding_mode="floor")
        Q, E = gptq_block_triton(
            W1, U[i1:i2, i1:i2], scalesT[g], zerosT[g], spec.maxq, None if keepT is None else keepT[i1:i2]
        )
        codesT[cols_orig] = Q
        WT[i2:].addmm_(U[i1:i2, i2:].t(), E, alpha=-1.0)
        loss += obs_loss(E)
    return float(loss)


def act_order_perm(stats: LayerStats) -> torch.Tensor:
    """Columns by decreasing Hessian diagonal (stable)."""
    return torch.sort(stats.sq_norms, descending=True, stable=True).indices
