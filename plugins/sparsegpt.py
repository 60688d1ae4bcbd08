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
from llmpress.config import MethodConfig, PruningConfig
from llmpress.errors import RecipeError
from llmpress.linalg import cached_inverse_cholesky
from llmpress.modules import get_weight
from llmpress.stats import LayerStats
from llmpress.update import UpdateResult


@dataclasses.dataclass(frozen=True)
class SparseGPTConfig(PruningConfig):
    """``blocksize``: columns per lazy-update block; ``percdamp``: damping as a fraction of mean(diag H)."""

    method: ClassVar[str] = "sparsegpt"
    stats: ClassVar[frozenset[str]] = frozenset({"hessian"})
    blocksize: int = 128
    percdamp: float = 0.01

    def validate(self) -> None:
        super().validate()
        if int(self.blocksize) < 1:
            raise RecipeError(f"sparsegpt: blocksize must be >= 1, got {self.blocksize}")
        if not 0 <= float(self.percdamp) < 10:
            raise RecipeError(f"sparsegpt: percdamp must be in [0, 10), got {self.percdamp}")


@torch.no_grad()
def sparsegpt_prune(
    weight: torch.Tensor,
    U: torch.Tensor,
    sparsity: float,
    nm: tuple[int, int] | None = None,
    blocksize: int = 128,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune ``weight`` [out, in] given ``U``, the upper Cholesky factor of the damped inverse
    input Hessian (:func:`llmpress.linalg.inverse_cholesky_upper`); returns ``(W', keep)``.

    Unstructured: exactly ``round(sparsity * out * in)`` weights are pruned (each block
    prunes its share, chosen layer-wide within the block). ``nm=(N, M)``: N of every M
    consecutive input weights are kept, chosen when the group's first column is reached.
    Works on the transpose so that each column step is two kernels on contiguous rows.
    """
    WT = weight.t().to(torch.float32, copy=True).contiguous()  # [in, out]
    cols, rows = WT.shape
    prunedT = torch.zeros_like(WT, dtype=torch.bool)  # [in, out]
    done = 0
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = WT[i1:i2]  # view [c, out]
        U1 = U[i1:i2, i1:i2]  # [c, c]
        d = torch.diagonal(U1).unsqueeze(1)  # [c, 1]
        P1 = prunedT[i1:i2]  # view [c, out]
        if nm is None:
            k = round(sparsity * rows * i2) - done  # cumulative rounding keeps the total exact
            if k > 0:
                sal = (W1.square() / d.square()).flatten()  # [c * out] OBS saliency
                P1.view(-1)[torch.topk(sal, k, largest=False).indices] = True
            done += k
        F1 = P1.float() / d  # [c, out]: err = w * F
        Err1 = torch.empty_like(W1)  # [c, out]
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:
                n, m = nm
                sal = W1[i : i + m].square() / d[i : i + m].square()  # [m, out]
                P1[i : i + m].scatter_(0, torch.topk(sal, m - n, dim=0, largest=False).indices, True)
                F1[i : i + m] = P1[i : i + m].float() / d[i : i + m]
            e = torch.mul(W1[i], F1[i], out=Err1[i])  # [out] error of pruning column i
            W1[i:].addr_(U1[i, i:], e, alpha=-1.0)  # spread it over the block's later columns
        WT[i2:].addmm_(U[i1:i2, i2:].t(), Err1, alpha=-1.0)  # lazy update of the rest
    keep = ~prunedT.t()  # [out, in]
    return WT.t() * keep, keep


CITATION = """@inproceedings{frantar2023sparsegpt,
  title     = {{SparseGPT}: Massive Language Models Can Be Accurately Pruned in One-Shot},
  author    = {Frantar, Elias and Alistarh, Dan},
  booktitle = {International Conference on Machine Learning},
  year      = {2023}
}"""


@hookimpl
def llmpress_method_citation(method: str) -> str | None:
    return CITATION if method == "sparsegpt" else None


@hookimpl
def llmpress_register_methods(register) -> None:  # noqa: ANN001
    register("sparsegpt", SparseGPTConfig)


@hookimpl
def llmpress_update_weights(
    module: nn.Module, mask: torch.Tensor | None, stats: LayerStats | None, config: MethodConfig
) -> UpdateResult | None:
    if not isinstance(config, SparseGPTConfig):
        return None
    if stats is None:
        raise ValueError("sparsegpt needs calibration statistics (the input Hessian)")
    t = config.sparsity_target()
    w = get_weight(module).detach()
    U = cached_inverse_cholesky(stats, float(config.percdamp))
    new, keep = sparsegpt_prune(w, U, t.sparsity, t.nm, int(config.blocksize))
    if mask is not None:  # weights pruned by an earlier stage stay pruned
        keep = keep & mask.to(keep.device)
    return UpdateResult(weight=new.to(w.dtype), mask=keep)
