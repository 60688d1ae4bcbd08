"""Width levels of structured pruning, for an allocation search over per-block widths.

Level ``k`` of block ``i`` is that block with the fraction ``values[i][k]`` of its parameters
removed by the stage's method (uniform within the block: heads first, then neurons), built
once from the dense model's calibration inputs of the block, as EvoPress builds its level
database from the dense model. Level 0 is the block itself. Levels are equally spaced in
removed parameters, so every block being the same size, a step up in one block and a step
down in another keeps the total exactly (cost = level index). A search (EvoPress) swaps whole
block variants into the model (:class:`llmpress.allocation.fitness.ModuleStitcher`); nothing is
recompressed during the search. The variants live in memory next to the model:
``sum(1 - v)`` block copies per block over its levels.
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn

from llmpress.allocation.level_sets import LevelSet
from llmpress.engine.block_pass import BlockPass
from llmpress.engine.record import RunRecord
from llmpress.engine.stage import BlockStep, BlockwiseStage, BoundStage
from llmpress.errors import AllocationError, ModelError, RecipeError
from llmpress.model.results import LayerResult
from llmpress.structure.blocks import BlockContext, apply_block_change

log = logging.getLogger(__name__)


def width_values(ratio: float, step: float, span: float, most: float) -> tuple[list[float], int]:
    """Removed fractions ``0, s, 2s, ...`` up to ``min(ratio + span, most)`` with ``s`` the
    step nearest ``step`` that puts ``ratio`` on the grid; returns ``(values, start index)``."""
    if not 0 < ratio < 1:
        raise RecipeError(f"an allocation over widths needs a ratio in (0, 1), got {ratio}")
    k0 = max(1, round(ratio / step))
    s = ratio / k0
    top = min(ratio + span, most)
    values = [round(k * s, 10) for k in range(int(top / s + 1e-9) + 1)]
    return values, k0


def _block_params(block: nn.Module) -> int:
    return sum(p.numel() for p in block.parameters())


class WidthLevels(BlockwiseStage):
    """Each block's variants at the width levels, from the dense block's statistics; the
    block itself is left as it was (its outputs feed the next block)."""

    def __init__(self, stage: BoundStage, record: RunRecord, values: list[float], start: int) -> None:
        super().__init__(stage, record)
        self.values, self.start = values, start
        self.units: list[str] = []
        #: per block, its variants (level 0: the block itself) and each variant's layer results
        self.variants: list[list[nn.Module]] = []
        self.results: list[list[dict[str, LayerResult]]] = []

    def process_block(self, step: BlockStep) -> None:
        stats = step.statistics(self.stage, step.targets(self.stage))
        model_config = getattr(step.run.model, "config", None)
        found: list[nn.Module] = [step.module]
        results: list[dict[str, LayerResult]] = [{}]
        for v in self.values[1:]:
            variant = copy.deepcopy(step.module)
            ctx = BlockContext(step.index, step.name, variant, model_config, stats)
            done: dict[str, LayerResult] = {}
            try:
                for change in self.stage.hooks.change_block(ctx, self.config.at_level(v)):
                    done.update(apply_block_change(variant, ctx, change))
            except ModelError as e:  # this block cannot lose that much: its levels end here
                log.debug("%s: no level %.3f (%s)", step.name, v, e)
                break
            found.append(variant)
            results.append(done)
        if len(found) <= self.start:
            raise AllocationError(
                f"{step.name}: the stage's ratio {self.values[self.start]} cannot be reached in this block"
            )
        self.units.append(step.name)
        self.variants.append(found)
        self.results.append(results)


@torch.no_grad()
def build_width_levels(
    model: nn.Module,
    stage: BoundStage,
    ids: torch.Tensor,
    values: list[float],
    start: int,
    device: torch.device,
    batch_size: int,
    progress: bool,
    min_tokens: int,
) -> WidthLevels:
    """Per block: its variants at ``values`` (fewer where a level would remove every head or
    neuron), built in one block pass over the dense model."""
    if stage.config.prunes_hidden():
        raise RecipeError(
            f"{stage.name}: the hidden width is one for the whole model; an allocation search over "
            f"per-block widths takes heads and neurons only (use allocation: global for hidden)"
        )
    record = RunRecord()
    run = BlockPass(model, device, record, moe_min_tokens=min_tokens)
    sizes = {_block_params(b) for b in run.blocks}
    if len(sizes) != 1:
        raise AllocationError(
            f"{stage.name}: an allocation over widths needs blocks of equal size, got {sorted(sizes)}"
        )
    grads = []
    if "grad" in stage.config.statistics():
        grads = [f"{run.prefix}.{i}.{r}" for i, rels in stage.targets.items() for r in rels]
    run.start(ids, batch_size, grad_layers=grads, progress=progress)
    builder = WidthLevels(stage, record, values, start)
    run.run([builder], progress=progress, desc="width levels")
    return builder


def width_level_set(builder: WidthLevels) -> LevelSet:
    """The level set of the built variants (cost = level index; every block starts at ``start``)."""
    n = len(builder.units)
    costs = [list(range(len(v))) for v in builder.variants]
    values = [builder.values[: len(v)] for v in builder.variants]
    return LevelSet(values, costs, [builder.start] * n, builder.start * n)
