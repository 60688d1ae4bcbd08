"""Gradual pruning during recovery (Zhu & Gupta's cubic schedule; sparse pretraining, OBS-IHT).

The sparsity of each target layer rises from ``s0`` to ``s`` as
``s_t = s + (s0 - s) * (1 - t / T)^3`` over the first three quarters of the steps (``T``), the
last quarter training with the final mask. Every ``every`` steps the mask is re-selected per
output row by ``|w|`` (``magnitude``) or by the diagonal-Fisher OBS saliency ``w^2 * E[g^2]``
(``fisher``, the squared gradients accumulated since the last selection). A weight pruned once
(by an earlier stage or an earlier selection) stays pruned.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from llmpress.math.masks import unstructured_mask

#: the fraction of the steps over which the sparsity rises
RAMP = 0.75


@dataclasses.dataclass(frozen=True)
class PruneSchedule:
    """``{from: s0, to: s, every: k, score: magnitude | fisher}`` of a recovery stage."""

    start: float
    end: float
    every: int
    score: str = "magnitude"

    def sparsity(self, step: int, steps: int) -> float:
        """The target sparsity at ``step`` of ``steps``."""
        ramp = max(1, int(RAMP * steps))
        frac = min(1.0, step / ramp)
        return self.end + (self.start - self.end) * (1.0 - frac) ** 3

    def due(self, step: int, steps: int) -> bool:
        """Whether the mask is re-selected after ``step`` (until the ramp's end, then once)."""
        ramp = max(1, int(RAMP * steps))
        return step <= ramp and (step % self.every == 0 or step == ramp)


@dataclasses.dataclass
class GradualPruning:
    """Re-selects the keep masks (updated in place, so the gradient hooks see them) of the
    scheduled layers: name -> (weight, bool keep [out, in])."""

    schedule: PruneSchedule
    layers: dict[str, tuple[torch.Tensor, torch.Tensor]]
    fisher: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    hooks: list[torch.utils.hooks.RemovableHandle] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        if self.schedule.score == "fisher":
            for name, (w, _) in self.layers.items():
                self.fisher[name] = torch.zeros_like(w, dtype=torch.float32)
                self.hooks.append(w.register_hook(_accumulate_into(self.fisher[name])))

    @torch.no_grad()
    def select(self, step: int, steps: int) -> float:
        """Re-select every scheduled mask at ``step``; returns the sparsity asked for."""
        s = self.schedule.sparsity(step, steps)
        for name, (w, keep) in self.layers.items():
            score = (
                w.float().abs()
                if self.schedule.score == "magnitude"
                else w.float().pow(2) * self.fisher[name]
            )
            score = torch.where(keep, score, torch.full_like(score, -torch.inf))  # pruned stay pruned
            keep.logical_and_(unstructured_mask(score, s, "row").to(keep.device))
            w.masked_fill_(~keep, 0.0)
            if name in self.fisher:
                self.fisher[name].zero_()
        return s

    def masks(self) -> dict[str, torch.Tensor]:
        """The final keep masks (bool, on CPU)."""
        for h in self.hooks:
            h.remove()
        return {n: keep.cpu() for n, (_, keep) in self.layers.items()}


def _accumulate_into(fisher: torch.Tensor) -> Callable[[torch.Tensor], None]:
    """A gradient hook adding ``g^2`` into ``fisher``. It returns ``None``: a tensor hook that
    returns a tensor replaces the gradient (the squared sum would then train the weights)."""

    def hook(grad: torch.Tensor) -> None:
        fisher.add_(grad.float().pow(2))

    return hook
