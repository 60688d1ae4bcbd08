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
from llmpress.linalg import inverse_cholesky_upper, prepare_hessian
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


def _prune_lowest_in_rows(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool [rows, c]: True at the ``k`` lowest scores of each row."""
    pruned = torch.zeros_like(scores, dtype=torch.bool)
    if k > 0:
        pruned.scatter_(1, torch.topk(scores, k, dim=1, largest=False).indices, True)
    return pruned


@torch.no_grad()
def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float,
    nm: tuple[int, int] | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune ``weight`` [out, in] given the input Hessian [in, in]; returns ``(W', keep)``.

    Unstructured: exactly ``int(sparsity * out * in)`` weights are pruned overall (each
    block prunes its share, chosen layer-wide within the block). ``nm=(N, M)``: N of every
    M consecutive input weights are kept, chosen when the group's first column is reached.
    """
    H, W = prepare_hessian(hessian.float(), weight.float())
    rows, cols = W.shape
    U = inverse_cholesky_upper(H, percdamp)  # [in, in], upper
    del H
    pruned = torch.zeros_like(W, dtype=torch.bool)  # [out, in]
    done = 0
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()  # [out, c]
        U1 = U[i1:i2, i1:i2]  # [c, c]
        d = torch.diagonal(U1)  # [c]
        Err1 = torch.zeros_like(W1)
        P1 = torch.zeros_like(W1, dtype=torch.bool)  # [out, c]
        if nm is None:
            k = round(sparsity * rows * i2) - done  # cumulative rounding keeps the total exact
            sal = (W1.square() / d.square().unsqueeze(0)).flatten()  # [out * c]
            if k > 0:
                P1.view(-1)[torch.topk(sal, k, largest=False).indices] = True
            done += k
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:
                m = nm[1]
                sal = W1[:, i : i + m].square() / d[i : i + m].square().unsqueeze(0)  # [out, m]
                P1[:, i : i + m] = _prune_lowest_in_rows(sal, m - nm[0])
            w = W1[:, i]  # [out]
            q = torch.where(P1[:, i], torch.zeros_like(w), w)
            err = (w - q) / d[i]  # [out]
            W1[:, i:] -= err.unsqueeze(1) * U1[i, i:].unsqueeze(0)
            W1[:, i] = q
            Err1[:, i] = err
        W[:, i1:i2] = W1
        pruned[:, i1:i2] = P1
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    keep = ~pruned
    return W * keep, keep


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
    new, keep = sparsegpt_prune(w, stats.hessian, t.sparsity, t.nm, int(config.blocksize), float(config.percdamp))
    if mask is not None:  # weights pruned by an earlier stage stay pruned
        keep = keep & mask.to(keep.device)
    return UpdateResult(weight=new.to(w.dtype), mask=keep)
