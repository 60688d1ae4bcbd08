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
import dataclasses
import logging
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from llmpress.allocation.level_sets import LevelSet
from llmpress.engine.capture import BlockActivations, outside_blocks_on
from llmpress.errors import AllocationError, ModelError, RecipeError
from llmpress.model.modules import is_linear
from llmpress.recipe.recipes import ResolvedStage
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


@torch.no_grad()
def build_width_levels(
    model: nn.Module,
    st: ResolvedStage,
    pm: Any,
    ids: torch.Tensor,
    values: list[float],
    start: int,
    device: torch.device,
    batch_size: int,
    progress: bool,
) -> tuple[list[str], LevelSet, list[list[nn.Module]]]:
    """Per block: its variants at ``values`` (fewer where a level would remove every head or
    neuron). Returns ``(block names, level set, variants)``."""
    from llmpress.engine.gradients import collect_gradients
    from llmpress.pipeline.compress import _Engine

    cfg = st.config
    if "hidden" in getattr(cfg, "structures", ()):
        raise RecipeError(
            f"{st.name}: the hidden width is one for the whole model; an allocation search over "
            f"per-block widths takes heads and neurons only (use allocation: global for hidden)"
        )
    engine = _Engine(model, [st], pm, device)
    sizes = {_block_params(b) for b in engine.blocks}
    if len(sizes) != 1:
        raise AllocationError(
            f"{st.name}: an allocation over widths needs blocks of equal size, got {sorted(sizes)}"
        )
    acts = BlockActivations(store=device, compute=device)
    names = engine.grad_targets()
    if names:
        engine.grads = collect_gradients(model, ids, names, batch_size, device, progress=progress)
    with outside_blocks_on(model, engine.prefix, device):
        acts.capture(model, engine.blocks[0], ids, batch_size, progress=progress)
    hooks = engine.hooks[0]
    config = getattr(model, "config", None)
    units, variants = [], []
    for i in tqdm(range(len(engine.blocks)), desc="width levels", disable=not progress):
        block = engine.blocks[i]
        name = f"{engine.prefix}.{i}"
        rels = [r for r in engine.plans[0].get(i, []) if is_linear(block.get_submodule(r))]
        stats, _ = engine._collect(block, {r: block.get_submodule(r) for r in rels}, st, acts, i)
        found: list[nn.Module] = [block]
        for v in values[1:]:
            variant = copy.deepcopy(block)
            ctx = BlockContext(i, name, variant, config, stats)
            level_cfg = dataclasses.replace(cfg, ratio=v, allocation="uniform")  # type: ignore[call-arg]
            try:
                for change in hooks.change_block(ctx, level_cfg):
                    apply_block_change(variant, ctx, change)
            except ModelError as e:  # this block cannot lose that much: its levels end here
                log.debug("%s: no level %.3f (%s)", name, v, e)
                break
            found.append(variant)
        if len(found) <= start:
            raise AllocationError(
                f"{name}: the stage's ratio {values[start]} cannot be reached in this block"
            )
        units.append(name)
        variants.append(found)
        acts.run(block, keep_outputs=True)
    costs = [list(range(len(v))) for v in variants]
    levels = LevelSet([values[: len(v)] for v in variants], costs, [start] * len(units), start * len(units))
    return units, levels, variants
