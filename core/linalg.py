"""Hessian conditioning and the damped inverse Cholesky factor shared by OBS-style methods.

SparseGPT and GPTQ both need ``U = chol(H^-1)^T`` (upper) of the damped layer Hessian
``H = X^T X / n``. It is computed here once; methods never copy it.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


def prepare_hessian(hessian: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fix dead inputs: columns whose input was always zero.

    hessian: [in, in], weight: [out, in] (float32). Returns copies ``(H, W)`` with
    ``H[d, d] = 1`` and ``W[:, d] = 0`` for every dead column ``d`` (as the reference
    implementations do: a never-active input carries no information).
    """
    H = hessian.clone()
    W = weight.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    return H, W


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
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info) == 0:
                if attempt:
                    log.warning("Hessian needed damping %.3g (asked %.3g) to be positive definite", pd, percdamp)
                return U
        pd = pd * 10 if pd > 0 else 1e-6
    raise torch.linalg.LinAlgError(
        f"Hessian is not positive definite even with damping {pd:g}; use more calibration samples "
        f"or a larger 'percdamp'"
    )
