"""Building a level database in one block pass over the dense model.

For each block the statistics its stage asks for are collected once, on the *dense* model's
activations (the builder commits nothing, so every level of every layer sees the same
inputs), then the stage's hooks run once per level (:func:`llmpress.engine.solve.solve_layer`,
the same solve a per-layer stage commits).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from llmpress.allocation.level_sets import LevelSet
from llmpress.allocation.levels import LevelDatabase, log_size_estimate, progress_bar
from llmpress.engine.block_pass import BlockPass
from llmpress.engine.record import RunRecord
from llmpress.engine.solve import solve_layer
from llmpress.engine.stage import BlockStep, BlockwiseStage, BoundStage
from llmpress.model.modules import get_weight
from llmpress.model.results import LayerResult

log = logging.getLogger(__name__)


class LevelBuilder(BlockwiseStage):
    """Every listed unit of a block at every level; the block is left as it was."""

    def __init__(
        self, stage: BoundStage, db: LevelDatabase, levels: LevelSet, todo: dict[int, list[int]], bar: tqdm
    ) -> None:
        super().__init__(stage, RunRecord())
        self.db, self.levels, self.todo, self.bar = db, levels, todo, bar

    def process_block(self, step: BlockStep) -> None:
        units = self.todo.get(step.index)
        if not units:
            return
        rels = {i: self.db.units[i][len(step.name) + 1 :] for i in units}
        mods = {rel: step.module.get_submodule(rel) for rel in rels.values()}
        needs = self.config.statistics() | {"sq_norms"}
        stats, _ = step.run.collect(step, mods, needs, True)
        for i, rel in rels.items():
            st = stats[rel]
            results = [
                self._level(self.db.units[i], mods[rel], st if self.config.calibrated() else None, value)
                for value in self.levels.values[i]
            ]
            self.db.put(i, results, st.sq_norms.clone())
            name = self.db.units[i]
            self.bar.set_postfix_str(name.rsplit(".", 3)[-3] if name.count(".") >= 3 else name)

    def _level(self, name: str, mod: nn.Module, stats: object, value: float) -> LayerResult:
        res = solve_layer(self.stage.hooks, name, mod, stats, self.config.at_level(value))  # type: ignore[arg-type]
        self.bar.update(1)
        if res.weight is None and res.mask is not None:
            res = dataclasses.replace(res, weight=get_weight(mod).detach() * res.mask)
        return res


@torch.no_grad()
def build_database(
    model: nn.Module,
    stage: BoundStage,
    kind: str,
    db: LevelDatabase,
    levels: LevelSet,
    ids: torch.Tensor,
    device: torch.device,
    batch_size: int,
    progress: bool,
    min_tokens: int,
) -> None:
    """Fill ``db`` with every unit at every level. Units already in ``db`` (a resumed or
    reused database) are skipped; nothing is built when all are there."""
    todo = [i for i in range(len(db.units)) if not db.has(i)]
    elem = get_weight(model.get_submodule(db.units[0])).element_size()
    log_size_estimate(db.shapes, levels, kind, elem, str(db.path or "in memory"))
    if not todo:
        log.info("level database complete (%d layers), reusing it", len(db.units))
        return
    run = BlockPass(model, device, RunRecord(), moe_min_tokens=min_tokens)
    by_block: dict[int, list[int]] = {}
    for i, b in zip(todo, unit_blocks([db.units[i] for i in todo], run.prefix)):
        by_block.setdefault(b, []).append(i)
    run.start(ids, batch_size)
    bar = progress_bar(sum(len(levels.values[i]) for i in todo), progress)
    run.run([LevelBuilder(stage, db, levels, by_block, bar)], progress=False, last=max(by_block))
    bar.close()


def unit_blocks(units: Sequence[str], prefix: str) -> list[int]:
    """Block index of each unit (qualified names under ``prefix``)."""
    return [int(u[len(prefix) + 1 :].split(".", 1)[0]) for u in units]
