"""ADMM weight update for pruning (Boža, 2024): the masked least-squares problem solved by
a few ADMM iterations, with a mask that grows over the first iterations.

For a layer with weight ``W0`` [out, in] and input Hessian ``H = X^T X``, pruning to a keep
mask ``M`` asks for ``min ||X (W - W0)^T||^2`` subject to ``W = W * M``. ADMM splits ``W``
(the least-squares variable) from ``Z`` (the masked copy), with scaled dual ``U``::

    W <- (H + rho I)^-1 (H W0 + rho (Z - U))      # one factorisation per layer, reused
    Z <- (W + U) * M                              # M chosen on |W + U| while it grows
    U <- U + W - Z

In the preconditioned basis (columns scaled by ``sqrt(diag H)``, so ``diag H = 1``), with
``H`` damped by ``percdamp * mean(diag H)``. The mask grows on the paper's cubic schedule
``s (1 - (1 - t/T)^3)`` over the first ``T = prune_iters`` iterations (``schedule: cubic``);
the reference code computes that schedule but prunes to the final sparsity at every
selection (``schedule: final``). The result is ``Z``: exactly the mask's zeros.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, ClassVar, Literal

import torch
from pydantic import Field
from torch import nn

from llmpress import hookimpl
from llmpress.engine.stats import LayerStats
from llmpress.errors import RecipeError
from llmpress.math.linalg import dead_inputs, inverse_cholesky_upper
from llmpress.math.masks import nm_mask, unstructured_mask
from llmpress.math.targets import SparsityTarget
from llmpress.model.modules import get_weight
from llmpress.model.results import LayerResult
from llmpress.recipe.config import NonNegativeInt, PruningConfig


@dataclasses.dataclass(frozen=True)
class ADMMConfig(PruningConfig):
    """ADMM pruning: the sparsity target plus the iteration's options.

    ``percdamp`` (0.1, the paper's and reference's damping: ADMM solves with ``H`` itself,
    so it needs more than SparseGPT's 0.01), ``rho`` (1, on the preconditioned ``H`` whose
    diagonal is 1), ``iters`` (20), ``prune_iters`` (15: the mask grows and is re-chosen
    over these first iterations, then stays fixed), ``schedule`` (``cubic``: the paper's
    gradual mask, the default; ``final``: the reference code's, full sparsity from the first
    iteration), ``mask_from`` (``none``: ADMM chooses the mask on ``|W + U|``; ``wanda`` or
    ``sparsegpt``: the mask is chosen once from those methods' scores and ADMM only updates
    the weights). Unstructured masks are compared over the whole layer (as in the reference
    code), except Wanda's, which is compared per output row (Wanda's own choice).
    """

    method: ClassVar[str] = "admm"
    stats: ClassVar[frozenset[str]] = frozenset({"hessian"})
    percdamp: Annotated[float, Field(ge=0, lt=10)] = 0.1
    rho: Annotated[float, Field(gt=0)] = 1.0
    iters: NonNegativeInt = 20
    prune_iters: NonNegativeInt = 15
    schedule: Literal["cubic", "final"] = "cubic"
    mask_from: Literal["none", "wanda", "sparsegpt"] = "none"
    citation: ClassVar[str] = """@article{boza2024fast,
      title   = {Fast and Optimal Weight Update for Pruned Large Language Models},
      author  = {Bo{\\v{z}}a, Vladim{\\'\\i}r},
      journal = {arXiv preprint arXiv:2401.02938},
      year    = {2024}
    }"""

    def validate(self) -> None:
        super().validate()
        if self.prune_iters > self.iters:
            raise RecipeError(
                f"method 'admm': prune_iters {self.prune_iters} exceeds iters {self.iters}; the mask "
                f"can only grow during the iterations, so make prune_iters <= iters"
            )
        if self.mask_from == "none" and self.iters > 0 and self.prune_iters == 0:
            raise RecipeError(
                "method 'admm': prune_iters 0 with mask_from 'none' never chooses a mask; use "
                "prune_iters >= 1 or take the mask from 'wanda' or 'sparsegpt'"
            )

    def statistics(self) -> frozenset[str]:
        return super().statistics() | ({"sq_norms"} if self.mask_from == "wanda" else set())

    def sparsity_target(self) -> SparsityTarget:
        group = "row" if self.mask_from == "wanda" else "layer"
        return dataclasses.replace(super().sparsity_target(), group=group)


@dataclasses.dataclass(frozen=True)
class ADMMFactor:
    """What ADMM needs of one layer input, shared by the layers fed it (q/k/v, gate/up).

    ``scale`` [in]: ``sqrt(diag H)``; ``hess`` [in, in]: the preconditioned, damped
    ``H + percdamp I`` (the right-hand side's matrix); ``inv`` [in, in]:
    ``(H + (percdamp + rho) I)^-1``, from core's damped inverse-Cholesky helper, once per
    layer input (not per iteration); ``dead`` [in]: inputs
    that were always zero.
    """

    scale: torch.Tensor
    hess: torch.Tensor
    inv: torch.Tensor
    dead: torch.Tensor


def admm_factor(hessian: torch.Tensor, percdamp: float = 0.1, rho: float = 1.0) -> ADMMFactor:
    """Precondition ``hessian`` [in, in] (``X^T X`` up to scale) and factor it once."""
    H = hessian.to(torch.float32)
    dead = dead_inputs(H)
    scale = torch.diagonal(H).sqrt() + 1e-8  # [in]
    Hn = H / scale.unsqueeze(0) / scale.unsqueeze(1)  # [in, in], unit diagonal (dead: 0)
    Hn[dead, dead] = 1.0
    mean = float(torch.diagonal(Hn).mean())
    U = inverse_cholesky_upper(Hn, percdamp + rho / mean)  # U^T U = (Hn + (d + rho) I)^-1
    inv = U.t() @ U  # [in, in]
    del U
    Hn.diagonal().add_(percdamp * mean)
    return ADMMFactor(scale=scale, hess=Hn, inv=inv, dead=dead)


def _select(
    V: torch.Tensor, sparsity: float, target: SparsityTarget, forced: torch.Tensor | None
) -> torch.Tensor:
    """Keep mask [out, in] pruning ``sparsity`` of ``V`` [out, in] by ``|V|`` under ``target``'s
    pattern (growing ``N:M``: each group's top N kept, the rest pruned layer-wide);
    ``forced`` [out, in] bool: weights that must be pruned (scored lowest)."""
    scores = V.abs()
    if forced is not None:
        scores = scores.masked_fill(forced, -1.0)
    if target.nm is None:
        return (
            _layer_mask(scores, sparsity)
            if target.group == "layer"
            else unstructured_mask(scores, sparsity, "row")
        )
    n, m = target.nm
    if sparsity >= 1.0 - n / m - 1e-12:
        return nm_mask(scores, n, m)
    top = nm_mask(scores, n, m)  # the N kept in every group never compete
    return _layer_mask(scores.masked_fill(top, float("inf")), sparsity)


def _layer_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """:func:`unstructured_mask` over the whole layer, by a k-th value rather than a full sort
    (selected 15 times per layer, the sort dominated ADMM's time); ties at the threshold fall
    back to the stable sort, so the result is the same."""
    k = int(scores.numel() * sparsity)
    if k == 0:
        return torch.ones_like(scores, dtype=torch.bool)
    keep = scores > scores.flatten().kthvalue(k).values
    if int(keep.numel() - keep.sum()) != k:
        return unstructured_mask(scores, sparsity, "layer")
    return keep


def cubic_sparsity(t: int, total: int, sparsity: float) -> float:
    """The paper's schedule: sparsity at iteration ``t`` (0-based) of ``total`` growing ones."""
    return sparsity * (1.0 - (1.0 - (t + 1) / total) ** 3)


@torch.no_grad()
def admm_prune(
    weight: torch.Tensor,
    factor: ADMMFactor,
    target: SparsityTarget,
    rho: float = 1.0,
    iters: int = 20,
    prune_iters: int = 15,
    schedule: str = "cubic",
    mask: torch.Tensor | None = None,
    forced: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Prune ``weight`` [out, in] to ``target`` with ADMM; returns ``(W', keep, loss)``.

    ``mask`` [out, in] bool: a fixed keep mask (no selection; ADMM only updates the weights).
    Else the mask is chosen on ``|W + U|`` in each of the first ``prune_iters`` iterations,
    at the ``cubic`` schedule's sparsity or at the ``final`` one; ``forced``: weights that
    must end pruned (an earlier stage's). ``loss``: ``tr(dW H dW^T) / 2`` in the
    preconditioned basis (``H`` undamped, diagonal 1), the layer's reconstruction error.
    """
    W0 = weight.to(torch.float32)
    s = factor.scale
    WT = (W0 * s).t().contiguous()  # [in, out], preconditioned
    XY = factor.hess @ WT  # [in, out]
    keep = mask if mask is not None else torch.ones_like(W0, dtype=torch.bool)
    U = torch.zeros_like(WT)
    W = WT
    for t in range(iters):
        if mask is None and t < prune_iters:
            cur = cubic_sparsity(t, prune_iters, target.sparsity) if schedule == "cubic" else target.sparsity
            keep = _select((W + U).t(), cur, target, forced)  # [out, in]
        Z = (W + U) * keep.t()
        U += W - Z
        W = factor.inv @ (XY + rho * (Z - U))  # [in, out]
    if mask is None and (iters == 0 or prune_iters == 0):
        keep = _select(WT.t(), target.sparsity, target, forced)
    if forced is not None:
        keep = keep & ~forced
    Z = ((W + U) * keep.t()).t()  # [out, in]
    dZ = Z - W0 * s
    hess = factor.hess - torch.diag(factor.hess.diagonal() - 1.0)  # undamped, unit diagonal
    loss = float((dZ @ hess * dZ).sum(dtype=torch.float64)) / 2
    out = Z / s
    out[:, factor.dead] = W0[:, factor.dead] * keep[:, factor.dead]  # no data: keep the old value
    return out, keep, loss


@hookimpl
def llmpress_register_methods(register) -> None:  # noqa: ANN001
    register(ADMMConfig)


@hookimpl
def llmpress_score_importance(
    module: nn.Module, stats: LayerStats, config: ADMMConfig
) -> torch.Tensor | None:
    """Wanda's or SparseGPT's one-shot scores when ``mask_from`` asks for them, else none."""
    if config.mask_from == "none":
        return None
    w = get_weight(module).detach().float()
    if config.mask_from == "wanda":
        return w.abs() * stats.col_norms.to(w.device).unsqueeze(0)  # |W| ||X_j||
    key = "admm:sparsegpt_diag"
    d = stats.cache.get(key)
    if d is None:
        d = torch.diagonal(inverse_cholesky_upper(stats.hessian, 0.01)).clone()  # [in]
        stats.cache[key] = d
    return w.square() / d.to(w.device).square().unsqueeze(0)  # OBS saliency w^2 / U_jj^2


def _factor(stats: LayerStats, config: ADMMConfig) -> ADMMFactor:
    key = f"admm:{config.percdamp}:{config.rho}"
    f = stats.cache.get(key)
    if f is None:
        f = admm_factor(stats.hessian, float(config.percdamp), float(config.rho))
        stats.cache[key] = f
    return f


@hookimpl
def llmpress_update_weights(
    module: nn.Module, mask: torch.Tensor | None, stats: LayerStats, config: ADMMConfig
) -> LayerResult:
    w = get_weight(module).detach()
    f = _factor(stats, config)
    fixed = forced = None
    if mask is not None:
        mask = mask.to(w.device)
        if config.mask_from == "none":
            forced = ~mask  # an earlier stage's pruned weights stay pruned
        else:
            fixed = mask
    new, keep, loss = admm_prune(
        w, f, config.sparsity_target(), float(config.rho), int(config.iters), int(config.prune_iters),
        config.schedule, mask=fixed, forced=forced,
    )  # fmt: skip
    return LayerResult(weight=new.to(w.dtype), mask=keep, loss=loss)
