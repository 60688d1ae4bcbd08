"""Distillation losses: next-token cross-entropy, logit KL at a temperature, SquareHead.

``ce`` follows the usual causal-LM shift; ``kl`` is ``KL(teacher || student)`` on softened
logits times ``T^2`` (Hinton et al.); ``squarehead`` sums over blocks the normalised hidden-state
error ``||h_s - h_t||^2 / ||h_t||^2`` (Kurtic et al., 2023). :func:`combined` is their weighted sum.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
import torch.nn.functional as F


@dataclasses.dataclass(frozen=True)
class LossWeights:
    """The weights of the three terms and the KL temperature."""

    ce: float = 0.0
    kl: float = 0.0
    squarehead: float = 0.0
    temperature: float = 1.0

    @property
    def needs_teacher(self) -> bool:
        return self.kl > 0 or self.squarehead > 0

    def as_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


def ce(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy: logits [B, L, V], ids [B, L] -> scalar."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``KL(teacher || student)`` per token on logits [B, L, V] at ``temperature``, times T^2."""
    t = float(temperature)
    s_log = F.log_softmax(student.float() / t, dim=-1)  # [B, L, V]
    t_log = F.log_softmax(teacher.float() / t, dim=-1)  # [B, L, V]
    per_token = (t_log.exp() * (t_log - s_log)).sum(-1)  # [B, L]
    return per_token.mean() * t * t


def squarehead(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sum over blocks of ``||h_s - h_t||^2 / ||h_t||^2`` (each [B, L, H]; the embeddings'
    output, entry 0 of ``hidden_states``, is not a block's and is skipped)."""
    total = torch.zeros((), device=student[-1].device)
    for hs, ht in zip(student[1:], teacher[1:]):
        ht = ht.float()
        total = total + (hs.float() - ht).pow(2).sum() / ht.pow(2).sum().clamp_min(1e-12)
    return total


def combined(
    w: LossWeights,
    ids: torch.Tensor,
    logits: torch.Tensor,
    hidden: Sequence[torch.Tensor] | None,
    t_logits: torch.Tensor | None = None,
    t_hidden: Sequence[torch.Tensor] | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The weighted loss of one batch and its terms (for the log)."""
    total = torch.zeros((), device=logits.device)
    parts: dict[str, float] = {}
    if w.ce > 0:
        v = ce(logits, ids)
        total, parts["ce"] = total + w.ce * v, float(v.detach())
    if w.kl > 0:
        assert t_logits is not None
        v = kl(logits, t_logits, w.temperature)
        total, parts["kl"] = total + w.kl * v, float(v.detach())
    if w.squarehead > 0:
        assert hidden is not None and t_hidden is not None
        v = squarehead(hidden, t_hidden)
        total, parts["squarehead"] = total + w.squarehead * v, float(v.detach())
    return total, parts
