"""The per-layer stage kind: score -> mask -> update on every target layer of a block.

The default kind of a method config. Within a block, a ``sequential()`` method (GPTQ's
true-sequential) compresses the layers input group by input group, each group seeing the
already-compressed groups' outputs. Over several processes each layer is solved on one owner
rank (spread by cost) and its result broadcast, so every rank commits the same block.
"""

from __future__ import annotations

import time

from torch import nn

from llmpress.engine import distributed
from llmpress.engine.solve import solve_layer
from llmpress.engine.stage import BlockStep, BlockwiseStage
from llmpress.engine.stats import LayerStats, input_groups
from llmpress.model.modules import get_weight, in_out_features
from llmpress.model.results import LayerResult


class LayerUpdate(BlockwiseStage):
    """Per-layer compression (pruning, quantization) inside the block pass."""

    def process_block(self, step: BlockStep) -> None:
        pending = step.targets(self.stage)
        cfg = self.config
        while pending:
            stats, col = step.run.collect(step, pending, cfg.statistics(), cfg.calibrated())
            group = list(pending)
            if col is not None and cfg.sequential():
                group = input_groups(col)[0]  # only the first input group now; the rest see its output
            self._solve_group(step, {rel: pending.pop(rel) for rel in group}, stats)
            del stats, col

    def _solve_group(self, step: BlockStep, mods: dict[str, nn.Module], stats: dict[str, LayerStats]) -> None:
        """Solve and commit layers that need no other's result."""
        names = {rel: f"{step.name}.{rel}" for rel in mods}
        if distributed.world_size() == 1:
            for rel, mod in mods.items():
                t0 = time.perf_counter()
                res = self._solve(names[rel], mod, stats.get(rel))
                self._commit(names[rel], mod, res, time.perf_counter() - t0)
            return
        owners = distributed.assign([_solve_cost(m) for m in mods.values()])
        solved: dict[str, tuple[LayerResult, float]] = {}
        for (rel, mod), owner in zip(mods.items(), owners):
            if owner == distributed.rank():
                t0 = time.perf_counter()
                solved[rel] = (self._solve(names[rel], mod, stats.get(rel)), time.perf_counter() - t0)
        for (rel, mod), owner in zip(mods.items(), owners):
            res, dt = distributed.broadcast_result(solved.pop(rel, None), owner, get_weight(mod).device)
            self._commit(names[rel], mod, res, dt)

    def _solve(self, name: str, mod: nn.Module, stats: LayerStats | None) -> LayerResult:
        prev = self.record.state.keep_mask(name)
        return solve_layer(self.stage.hooks, name, mod, stats, self.config, prev, where=self.stage.name)

    def _commit(self, name: str, mod: nn.Module, res: LayerResult, seconds: float) -> None:
        method = self.config.method
        self.record.commit(name, mod, res, method)
        self.record.modules[name].info[f"{method}_time_s"] = round(seconds, 4)


def _solve_cost(mod: nn.Module) -> float:
    """Relative cost of solving a layer (an OBS solve: in^2 * out)."""
    inp, out = in_out_features(mod)
    return float(inp) ** 2 * out
