"""Hessian conditioning and the damped inverse Cholesky factor shared by OBS-style methods.

SparseGPT and GPTQ both need ``U = chol(H^-1)^T`` (upper) of the damped layer Hessian
``H = X^T X / n``. It is computed here once; methods never copy it.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from llmpress.math.obs import asymmetric_correction

log = logging.getLogger(__name__)


def dead_inputs(hessian: torch.Tensor) -> torch.Tensor:
    """Bool [in]: input columns that were always zero (``diag(H) == 0``)."""
    return torch.diagonal(hessian) == 0


def inverse_cholesky_upper(
    hessian: torch.Tensor, percdamp: float = 0.01, max_tries: int = 6, overwrite: bool = False
) -> torch.Tensor:
    """Upper Cholesky factor of the damped inverse Hessian: ``U`` with ``U^T U = (H + λI)^-1``.

    hessian: [in, in] float32, unchanged unless ``overwrite`` (then damped in place). Dead
    inputs (zero diagonal) get a unit diagonal. If the damped matrix is not numerically
    positive definite, the damping grows 10x and is retried, with a warning.
    """
    return _inverse_cholesky_from([hessian if overwrite else hessian.clone()], percdamp, max_tries)


def _inverse_cholesky_from(box: list[torch.Tensor], percdamp: float, max_tries: int = 6) -> torch.Tensor:
    """Like :func:`inverse_cholesky_upper`, taking the only reference to H out of ``box`` so
    each [in, in] intermediate is freed as soon as the next exists (peak: two matrices)."""
    H = box.pop()
    dead = dead_inputs(H)
    H[dead, dead] = 1.0
    mean_diag = torch.mean(torch.diagonal(H))
    applied, pd = 0.0, percdamp
    for attempt in range(max_tries):
        H.diagonal().add_((pd - applied) * mean_diag)
        applied = pd
        L, info = torch.linalg.cholesky_ex(H)
        if int(info) == 0:
            del H
            L = torch.cholesky_inverse(L)  # H^-1, replacing L
            U, info = torch.linalg.cholesky_ex(L, upper=True)
            del L
            if int(info) == 0:
                if attempt:
                    log.warning(
                        "Hessian needed damping %.3g (asked %.3g) to be positive definite", pd, percdamp
                    )
                return U
            raise torch.linalg.LinAlgError("inverse Hessian is not positive definite; raise 'percdamp'")
        del L
        pd = pd * 10 if pd > 0 else 1e-6
    raise torch.linalg.LinAlgError(
        f"Hessian is not positive definite even with damping {pd:g}; use more calibration samples "
        f"or a larger 'percdamp'"
    )


def cached_inverse_cholesky(stats: Any, percdamp: float, perm: torch.Tensor | None = None) -> torch.Tensor:
    """``inverse_cholesky_upper`` of a :class:`LayerStats`' Hessian (dead inputs fixed), with
    rows and columns in the order ``perm`` if given; computed once and shared by every layer
    fed the same input (q/k/v, gate/up)."""
    key = f"inv_chol_upper:{percdamp}:{'perm' if perm is not None else 'natural'}"
    U = stats.cache.get(key)
    if U is None:
        # X^T X is consumed in place: it is only needed up to scale (the damping is relative)
        box = [stats.take_xtx()]  # the box holds the only reference, so it can be freed early
        if perm is not None:
            box[0] = box[0][perm][:, perm]
        U = _inverse_cholesky_from(box, percdamp)
        stats.cache[key] = U
    return U


def cached_asymmetric_correction(
    stats: Any, percdamp: float, alpha: float, perm: torch.Tensor | None = None
) -> torch.Tensor:
    """GPTAQ's correction ``P`` (:func:`llmpress.math.obs.asymmetric_correction`) of a
    :class:`LayerStats` with ``hessian`` and ``dense_cross``, in the order ``perm`` if given;
    computed once and shared by every layer fed the same input (q/k/v share one ``H`` and one
    ``dXX^T``). Dead inputs (``diag(H) == 0``) zero their ``dXX^T`` columns, as in the reference.
    """
    key = f"asym_p:{percdamp}:{alpha}:{'perm' if perm is not None else 'natural'}"
    P = stats.cache.get(key)
    if P is None:
        U = cached_inverse_cholesky(stats, percdamp, perm)
        # U factors the damped inverse of the *summed* X~^T X~: take dXX^T summed over the same tokens
        dxxt = stats.dense_cross.mul_(max(stats.nsamples, 1))
        dxxt[:, stats.sq_norms == 0] = 0.0
        if perm is not None:
            dxxt = dxxt[perm][:, perm]
        P = asymmetric_correction(dxxt, U, alpha)
        stats.cache[key] = P
    return P
