"""DSnoT (Zhang et al., ICLR 2024): training-free refinement of any pruning mask.

For each output row ``i`` the *expected* reconstruction error of the pruned layer is
``e_i = sum_j (W0 - W)_ij E[x_j]`` (``W0`` dense, ``W`` pruned). DSnoT repeatedly swaps one
pruned and one kept weight of the row to shrink ``|e_i|``, without updating any weight:

* regrow the pruned weight ``j`` whose dense contribution ``W0_ij E[x_j]`` has the sign of
  ``e_i`` and the largest ``|W0_ij E[x_j]| / Var(x_j)^var_power`` (a high-variance input
  makes the expectation a poor guide);
* prune the kept weight with the lowest Wanda score ``|W_ij| ||X_j||`` whose removal keeps
  the sign of the error and shrinks it (in ``j``'s group for an ``N:M`` pattern);
* a row stops when ``|e_i| <= update_threshold``, when no such pair exists, or after
  ``max_cycles`` swaps.

So each row keeps its number of weights (each ``N:M`` group its N), ``|e_i|`` never grows,
and a regrown weight takes back its dense value. It runs on any pruning stage with a
``dsnot:`` section, after the method's mask and weight update, through the
``llmpress_refine_mask`` hook (a general plugin: it registers no method).

Defaults are the paper's (50 cycles, threshold 0.1, variance power 1, the sign rule on, every
layer). The reference's ``main.py`` differs: ``--skip_layer mlp`` skips the MLP layers and
``--without_same_sign`` (``type=bool``, default ``True``) switches the sign rule off. Its
statistic ``sum_metric_row`` is ``seqlen * E[x]`` (a per-sequence sum); here ``E[x]`` is per
token, so the same threshold is ``seqlen`` times stricter there (see the README).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from llmpress import hookimpl
from llmpress.engine.stats import LayerStats
from llmpress.model.modules import get_weight
from llmpress.model.results import LayerResult
from llmpress.recipe.config import DSnoTOptions, MethodConfig, PruningConfig

_EPS = 1e-12


@dataclasses.dataclass
class _Rows:
    """The running state of DSnoT over all rows of one layer."""

    keep: torch.Tensor  # [out, in] bool, the refined keep mask
    regrowable: torch.Tensor  # [out, in] bool, pruned at the start and still pruned
    prunable: torch.Tensor  # [out, in] bool, kept at the start and still kept
    wanda: torch.Tensor  # [out, in] float, the pruning order |W_ij| ||X_j||
    error: torch.Tensor  # [out] float64, e = sum_j (W0 - W)_ij E[x_j]
    active: torch.Tensor  # [out] bool


def expected_error(w0: torch.Tensor, w: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """Per-row expected reconstruction error ``(W0 - W) E[x]`` [out] (float64)."""
    return ((w0.double() - w.double()) * mean.double().unsqueeze(0)).sum(1)


def _swap(
    st: _Rows, regrow: torch.Tensor, prune: torch.Tensor, key: torch.Tensor, group: torch.Tensor | None
) -> None:
    """One cycle: for every active row pick a (regrow, prune) pair and apply it."""
    e = st.error
    sign = torch.sign(e).unsqueeze(1)  # [out, 1]
    k_reg = (key * sign).masked_fill(~st.regrowable | (regrow * sign <= 0), -float("inf"))
    best, j = k_reg.max(1)  # [out]
    e1 = e - regrow.gather(1, j.unsqueeze(1)).squeeze(1).double()  # error after regrowing j
    ek = e1.unsqueeze(1) + prune.double()  # [out, in]: error after also pruning k
    valid = st.prunable & (torch.sign(ek) == sign) & (ek.abs() < e.abs().unsqueeze(1))
    if group is not None:
        valid &= group.unsqueeze(0) == group[j].unsqueeze(1)  # N:M: stay in j's group
    score, k = torch.where(valid, st.wanda, float("inf")).min(1)
    ok = st.active & torch.isfinite(best) & torch.isfinite(score)
    rows = ok.nonzero().squeeze(1)
    jr, kr = j[rows], k[rows]
    st.keep[rows, jr] = True
    st.keep[rows, kr] = False
    st.regrowable[rows, jr] = False
    st.prunable[rows, kr] = False
    st.error = torch.where(ok, e1 + prune.gather(1, k.unsqueeze(1)).squeeze(1).double(), e)
    st.active &= ok


@torch.no_grad()
def dsnot_refine(
    w0: torch.Tensor,
    w: torch.Tensor,
    keep: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    sq_norms: torch.Tensor,
    options: DSnoTOptions,
    nm: tuple[int, int] | None = None,
) -> torch.Tensor:
    """DSnoT's refined keep mask [out, in] (bool) of a pruned layer.

    ``w0``: the dense weight [out, in]; ``w``: the pruned (possibly updated) weight, zero
    where ``keep`` is False; ``mean``/``var``/``sq_norms`` [in]: the inputs' per-column mean,
    variance and ``sum x^2``; ``nm``: swaps stay inside each group of ``M`` inputs.
    """
    w0, w = w0.float(), w.float()
    mean = mean.to(w.device).float()
    regrow = w0 * mean.unsqueeze(0)  # [out, in]: e drops by this when j is regrown
    prune = w * mean.unsqueeze(0)  # [out, in]: e grows by this when k is pruned
    key = regrow / var.to(w.device).float().clamp_min(_EPS).pow(options.var_power).unsqueeze(0)
    st = _Rows(
        keep=keep.clone(),
        regrowable=~keep,
        prunable=keep.clone(),
        wanda=w.abs() * sq_norms.to(w.device).float().sqrt().unsqueeze(0),
        error=expected_error(w0, w, mean),
        active=torch.ones(w.shape[0], dtype=torch.bool, device=w.device),
    )
    group = None if nm is None else torch.arange(w.shape[1], device=w.device) // nm[1]
    for _ in range(int(options.max_cycles)):
        st.active &= st.error.abs() > float(options.update_threshold)
        if not bool(st.active.any()):
            break
        _swap(st, regrow, prune, key, group)
    return st.keep


@hookimpl
def llmpress_refine_mask(
    module: nn.Module, result: LayerResult, stats: LayerStats | None, config: MethodConfig
) -> LayerResult | None:
    if not isinstance(config, PruningConfig) or config.dsnot is None or result.mask is None:
        return None
    assert stats is not None  # PruningConfig.calibrated() is True with dsnot
    w0 = get_weight(module).detach()
    keep0 = result.mask.to(w0.device)
    w = (result.weight if result.weight is not None else w0).to(w0.device) * keep0
    keep = dsnot_refine(w0, w, keep0, stats.mean, stats.variance, stats.sq_norms, config.dsnot,
                        config.sparsity_target().nm)  # fmt: skip
    regrown = keep & ~keep0
    info = dict(result.info, dsnot_swaps=float(regrown.sum()))
    if result.weight is None:
        return dataclasses.replace(result, mask=keep, info=info)
    new = torch.where(regrown, w0, w) * keep  # regrown weights take back their dense value
    return dataclasses.replace(result, weight=new.to(w0.dtype), mask=keep, info=info)
