"""The block-change stage kind: one ``llmpress_change_block`` call per block.

For methods whose unit of work is larger than one linear layer (structured pruning of heads
and neurons, SmoothQuant's scale migration). A method config opts in by subclassing
:class:`BlockMethodConfig`. A method that decides across blocks (``plans_globally()``) first
scores every block of the unchanged model (``llmpress_score_block``); its
``model_changes`` (hidden channels removed everywhere) are applied before the first block.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import ClassVar

from llmpress.engine.block_pass import BlockPass
from llmpress.engine.record import RunRecord
from llmpress.engine.stage import BlockStep, BlockwiseStage, BoundStage
from llmpress.engine.stats import LayerStats
from llmpress.model.modules import in_out_features
from llmpress.model.results import LayerResult, merge_results
from llmpress.model.structures import block_widths
from llmpress.recipe.config import MethodConfig
from llmpress.structure.blocks import BlockContext, BlockDecision, BlockInputs, BlockScore, apply_block_change
from llmpress.structure.hidden import PruneHidden, hidden_size, prune_hidden
from llmpress.structure.summary import structure_summary

log = logging.getLogger(__name__)


class BlockChange(BlockwiseStage):
    """Block-level changes inside the block pass."""

    def __init__(self, stage: BoundStage, record: RunRecord) -> None:
        super().__init__(stage, record)
        if not isinstance(self.config, BlockMethodConfig):
            raise TypeError(f"{self.stage.name}: a block-change stage needs a BlockMethodConfig")
        self.block_config: BlockMethodConfig = self.config
        self.scores: list[BlockScore | None] = []
        self.decision: BlockDecision | None = None

    def needs_planning(self) -> bool:
        return self.block_config.plans_globally()

    def plan_block(self, step: BlockStep) -> None:
        mods = step.targets(self.stage)
        ctx = self._context(step, step.statistics(self.stage, mods))
        self.scores.append(self.stage.hooks.score_block(ctx, self.config))

    def begin(self, run: BlockPass) -> None:
        if self.record.structure_before is None:
            params = sum(p.numel() for b in run.blocks for p in b.parameters())
            self.record.structure_before = (params, block_widths(run.model))
        self.decision = self.block_config.decide(tuple(self.scores)) if self.needs_planning() else None
        for change in self.block_config.model_changes(tuple(self.scores), self.decision):
            self._prune_hidden(run, change)

    def _prune_hidden(self, run: BlockPass, change: PruneHidden) -> None:
        """Hidden channels removed everywhere; calibration activations and gradients follow."""
        before = hidden_size(run.model)
        keep = change.kept()
        results = prune_hidden(run.model, change)
        hidden = self.record.structure.setdefault("hidden", [before, before])
        hidden[1] = hidden_size(run.model)
        if run.acts is not None:
            run.acts.hidden = [h.index_select(-1, keep.to(h.device)) for h in run.acts.hidden]
        state = self.record.state
        for name, res in results.items():
            state.layers[name] = merge_results(state.layers.get(name), res)
            g = self.record.grads.get(name)
            if g is not None:
                dim = 1 if res.removed_cols is not None else 0
                self.record.grads[name] = g.index_select(dim, keep.to(g.device))
            rep = self.record.module_report(name, run.model.get_submodule(name))
            rep.info[f"{self.config.method}_removed_hidden"] = before - int(keep.numel())
        _recheck_shapes(run)

    def process_block(self, step: BlockStep) -> None:
        mods = step.targets(self.stage)
        if not mods:
            return
        t0 = time.perf_counter()
        ctx = self._context(step, step.statistics(self.stage, mods), tuple(self.scores), self.decision)
        for change in self.stage.hooks.change_block(ctx, self.config):
            self._record(step, apply_block_change(step.run.model, ctx, change))
        log.debug("%s: block change in %.3fs", step.name, time.perf_counter() - t0)

    def _record(self, step: BlockStep, results: dict[str, LayerResult]) -> None:
        method = self.config.method
        for lname, res in results.items():
            self.record.state.layers[lname] = res
            rep = self.record.module_report(lname, step.run.model.get_submodule(lname))
            rep.methods.append(method)
            rep.info[f"{method}_removed_rows"] = 0 if res.removed_rows is None else res.removed_rows.numel()
            rep.info[f"{method}_removed_cols"] = 0 if res.removed_cols is None else res.removed_cols.numel()

    def _context(
        self,
        step: BlockStep,
        stats: dict[str, LayerStats],
        scores: tuple[BlockScore | None, ...] = (),
        decision: BlockDecision | None = None,
    ) -> BlockContext:
        model_config = getattr(step.run.model, "config", None)
        acts = step.run.acts
        inputs = None if acts is None else BlockInputs(acts, step.module)
        return BlockContext(step.index, step.name, step.module, model_config, stats, scores, decision, inputs)

    def finish(self, run: BlockPass) -> None:
        before = self.record.structure_before
        assert before is not None
        summary = structure_summary(before[0], before[1], run.model, run.blocks)
        if "hidden" in self.record.structure:
            summary["hidden"] = self.record.structure["hidden"]
        self.record.structure = summary


def _recheck_shapes(run: BlockPass) -> None:
    """Every stage of the pass must still accept its (resized) target layers."""
    modules = dict(run.model.named_modules())
    for s in run.stages:
        for i, rels in s.stage.targets.items():
            for rel in rels:
                name = f"{run.prefix}.{i}.{rel}"
                s.config.check_module(name, *in_out_features(modules[name]))


@dataclasses.dataclass(frozen=True)
class BlockMethodConfig(MethodConfig):
    """Base of the configs of block-level methods (run by :class:`BlockChange`)."""

    kind: ClassVar[type[BlockwiseStage]] = BlockChange

    def plans_globally(self) -> bool:
        """True to score every block first (``llmpress_score_block``) and decide across
        blocks before changing any."""
        return False

    def decide(self, block_scores: tuple[BlockScore | None, ...]) -> BlockDecision | None:
        """The decision across blocks, made once from the planning pass's scores and handed
        to every ``llmpress_change_block`` call as ``block.decision`` (default: none)."""
        return None

    def model_changes(
        self, block_scores: tuple[BlockScore | None, ...], decision: BlockDecision | None
    ) -> tuple[PruneHidden, ...]:
        """Whole-model changes decided from the planning pass, applied before the block pass
        (default: none)."""
        return ()
