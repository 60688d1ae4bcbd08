"""Hessian conditioning and the damped inverse Cholesky factor shared by OBS-style methods.

SparseGPT and GPTQ both need ``U = chol(H^-1)^T`` (upper) of the damped layer Hessian
``H = X^T X / n``. It is computed here once; methods never copy it.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

log = logging.getLogger(__name__)


def dead_inputs(hessian: torch.Tensor) -> torch.Tensor:
    """Bool [in]: input columns that were always zero (``diag(H) == 0``)."""
    return torch.diagonal(hessian) == 0


def prepare_hessian(hessian: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fix dead inputs, in place: ``H[d, d] = 1`` and ``W[:, d] = 0`` for each dead column ``d``.

    hessian: [in, in], weight: [out, in] (both float32, owned by the caller and modified).
    A never-active input carries no information, as in the reference implementations.
    """
    dead = dead_inputs(hessian)
    if bool(dead.any()):
        hessian[dead, dead] = 1.0
        weight[:, dead] = 0.0
    return hessian, weight


def damp(hessian: torch.Tensor, percdamp: float) -> torch.Tensor:
    """``H + percdamp * mean(diag(H)) * I`` (in place on ``hessian``, which is returned)."""
    d = percdamp * torch.mean(torch.diag(hessian))
    hessian.diagonal().add_(d)
    return hessian


def inverse_cholesky_upper(hessian: torch.Tensor, percdamp: float = 0.01, max_tries: int = 6) -> torch.Tensor:
    """Upper Cholesky factor of the damped inverse Hessian: ``U`` with ``U^T U = (H + λI)^-1``.

    hessian: [in, in] float32 (not modified). If the damped matrix is not positive definite
    (numerically), the damping is multiplied by 10 and retried, with a warning.
    """
    pd = percdamp
    for attempt in range(max_tries):
        H = damp(hessian.clone(), pd)
        L, info = torch.linalg.cholesky_ex(H)
        del H
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            del L
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            del Hinv
            if int(info) == 0:
                if attempt:
                    log.warning("Hessian needed damping %.3g (asked %.3g) to be positive definite", pd, percdamp)
                return U
        pd = pd * 10 if pd > 0 else 1e-6
    raise torch.linalg.LinAlgError(
        f"Hessian is not positive definite even with damping {pd:g}; use more calibration samples "
        f"or a larger 'percdamp'"
    )


def cached_inverse_cholesky(stats: Any, percdamp: float) -> torch.Tensor:
    """``inverse_cholesky_upper`` of a :class:`LayerStats`' Hessian (dead inputs fixed),
    computed once and shared by every layer fed the same input (q/k/v, gate/up)."""
    key = f"inv_chol_upper:{percdamp}"
    U = stats.cache.get(key)
    if U is None:
        H = stats.hessian  # a fresh tensor
        dead = dead_inputs(H)
        H[dead, dead] = 1.0
        U = inverse_cholesky_upper(H, percdamp)
        stats.cache.clear()  # keep one factor per input alive at most
        stats.cache[key] = U
    return U
