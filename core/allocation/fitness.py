"""Fitness of an allocation candidate: KL divergence from the dense model on calibration tokens.

The dense model's next-token log-probabilities are computed once and cached; a candidate is
*stitched* into the model from the level database (weights swapped in place, or blocks
swapped for skips), never recompressed. ``metric="ppl"`` scores the mean next-token NLL
(log-perplexity) instead.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from llmpress.allocation.levels import LevelDatabase
from llmpress.errors import AllocationError
from llmpress.model.modules import get_weight, set_weight

log = logging.getLogger(__name__)


class Stitcher(Protocol):
    """Puts a candidate's levels into the model (``apply``) and the dense model back (``restore``)."""

    def apply(self, levels: Sequence[int]) -> None: ...

    def restore(self) -> None: ...


class WeightStitcher:
    """Sets each unit's weight to its level's weight from the database (only units that
    changed since the last candidate); :meth:`restore` puts the dense weights back."""

    def __init__(self, model: nn.Module, units: Sequence[str], db: LevelDatabase) -> None:
        self.mods = [model.get_submodule(u) for u in units]
        self.db = db
        self.dense = [get_weight(m).detach().cpu().clone() for m in self.mods]
        self.current: list[int | None] = [None] * len(units)

    @torch.no_grad()
    def apply(self, levels: Sequence[int]) -> None:
        for i, lv in enumerate(levels):
            if self.current[i] != lv:
                w = get_weight(self.mods[i])
                set_weight(self.mods[i], self.db.get(i, int(lv), w.dtype).weight.to(w.device))  # type: ignore[union-attr]
                self.current[i] = int(lv)

    @torch.no_grad()
    def restore(self) -> None:
        for i, m in enumerate(self.mods):
            if self.current[i] is not None:
                set_weight(m, self.dense[i].to(get_weight(m).device))
                self.current[i] = None


class ModuleStitcher:
    """Puts variant ``levels[i]`` of each unit (a block or sub-block) into the model;
    ``variants[i][0]`` is the unit as it is (what :meth:`restore` puts back)."""

    def __init__(
        self, model: nn.Module, units: Sequence[str], variants: Sequence[Sequence[nn.Module]]
    ) -> None:
        self.model = model
        self.units = list(units)
        self.variants = [list(v) for v in variants]
        self.current = [0] * len(units)

    def _set(self, i: int, mod: nn.Module) -> None:
        owner, _, child = self.units[i].rpartition(".")
        parent = self.model.get_submodule(owner)
        if isinstance(parent, nn.ModuleList):
            parent[int(child)] = mod
        else:
            setattr(parent, child, mod)

    def apply(self, levels: Sequence[int]) -> None:
        for i, lv in enumerate(levels):
            if self.current[i] != lv:
                self._set(i, self.variants[i][int(lv)])
                self.current[i] = int(lv)

    def restore(self) -> None:
        self.apply([0] * len(self.units))


def swap_stitcher(
    model: nn.Module, units: Sequence[str], make_skip: Callable[[int], nn.Module]
) -> ModuleStitcher:
    """Level 1 of each dropped unit (a block or sub-block) is ``make_skip(i)``."""
    return ModuleStitcher(model, units, [[model.get_submodule(u), make_skip(i)] for i, u in enumerate(units)])


class Fitness:
    """Scores the model as it currently is on the first sequences of ``ids`` [n, L].

    ``metric="kl"``: mean over tokens of ``KL(p_dense || p_model)``, the dense log-probs
    cached at construction (``n x L x vocab`` floats on CPU); ``"ppl"``: mean next-token NLL.
    """

    def __init__(
        self, model: nn.Module, ids: torch.Tensor, metric: str, device: torch.device, batch_size: int
    ) -> None:
        self.model, self.ids, self.metric, self.device = model, ids, metric, device
        self.batch_size = max(1, batch_size)
        self.evaluations = 0
        self.dense: list[torch.Tensor] = []
        if metric == "kl":
            n = ids.numel() * _vocab(model) * 4
            log.info("caching the dense model's log-probs on %d tokens (%.1f MiB)", ids.numel(), n / 2**20)
            self.dense = [lp.cpu() for lp in self._logprobs(ids.shape[0])]

    @torch.no_grad()
    def _logprobs(self, nseq: int) -> list[torch.Tensor]:
        out = []
        for x in self.ids[:nseq].split(self.batch_size):
            logits = self.model(input_ids=x.to(self.device), use_cache=False).logits
            out.append(F.log_softmax(logits.float(), dim=-1))  # [B, L, V]
        return out

    @torch.no_grad()
    def __call__(self, tokens: int) -> float:
        """Fitness on the first ``ceil(tokens / L)`` sequences (all of them at most)."""
        L = self.ids.shape[1]
        nseq = max(1, min(self.ids.shape[0], math.ceil(tokens / L)))
        self.evaluations += 1
        total, count = 0.0, 0
        b0 = 0
        for bi, lp in enumerate(self._logprobs(nseq)):
            if self.metric == "kl":
                ref = self.dense[bi][: lp.shape[0]].to(lp.device)  # [B, L, V]
                total += float((ref.exp() * (ref - lp)).sum())
                count += lp.shape[0] * L
            else:
                x = self.ids[b0 : b0 + lp.shape[0], 1:].to(lp.device)
                total += float(
                    F.nll_loss(lp[:, :-1].reshape(-1, lp.shape[-1]), x.reshape(-1), reduction="sum")
                )
                count += x.numel()
            b0 += lp.shape[0]
        value = total / max(count, 1)
        if not math.isfinite(value):
            raise AllocationError(f"the fitness of a candidate is {value} (the model produces NaN/inf)")
        return value


def _vocab(model: nn.Module) -> int:
    cfg = getattr(model, "config", None)
    return int(getattr(cfg, "vocab_size", 0) or 0)
