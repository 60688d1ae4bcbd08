"""SparseGPT (Frantar & Alistarh, 2023): one-shot OBS pruning with adaptive mask selection.

Columns are processed left to right in blocks of ``blocksize``; in each block the mask is
chosen from the OBS saliency ``w^2 / [H^-1]_jj^2`` of the *current* (already updated)
weights, each pruned weight's error is spread over the not-yet-processed columns through
the inverse-Hessian Cholesky factor, and the lazy update of the remaining columns is done
once per block.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from torch import nn

from llmpress import hookimpl
from llmpress.engine.stats import LayerStats
from llmpress.math.linalg import cached_inverse_cholesky
from llmpress.math.obs import obs_sweep
from llmpress.model.modules import get_weight
from llmpress.model.results import LayerResult
from llmpress.recipe.config import OBSConfig, PruningConfig


@dataclasses.dataclass(frozen=True)
class SparseGPTConfig(OBSConfig, PruningConfig):
    """SparseGPT: the sparsity target plus the OBS sweep's options."""

    method: ClassVar[str] = "sparsegpt"
    display_name: ClassVar[str] = "SparseGPT"
    citation: ClassVar[str] = """@inproceedings{frantar2023sparsegpt,
      title     = {{SparseGPT}: Massive Language Models Can Be Accurately Pruned in One-Shot},
      author    = {Frantar, Elias and Alistarh, Dan},
      booktitle = {International Conference on Machine Learning},
      year      = {2023}
    }"""


def sparsegpt_prune(
    weight: torch.Tensor,
    U: torch.Tensor,
    sparsity: float,
    nm: tuple[int, int] | None = None,
    blocksize: int = 128,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Prune ``weight`` [out, in] given ``U``, the upper Cholesky factor of the damped inverse
    input Hessian (:func:`llmpress.math.linalg.inverse_cholesky_upper`); returns ``(W', keep, loss)``
    with the reference code's loss ``sum(w^2 / U_jj^2) / 2`` over pruned weights.

    Unstructured: exactly ``round(sparsity * out * in)`` weights are pruned (each block
    prunes its share, chosen layer-wide within the block by the OBS saliency
    ``w^2 / U_jj^2`` of the current weights). ``nm=(N, M)``: N of every M consecutive input
    weights are kept, chosen when the group's first column is reached.
    """
    WT = weight.t().to(torch.float32, copy=True).contiguous()  # [in, out]
    rows = WT.shape[1]
    prunedT = torch.zeros_like(WT, dtype=torch.bool)  # [in, out]
    F = torch.zeros_like(WT)  # [in, out]: pruned / U_jj, so err = w * F
    done = 0

    def begin_block(i1: int, i2: int, W1: torch.Tensor, d: torch.Tensor) -> None:
        nonlocal done
        if nm is not None:
            return
        k = round(sparsity * rows * i2) - done  # cumulative rounding keeps the total exact
        if k > 0:
            sal = (W1.square() / d.square().unsqueeze(1)).flatten()  # [c * out] OBS saliency
            prunedT[i1:i2].view(-1)[torch.topk(sal, k, largest=False).indices] = True
        F[i1:i2] = prunedT[i1:i2].float() / d.unsqueeze(1)
        done += k

    def step(j: int, i: int, w: torch.Tensor, d_i: torch.Tensor, err: torch.Tensor) -> None:
        if nm is not None and i % nm[1] == 0:
            n, m = nm
            Wg = WT[j : j + m]  # [m, out], current values of the group
            dg = torch.diagonal(U)[j : j + m].unsqueeze(1)  # [m, 1]
            sal = Wg.square() / dg.square()
            prunedT[j : j + m].scatter_(0, torch.topk(sal, m - n, dim=0, largest=False).indices, True)
            F[j : j + m] = prunedT[j : j + m].float() / dg
        torch.mul(w, F[j], out=err)

    loss = obs_sweep(WT, U, step, blocksize, begin_block)
    keep = ~prunedT.t()  # [out, in]
    return WT.t() * keep, keep, loss


@hookimpl
def llmpress_register_methods(register) -> None:  # noqa: ANN001
    register(SparseGPTConfig)


@hookimpl
def llmpress_update_weights(
    module: nn.Module, mask: torch.Tensor | None, stats: LayerStats, config: SparseGPTConfig
) -> LayerResult:
    t = config.sparsity_target()
    w = get_weight(module).detach()
    U = cached_inverse_cholesky(stats, float(config.percdamp))
    new, keep, loss = sparsegpt_prune(w, U, t.sparsity, t.nm, int(config.blocksize))
    if mask is not None:  # weights pruned by an earlier stage stay pruned
        keep = keep & mask.to(keep.device)
    return LayerResult(weight=new.to(w.dtype), mask=keep, loss=loss)
