"""SparseGPT (Frantar & Alistarh, 2023): one-shot OBS pruning with adaptive mask selection.

Columns are processed left to right in blocks of ``blocksize``; in each block the mask is
chosen from the OBS saliency ``w^2 / [H^-1]_jj^2`` of the *current* (already updated)
weights, each pruned weight's error is spread over the not-yet-processed columns through
the inverse-Hessian Cholesky factor, and the lazy update of the remaining columns is done
once per block.

``asymmetric: true`` is GPTAQ's asymmetric calibration (Li et al., 2025) for pruning: the
sweep is fitted to the dense model's inputs ``X`` instead of the pruned model's ``X~``, with
GPTAQ's correction ``P = alpha * triu(dXX^T U^T, 1) U`` (``dXX^T = (X - X~)^T X~``, statistic
``dense_cross``, at its cost: see :mod:`llmpress.engine.stats`). It is an option of this
method, not a method of its own, because everything else (mask selection, N:M, the sweep,
the levels) is SparseGPT's.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from torch import nn

from llmpress import hookimpl
from llmpress.engine.stats import LayerStats
from llmpress.errors import RecipeError
from llmpress.math.linalg import cached_asymmetric_correction, cached_inverse_cholesky
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
    }
    @inproceedings{li2025gptaq,
      title     = {{GPTAQ}: Efficient Finetuning-Free Quantization for Asymmetric Calibration},
      author    = {Li, Yuhang and Yin, Ruokai and Lee, Donghyun and Xiao, Shiting and Panda, Priyadarshini},
      booktitle = {International Conference on Machine Learning},
      year      = {2025}
    }"""
    #: fit to the dense model's inputs (GPTAQ's asymmetric calibration), weighted by ``alpha``
    asymmetric: bool = False
    alpha: float = 0.25

    def validate(self) -> None:
        super().validate()
        if not 0.0 <= float(self.alpha) <= 1.0:  # also refuses NaN
            raise RecipeError(
                f"method {self.method!r}: alpha {self.alpha} is outside [0, 1]; it scales the "
                "asymmetric correction toward the dense model's output (0.25 as in GPTAQ)"
            )

    def statistics(self) -> frozenset[str]:
        return super().statistics() | ({"dense_cross"} if self.asymmetric else set())


def sparsegpt_prune(
    weight: torch.Tensor,
    U: torch.Tensor,
    sparsity: float,
    nm: tuple[int, int] | None = None,
    blocksize: int = 128,
    P: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Prune ``weight`` [out, in] given ``U``, the upper Cholesky factor of the damped inverse
    input Hessian (:func:`llmpress.math.linalg.inverse_cholesky_upper`); returns ``(W', keep, loss)``
    with the reference code's loss ``sum(w^2 / U_jj^2) / 2`` over pruned weights.

    Unstructured: exactly ``round(sparsity * out * in)`` weights are pruned (each block
    prunes its share, chosen layer-wide within the block by the OBS saliency
    ``w^2 / U_jj^2`` of the current weights). ``nm=(N, M)``: N of every M consecutive input
    weights are kept, chosen when the group's first column is reached. ``P``: GPTAQ's
    asymmetric correction (:func:`llmpress.math.obs.obs_sweep`).
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

    loss = obs_sweep(WT, U, step, blocksize, begin_block, P)
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
    pd = float(config.percdamp)
    P = cached_asymmetric_correction(stats, pd, float(config.alpha)) if config.asymmetric else None
    U = cached_inverse_cholesky(stats, pd)
    new, keep, loss = sparsegpt_prune(w, U, t.sparsity, t.nm, int(config.blocksize), P)
    if mask is not None:  # weights pruned by an earlier stage stay pruned
        keep = keep & mask.to(keep.device)
    return LayerResult(weight=new.to(w.dtype), mask=keep, loss=loss)
