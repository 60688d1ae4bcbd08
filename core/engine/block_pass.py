"""The block pass (the SparseGPT/GPTQ scheme), shared by every blockwise stage.

Capture the first block's calibration inputs, then for each block: put it on the compute
device, let each stage process it (statistics -> method hooks -> results -> commit), run the
changed block so the next block sees its outputs, and put it back. Compression, the level
database and the structured width levels all run through this one pass; what differs is the
stage (:class:`llmpress.engine.stage.BlockwiseStage`). Only the current block needs to be on
the device; accelerate's offload hooks place the rest.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn
from tqdm.auto import tqdm

from llmpress.engine import distributed
from llmpress.engine.capture import BlockActivations, DenseStream, outside_blocks_on
from llmpress.engine.gradients import collect_gradients
from llmpress.engine.moe_stats import complete_expert_stats, expert_targets
from llmpress.engine.stage import BlockStep, BlockwiseStage
from llmpress.engine.stats import STATISTICS, LayerStats, StatsCollector
from llmpress.errors import ModelError
from llmpress.model.modules import find_blocks
from llmpress.model.offload import onload

if TYPE_CHECKING:
    from llmpress.engine.record import RunRecord

log = logging.getLogger(__name__)


class BlockPass:
    """One sequential pass over a model's blocks with calibration activations."""

    def __init__(
        self,
        model: nn.Module,
        device: torch.device,
        record: RunRecord,
        *,
        moe_min_tokens: int,
        offload_stats: bool = False,
    ) -> None:
        self.model = model
        self.device = device
        self.record = record
        self.prefix, self.blocks = find_blocks(model)
        self.moe_min_tokens = moe_min_tokens
        #: statistics accumulate on the CPU (each batch's part computed on the device)
        self.offload_stats = offload_stats
        self.acts: BlockActivations | None = None
        #: the dense model's block inputs, kept only when a stage asks for ``dense_cross``
        self.dense: DenseStream | None = None
        #: the stages of the current pass, in order
        self.stages: list[BlockwiseStage] = []

    def start(
        self,
        ids: torch.Tensor | None,
        batch_size: int,
        *,
        grad_layers: Sequence[str] = (),
        offload_activations: bool = False,
        progress: bool = False,
    ) -> None:
        """Weight gradients of ``grad_layers`` (if any), then the first block's inputs on ``ids``
        (this process's share of the calibration sequences; none without data)."""
        if ids is None:
            return
        if grad_layers:
            grads = collect_gradients(
                self.model, ids, list(grad_layers), batch_size, self.device, progress=progress
            )
            distributed.all_reduce_sum(grads.values())
            self.record.grads.update(grads)
        store = torch.device("cpu") if offload_activations else self.device
        self.acts = BlockActivations(store=store, compute=self.device)
        with outside_blocks_on(self.model, self.prefix, self.device):
            self.acts.capture(self.model, self.blocks[0], ids, batch_size, progress=progress)
        log.info("captured %d calibration batches", len(self.acts.hidden))

    def collect(
        self, step: BlockStep, mods: dict[str, nn.Module], statistics: frozenset[str], calibrated: bool
    ) -> tuple[dict[str, LayerStats], StatsCollector | None]:
        """The ``statistics`` of ``mods``' inputs (names relative to the block), in one pass
        over the block; summed over ranks; with weight gradients where ``grad`` is asked."""
        if self.acts is None or not calibrated:
            return {}, None
        store = torch.device("cpu") if self.offload_stats else None
        with StatsCollector(mods, statistics, store) as col:
            self.acts.run(step.module, keep_outputs=False, on_batch=self._on_batch(step, mods, col))
        info = complete_expert_stats(step.module, mods, col, self.acts, self.moe_min_tokens, step.name)
        self.record.moe_info.update({f"{step.name}.{r}": v for r, v in info.items()})
        distributed.reduce_stats(col.stats)  # every rank solves on the sums of all ranks
        stats = dict(col.stats)
        if "grad" in statistics:
            stats = {r: s.with_grad(self.record.grads[f"{step.name}.{r}"]) for r, s in stats.items()}
        return stats, col

    def _on_batch(
        self, step: BlockStep, mods: dict[str, nn.Module], col: StatsCollector
    ) -> Callable[[], None]:
        """Before each batch: a new batch for ``col``, with the dense block's inputs of ``mods``
        when a ``"dense"`` statistic is collected (one more block forward per batch)."""
        if not any(STATISTICS[n].source == "dense" for n in col.needs):
            return col.new_batch
        dense, batches = self.dense, itertools.count()
        if dense is None:
            raise RuntimeError("a 'dense' statistic needs BlockPass.run() to keep the dense stream")

        def on_batch() -> None:
            col.active = False  # the dense forward runs through the same layers
            try:
                inputs = dense.layer_inputs(step.module, next(batches), mods)
            finally:
                col.active = True
            col.new_batch(inputs)

        return on_batch

    def _check_dense(self, stages: Sequence[BlockwiseStage]) -> None:
        """Refuse, before any block changes, a ``"dense"`` statistic of routed experts: they
        see different tokens in the dense and the compressed model, so rows cannot pair up."""
        for s in stages:
            for i, names in s.stage.targets.items():
                if expert_targets(self.blocks[i], names):
                    raise ModelError(
                        f"{s.stage.name}: method {s.config.method!r} needs the dense model's inputs "
                        f"token by token (statistic 'dense_cross'), but the routed experts of "
                        f"{self.prefix}.{i} see different tokens in the dense and the compressed "
                        "model; leave the experts out of this stage's targets (ignore: ['.*experts.*'])"
                    )

    def plan(self, stages: Sequence[BlockwiseStage], progress: bool) -> None:
        """The planning pass of the stages that ask for one: every block of the unchanged
        model on its own activations (a copy: the real pass starts afresh)."""
        planning = [s for s in stages if s.needs_planning()]
        if not planning:
            return
        real = self.acts
        if real is not None:
            self.acts = BlockActivations(store=real.store, compute=real.compute)
            self.acts.hidden, self.acts.kwargs = [h.clone() for h in real.hidden], real.kwargs
        try:
            for i in tqdm(range(len(self.blocks)), desc="scoring blocks", disable=not progress):
                block = self.blocks[i]
                with onload(block, self.device, write_back=False):
                    step = BlockStep(i, f"{self.prefix}.{i}", block, self)
                    for s in planning:
                        s.plan_block(step)
                    if self.acts is not None and i + 1 < len(self.blocks):
                        self.acts.run(block, keep_outputs=True)
        finally:
            self.acts = real

    def run(
        self,
        stages: Sequence[BlockwiseStage],
        *,
        progress: bool,
        desc: str = "compressing blocks",
        last: int | None = None,
    ) -> None:
        """Planning pass, whole-model changes, then each block (up to ``last``) through every
        stage in order, its outputs becoming the next block's inputs."""
        self.stages = list(stages)
        wants_dense = [
            s for s in stages if any(STATISTICS[n].source == "dense" for n in s.config.statistics())
        ]
        self._check_dense(wants_dense)
        self.plan(stages, progress)
        for s in stages:
            s.begin(self)
        if wants_dense and self.acts is not None:
            self.dense = DenseStream(self.acts)  # the inputs before block 0 are the dense model's
            log.info("keeping the dense model's block inputs (statistic 'dense_cross')")
        end = len(self.blocks) if last is None else last + 1
        for i in tqdm(range(end), desc=desc, disable=not progress):
            block = self.blocks[i]
            with onload(block, self.device):  # back home (or to its offload storage), changed
                step = BlockStep(i, f"{self.prefix}.{i}", block, self)
                if self.dense is not None:
                    self.dense.snapshot(block)
                for s in stages:
                    s.process_block(step)
                if self.acts is not None and i + 1 < end:
                    self.acts.run(block, keep_outputs=True)
                    if self.dense is not None:
                        self.dense.advance(block)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        self.dense = None
        for s in stages:
            s.finish(self)
