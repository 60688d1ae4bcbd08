"""Building a level database in one sequential pass over the dense model's blocks."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

from llmpress.allocation.level_sets import LevelSet
from llmpress.allocation.levels import (
    LevelDatabase,
    compute_result,
    level_config,
    log_size_estimate,
    progress_bar,
)
from llmpress.engine.capture import BlockActivations, outside_blocks_on
from llmpress.engine.moe_stats import DEFAULT_MIN_TOKENS, complete_expert_stats
from llmpress.engine.stats import StatsCollector
from llmpress.method_hooks import MethodHooks
from llmpress.model.modules import find_blocks, get_weight
from llmpress.recipe.config import MethodConfig

log = logging.getLogger(__name__)


@torch.no_grad()
def build_database(
    model: nn.Module,
    config: MethodConfig,
    hooks: MethodHooks,
    kind: str,
    db: LevelDatabase,
    levels: LevelSet,
    ids: torch.Tensor,
    device: torch.device,
    batch_size: int,
    progress: bool = True,
    min_tokens: int = DEFAULT_MIN_TOKENS,
) -> None:
    """Fill ``db`` with every unit at every level: statistics per block on the dense model's
    activations (shared by all levels), then the stage's plugins once per level. Units already
    in ``db`` (a resumed or reused database) are skipped; nothing is built when all are there."""
    todo = [i for i in range(len(db.units)) if not db.has(i)]
    elem = get_weight(model.get_submodule(db.units[0])).element_size()
    log_size_estimate(db.shapes, levels, kind, elem, str(db.path or "in memory"))
    if not todo:
        log.info("level database complete (%d layers), reusing it", len(db.units))
        return
    prefix, blocks = find_blocks(model)
    by_block: dict[int, list[int]] = {}
    for i in todo:
        by_block.setdefault(int(db.units[i][len(prefix) + 1 :].split(".", 1)[0]), []).append(i)
    needs = set(config.stats) | {"sq_norms"}
    acts = BlockActivations(store=device, compute=device)
    with outside_blocks_on(model, prefix, device):
        acts.capture(model, blocks[0], ids, batch_size)
    last = max(by_block)
    bar = progress_bar(sum(len(levels.values[i]) for i in todo), progress)
    for b in range(last + 1):
        block = blocks[b]
        home = next(block.parameters()).device
        block.to(device)
        if b in by_block:
            mods = {db.units[i]: model.get_submodule(db.units[i]) for i in by_block[b]}
            with StatsCollector(mods, needs) as col:
                acts.run(block, keep_outputs=False, on_batch=col.new_batch)
            complete_expert_stats(block, mods, col, acts, min_tokens, f"{prefix}.{b}", f"{prefix}.{b}.")
            for i in by_block[b]:
                name = db.units[i]
                st = col.stats[name]
                norms = st.sq_norms.clone()
                results = []
                for value in levels.values[i]:
                    cfg = level_config(config, kind, value)
                    results.append(
                        compute_result(hooks, mods[name], st if config.needs_calibration else None, cfg)
                    )
                    bar.update(1)
                db.put(i, results, norms)
                bar.set_postfix_str(name.rsplit(".", 3)[-3] if name.count(".") >= 3 else name)
            del col
        if b < last:
            acts.run(block, keep_outputs=True)
        block.to(home)
    bar.close()


def unit_blocks(units: Sequence[str], prefix: str) -> list[int]:
    """Block index of each unit (qualified names under ``prefix``)."""
    return [int(u[len(prefix) + 1 :].split(".", 1)[0]) for u in units]
