"""Pure math of structured pruning: scores to removal units, allocation, compensation.

Tensors in, tensors out; no modules. A *unit* is the smallest thing removed at once: one MLP
neuron, one query head from every key/value group (``heads`` removed evenly per group), or a
whole key/value group (its key/value head with all of its query heads). Each unit has a
score and a cost (the parameters it removes).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch


def standardize(x: torch.Tensor) -> torch.Tensor:
    """``(x - mean) / std`` over the vector (FLAP's per-layer standardization); a constant
    vector maps to zeros."""
    x = x.double()
    std = x.std() if x.numel() > 1 else torch.zeros((), dtype=x.dtype)
    return ((x - x.mean()) / std if std > 0 else x - x.mean()).float()


def group_sum(per_channel: torch.Tensor, width: int) -> torch.Tensor:
    """Sum consecutive runs of ``width`` channels: [n * width] -> [n] (channels to heads)."""
    return per_channel.reshape(-1, width).sum(1)


@dataclasses.dataclass(frozen=True)
class Units:
    """Removal units of one structure of one block, in the order they would be removed.

    ``scores`` [n] are non-decreasing; unit ``k`` may be removed only after units ``< k``.
    ``members[k]`` are the indices (heads, groups or neurons) the unit removes.
    """

    kind: str
    scores: torch.Tensor
    cost: int
    members: tuple[tuple[int, ...], ...]

    def __len__(self) -> int:
        return len(self.members)


def neuron_units(scores: torch.Tensor, cost: int, multiple: int = 1) -> Units:
    """Neurons, lowest score first, ``multiple`` at a time (widths stay multiples of it, for
    kernels and quantization groups); one unit's worth is never removed."""
    order = torch.sort(scores.float(), stable=True).indices  # [width]
    n_units = scores.numel() // multiple - 1
    chunks = order[: max(n_units, 0) * multiple].reshape(-1, multiple)  # [units, multiple]
    sc = scores.float()[chunks].mean(1) if chunks.numel() else scores.new_zeros(0)
    return Units("neurons", sc, cost * multiple, tuple(tuple(int(i) for i in c) for c in chunks))


def query_head_units(scores: torch.Tensor, n_kv: int, cost_per_head: int) -> Units:
    """Query heads removed evenly per key/value group: unit ``r`` removes the ``r``-th least
    important query head of every group (its score: their mean). One head per group stays."""
    per_group = scores.float().reshape(n_kv, -1)  # [n_kv, g]
    g = per_group.shape[1]
    s, idx = torch.sort(per_group, dim=1, stable=True)
    base = torch.arange(n_kv).unsqueeze(1) * g
    heads = (idx + base)[:, : g - 1]  # [n_kv, g - 1]
    return Units(
        "heads",
        s[:, : g - 1].mean(0),
        cost_per_head * n_kv,
        tuple(tuple(int(h) for h in heads[:, r]) for r in range(g - 1)),
    )


def kv_group_units(group_scores: torch.Tensor, cost_per_group: int) -> Units:
    """Whole key/value groups (a key/value head and its query heads), lowest first; one stays."""
    order = torch.sort(group_scores.float(), stable=True).indices[:-1]
    return Units("heads", group_scores.float()[order], cost_per_group, tuple((int(i),) for i in order))


def allocate_uniform(units: Sequence[Units], target: float) -> list[int]:
    """Units to remove of each structure of one block so that the removed parameters come
    closest to ``target``: the coarse structures (heads) first, each at the block's overall
    fraction, then the finest kind (the neurons, of every MLP of the block: each expert of a
    mixture-of-experts block and its shared expert) makes up the rest exactly, the same
    fraction of each of its lists (the largest remainders get the odd units)."""
    counts = [0] * len(units)
    if not units:
        return counts
    fine_kind = min(units, key=lambda u: u.cost).kind
    fine = [i for i, u in enumerate(units) if u.kind == fine_kind]
    total = sum(len(u) * u.cost for u in units)
    frac = target / total if total else 0.0
    removed = 0.0
    for i, u in enumerate(units):
        if i not in fine:
            counts[i] = int(min(len(u), max(0, math.floor(frac * len(u) + 0.5))))
            removed += counts[i] * u.cost
    room = sum(len(units[i]) * units[i].cost for i in fine)
    share = min(1.0, max(0.0, (target - removed) / room)) if room else 0.0  # of each fine list
    for i in fine:
        counts[i] = min(len(units[i]), math.floor(share * len(units[i])))
        removed += counts[i] * units[i].cost
    while True:  # one more unit, from the list furthest below its share, while that gets closer
        open_ = [i for i in fine if counts[i] < len(units[i])]
        if not open_:
            break
        i = max(open_, key=lambda j: (share * len(units[j]) - counts[j], -j))
        if removed + units[i].cost - target >= target - removed:
            break
        counts[i] += 1
        removed += units[i].cost
    return counts


def allocate_global(units: Sequence[Units], target: float, standardized: bool = True) -> list[int]:
    """FLAP's global allocation over many (block, structure) unit lists: remove units in
    increasing order of score (each list's scores standardized when ``standardized``; the
    lists' own order respected) until the removed parameters come closest to ``target``."""
    keyed: list[tuple[float, int, int]] = []
    for li, u in enumerate(units):
        s = standardize(u.scores) if standardized and len(u) else u.scores
        best = -math.inf
        for k in range(len(u)):
            best = max(best, float(s[k]))  # keep each list's order monotone
            keyed.append((best, li, k))
    keyed.sort(key=lambda t: (t[0], t[1], t[2]))
    # in score order, take every unit that still fits the budget; a list whose next unit does
    # not fit is closed (its order must hold), so finer structures fill the rest exactly
    counts = [0] * len(units)
    closed: set[int] = set()
    removed = 0
    for _, li, k in keyed:
        if li in closed or k != counts[li]:
            continue
        if removed + units[li].cost <= target:
            counts[li] += 1
            removed += units[li].cost
        else:
            closed.add(li)
    nxt = [
        li
        for li, u in enumerate(units)
        if counts[li] < len(u) and removed + u.cost - target < target - removed
    ]
    if nxt:  # one more unit lands closer to the target than stopping short
        li = min(nxt, key=lambda i: (abs(removed + units[i].cost - target), i))
        counts[li] += 1
    return counts


def removed_members(u: Units, count: int) -> list[int]:
    """The indices the first ``count`` units of ``u`` remove."""
    return sorted(i for m in u.members[:count] for i in m)


def compensation_bias(weight: torch.Tensor, mean: torch.Tensor, removed: torch.Tensor) -> torch.Tensor:
    """FLAP's bias compensation: the mean contribution ``W[:, R] @ E[x_R]`` [out] of the
    removed input channels ``R``, to be added to the layer's output bias."""
    w = weight.float()[:, removed]  # [out, |R|]
    return w @ mean.float()[removed].to(w.device)


def reconstruct(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    keep: torch.Tensor,
    mean: torch.Tensor | None = None,
    damp: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Least-squares update of a consumer whose input columns ``keep`` remain.

    With ``H = E[x x^T]`` [in, in]: the ``W'`` [out, |K|] minimizing
    ``E||W x - W' x_K||^2`` is ``W H[:, K] H[K, K]^-1``. With ``mean = E[x]`` a bias change
    ``b`` [out] is fitted too (a constant input appended: the removed channels' mean
    contribution is absorbed, as in FLAP's compensation). Damping: ``damp * mean diag`` on
    ``H[K, K]``.
    Returns ``(W', b or None)``.
    """
    h = hessian.double()
    k = keep.to(torch.int64)
    a = h[k][:, k]  # [K, K]
    a = a + damp * torch.diagonal(a).mean().clamp_min(1e-12) * torch.eye(len(k), dtype=a.dtype)
    rhs = weight.double() @ h[:, k]  # [out, K]
    if mean is not None:  # the constant input is not damped
        m = mean.double()
        a = torch.cat(
            [torch.cat([a, m[k].unsqueeze(1)], 1), torch.cat([m[k], m.new_ones(1)]).unsqueeze(0)], 0
        )
        rhs = torch.cat([rhs, (weight.double() @ m).unsqueeze(1)], 1)  # [out, K + 1]
    sol = torch.linalg.solve(a, rhs.t()).t()  # a is symmetric
    if mean is None:
        return sol.to(weight.dtype), None
    return sol[:, :-1].to(weight.dtype), sol[:, -1].to(weight.dtype)
