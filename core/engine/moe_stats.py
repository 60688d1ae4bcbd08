"""Calibration statistics for every expert, however few tokens the router sends it.

With true routing an expert sees only the tokens routed to it, and with a small calibration set
some experts see few or none. Rule (:func:`complete_expert_stats`, run by the engine after each
statistics pass): an expert whose target layers received fewer than ``min_tokens`` routed
tokens (the recipe's top-level ``moe_min_tokens``, default :data:`DEFAULT_MIN_TOKENS`) gets its
statistics from *all* of the block's calibration tokens instead: one more pass over the block in
which every such expert is also run on every token reaching its MoE block, for statistics only
(that output is discarded; the block's outputs always come from true routing). With
``moe_min_tokens: 0`` the fallback is off; an expert that then saw no token gets empty
statistics (``X^T X = 0``), which the damped Cholesky factor turns into the identity, so GPTQ
and SparseGPT reduce to round-to-nearest and magnitude pruning there instead of failing.

It works for any MoE block whose ``experts`` child is a list of expert modules callable on
``[tokens, hidden]``: llmpress's :class:`llmpress.model.moe.UnfusedExperts` and older per-expert
``nn.ModuleList`` layouts alike.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch
from torch import nn

from llmpress.engine import distributed
from llmpress.engine.capture import BlockActivations
from llmpress.engine.stats import LayerStats, StatsCollector
from llmpress.model.modules import get_weight, in_out_features, is_linear
from llmpress.model.moe_model import moe_blocks

log = logging.getLogger(__name__)

#: routed tokens below which an expert's statistics come from all of the block's tokens
DEFAULT_MIN_TOKENS = 64


class _Stop(Exception):
    """Ends a fallback forward once the last MoE block has run its experts."""


def expert_targets(block: nn.Module, names: list[str]) -> dict[tuple[str, int], list[str]]:
    """``(moe block, expert index) -> target layers`` (names relative to ``block``) of the
    experts in ``block`` whose layers are among ``names``."""
    wanted = set(names)
    out: dict[tuple[str, int], list[str]] = {}
    for bname, moe in moe_blocks(block).items():
        experts = moe.experts
        if not isinstance(experts, nn.ModuleList):
            continue
        prefix = f"{bname}.experts" if bname else "experts"
        for e, ex in enumerate(experts):
            rels = [f"{prefix}.{e}.{n}" for n, m in ex.named_modules() if n and is_linear(m)]
            hit = [r for r in rels if r in wanted]
            if hit:
                out[(bname, e)] = hit
    return out


def complete_expert_stats(
    block: nn.Module,
    mods: dict[str, nn.Module],
    col: StatsCollector,
    acts: BlockActivations,
    min_tokens: int,
    where: str = "",
    key_prefix: str = "",
) -> dict[str, dict[str, Any]]:
    """Apply the fallback rule to ``col`` (statistics of ``mods`` just collected over
    ``acts``); returns, for every expert layer of ``mods``, report info: its routed tokens
    (``moe_routed_tokens``) and where its statistics came from (``moe_statistics``:
    ``"routed"`` or ``"all tokens"``).
    ``where``: the block's name (for messages); ``key_prefix``: what the keys of ``mods`` and
    ``col`` put before names relative to ``block`` (``""``, or the block's name and a dot)."""
    if key_prefix:
        rel = {k[len(key_prefix) :]: m for k, m in mods.items() if k.startswith(key_prefix)}
        view = StatsCollector(rel, col.needs, col.store)
        view.stats = {k[len(key_prefix) :]: v for k, v in col.stats.items() if k.startswith(key_prefix)}
        view.order = [k[len(key_prefix) :] for k in col.order if k.startswith(key_prefix)]
        out = complete_expert_stats(block, rel, view, acts, min_tokens, where)
        col.stats.update({key_prefix + k: v for k, v in view.stats.items()})
        col.order.extend(key_prefix + k for k in view.order if key_prefix + k not in col.order)
        return {key_prefix + k: v for k, v in out.items()}
    experts = expert_targets(block, list(mods))
    if not experts:
        return {}
    routed = {
        k: max((col.stats[r].nsamples for r in rels if r in col.stats), default=0)
        for k, rels in experts.items()
    }
    if distributed.world_size() > 1:  # decide on every rank's tokens together, so all ranks agree
        counts = torch.tensor([float(routed[k]) for k in experts], dtype=torch.float64)
        distributed.all_reduce_sum([counts])
        routed = {k: int(c) for k, c in zip(experts, counts.tolist())}
    short = {k: rels for k, rels in experts.items() if routed[k] < min_tokens}
    if short:
        fb = _all_token_stats(
            block, {r: mods[r] for rels in short.values() for r in rels}, short, acts, col.needs, col.store
        )
        for k, rels in short.items():
            log.info(
                "expert %s: %d routed tokens < moe_min_tokens=%d, statistics from all %d tokens of the block",
                ".".join(x for x in (where, k[0], "experts", str(k[1])) if x),
                routed[k],
                min_tokens,
                max((fb.stats[r].nsamples for r in rels if r in fb.stats), default=0),
            )
            for r in rels:
                if r in fb.stats:
                    col.stats[r] = fb.stats[r]
    _fill_empty(mods, col, experts)
    return {
        r: {"moe_routed_tokens": routed[k], "moe_statistics": "all tokens" if k in short else "routed"}
        for k, rels in experts.items()
        for r in rels
    }


def _all_token_stats(
    block: nn.Module,
    mods: dict[str, nn.Module],
    short: dict[tuple[str, int], list[str]],
    acts: BlockActivations,
    needs: frozenset[str],
    store: torch.device | None = None,
) -> StatsCollector:
    """Statistics of ``mods`` with every token of each MoE block run through the ``short``
    experts (a pre-hook on the MoE blocks; the forward stops after the last one)."""
    fb = StatsCollector(mods, needs, store)
    by_moe: dict[str, list[int]] = {}
    for bname, e in short:
        by_moe.setdefault(bname, []).append(e)
    seen: set[str] = set()

    def make_hook(bname: str, moe: nn.Module) -> Any:
        experts = moe.get_submodule("experts")
        assert isinstance(experts, nn.ModuleList)

        def hook(mod: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            x = args[0] if args else kwargs["hidden_states"]
            x = x.reshape(-1, x.shape[-1])  # [tokens, hidden]
            with fb, torch.no_grad():
                for e in by_moe[bname]:
                    experts[e](x)
            seen.add(bname)
            if len(seen) == len(by_moe):
                raise _Stop

        return hook

    handles = [
        block.get_submodule(b).register_forward_pre_hook(
            make_hook(b, block.get_submodule(b)), with_kwargs=True
        )
        for b in by_moe
    ]
    try:
        with torch.no_grad():
            for i, x in enumerate(acts.hidden):
                seen.clear()
                with contextlib.suppress(_Stop):
                    block(x.to(acts.compute), **acts.kwargs[i])
    finally:
        for h in handles:
            h.remove()
    return fb


def _fill_empty(
    mods: dict[str, nn.Module], col: StatsCollector, experts: dict[tuple[str, int], list[str]]
) -> None:
    """Empty statistics (no tokens) for expert layers that still have none, shared by the
    layers of one expert with the same input width, so every target has statistics."""
    for rels in experts.values():
        shared: dict[int, LayerStats] = {}
        for r in rels:
            if r in col.stats:
                continue
            w = get_weight(mods[r])
            n_in = in_out_features(mods[r])[0]
            st = shared.setdefault(n_in, LayerStats(n_in, w.device, col.needs))
            col.stats[r] = st
            col.order.append(r)
        for r in rels:
            if r not in col.order:
                col.order.append(r)
