"""The allocation stage kind: level database, fitness, search, commit, report.

A stage with an ``allocation:`` section runs as :class:`AllocationSearch`, a model-level stage.
For a pruning or quantization stage: build (or reuse) the level database, cache the dense
model's log-probabilities, ask the search plugin for levels under the exact budget, then commit
each layer's result at its level. For ``drop_blocks``: measure block influence, search, then
remove the blocks (renumbered, a plain architecture) or sub-blocks. For structured pruning:
build every block's width variants, search, keep the chosen ones. The choice is written back as
an explicit recipe (``allocation: {method: explicit, levels: {...}}``) that reproduces it with
no search.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmpress.allocation.fitness import Fitness, ModuleStitcher, Stitcher, WeightStitcher, swap_stitcher
from llmpress.allocation.level_build import build_database, unit_blocks
from llmpress.allocation.level_sets import LevelSet, bit_levels, drop_levels, sparsity_levels
from llmpress.allocation.levels import LevelDatabase, fingerprint
from llmpress.allocation.problem import AllocationProblem, AllocationResult
from llmpress.allocation.width_levels import build_width_levels, width_level_set, width_values
from llmpress.engine.stage import ModelContext, ModelStage
from llmpress.errors import AllocationError, RecipeError
from llmpress.model.dropped import DroppedModule
from llmpress.model.modules import find_blocks, get_weight, is_linear
from llmpress.model.structures import block_widths
from llmpress.recipe.allocation import AllocationConfig, DropBlocksConfig
from llmpress.recipe.config import LevelKind
from llmpress.structure.dropping import SkipBlock, drop_sub_blocks, drop_units, influence_hooks, remove_blocks
from llmpress.structure.summary import structure_summary

log = logging.getLogger(__name__)


class AllocationSearch(ModelStage):
    """A stage's levels chosen by a search under its global budget, then committed."""

    def run(self, ctx: ModelContext) -> None:
        st, alloc = self.stage, self.stage.allocation
        space = st.config.allocatable()
        assert alloc is not None and space is not None and ctx.ids is not None
        target = st.config.sparsity_target()
        if space.kind is LevelKind.SPARSITY and target is not None and target.nm is not None:
            raise RecipeError(f"{st.name}: allocation over sparsity needs pattern: unstructured")
        self.ctx, self.alloc = ctx, alloc
        self.fit_ids = ctx.ids[: alloc.fitness_samples or ctx.ids.shape[0]]
        t0 = time.perf_counter()
        if space.kind is LevelKind.BLOCKS:
            summary = self._drop()
        elif space.kind is LevelKind.WIDTHS:
            summary = self._widths(space.target)
        else:
            summary = self._levels(space.kind, space.target)
        self.record.written_back[st.index] = dict(
            st.entry, allocation={"method": "explicit", "levels": summary["levels"]}
        )
        summary["searched_with"] = alloc.to_dict()
        summary["original_recipe"] = ctx.recipe
        structure = summary.pop("structure", None)
        if structure:
            self.record.structure = structure
        self.record.allocation = summary
        log.info(
            "allocation %s: fitness %s after %d evaluations; %.1fs in all",
            alloc.method,
            summary.get("fitness"),
            summary["evaluations"],
            time.perf_counter() - t0,
        )

    # -- the three kinds of level ---------------------------------------------------------

    def _levels(self, kind: LevelKind, own_target: float) -> dict[str, Any]:
        """Sparsity or bits per layer, from a level database."""
        ctx, alloc, cfg = self.ctx, self.alloc, self.stage.config
        model = ctx.model
        prefix, _ = find_blocks(model)
        units = [
            n
            for i, rels in self.stage.targets.items()
            for n in (f"{prefix}.{i}.{r}" for r in rels)
            if is_linear(model.get_submodule(n))
        ]
        mods = [model.get_submodule(u) for u in units]
        shapes = [tuple(get_weight(m).shape) for m in mods]
        numels = [o * i for o, i in shapes]
        target = float(alloc.average if alloc.average is not None else own_target)
        if kind is LevelKind.SPARSITY:
            levels = sparsity_levels(
                numels, target, alloc.sparsity_step, alloc.sparsity_span, alloc.max_sparsity
            )
        else:
            levels = bit_levels(numels, target, alloc.bits)
        levels = _fixed(alloc, units, levels)
        # the budget is not part of the database: one built for 3 bits serves a 2.5-bit search
        stage_d = {k: v for k, v in self.stage.entry.items() if k not in ("allocation", "sparsity", "bits")}
        assert ctx.ids is not None
        fp = fingerprint(model, units, stage_d, levels, ctx.ids)
        db = LevelDatabase(units, shapes, fp, alloc.database)  # type: ignore[arg-type]
        t0 = time.perf_counter()
        build_database(
            model,
            self.stage,
            kind.value,
            db,
            levels,
            ctx.ids,
            ctx.device,
            ctx.batch_size,
            ctx.progress,
            ctx.moe_min_tokens,
        )
        build_s = time.perf_counter() - t0
        fit = Fitness(model, self.fit_ids.to(ctx.device), alloc.metric, ctx.device, ctx.batch_size)
        stitcher = WeightStitcher(model, units, db)

        def scores(i: int) -> torch.Tensor:
            norms = db.sq_norms(i)
            if norms is None:
                raise AllocationError(f"the level database holds no input norms for {units[i]}")
            w = stitcher.dense[i].float()  # [out, in]
            return w.abs() * norms.sqrt().unsqueeze(0)

        problem = self._problem(
            kind.value,
            units,
            levels,
            target,
            stitcher,
            fit,
            fp,
            groups=unit_blocks(units, prefix),
            scores=scores,
        )
        result, search_s = self._search(problem, stitcher, fit)
        for i, (name, mod) in enumerate(zip(units, mods)):
            res = db.get(i, result.levels[i], get_weight(mod).dtype)
            self.record.commit(name, mod, res, cfg.method)
            self.record.modules[name].info[f"{alloc.method}_level"] = levels.values[i][result.levels[i]]
        return _summary(problem, alloc, result, search_s, build_s)

    def _drop(self) -> dict[str, Any]:
        """Blocks or sub-blocks dropped."""
        ctx, alloc, cfg = self.ctx, self.alloc, self.stage.config
        assert isinstance(cfg, DropBlocksConfig)
        model, gran = ctx.model, cfg.granularity
        units = drop_units(model, gran)
        levels = drop_levels(len(units), cfg.blocks, "blocks" if gran == "block" else "sub-blocks")
        levels = _fixed(alloc, units, levels)
        ids = self.fit_ids.to(ctx.device)
        with influence_hooks(model, gran) as (sums, tokens, as_tuple), torch.no_grad():
            for x in ids.split(ctx.batch_size):
                model(input_ids=x, use_cache=False)
        influence = [s / max(tokens[0], 1) for s in sums]
        fit = Fitness(model, ids, alloc.metric, ctx.device, ctx.batch_size)

        def make_skip(i: int) -> nn.Module:
            if gran == "block":
                return SkipBlock(as_tuple[0])
            return DroppedModule("attention" if i % 2 == 0 else "mlp")

        stitcher = swap_stitcher(model, units, make_skip)
        fp = {"units": units, "blocks": levels.budget, "ids": _ids_sha(ids)}
        groups = [i // (1 if gran == "block" else 2) for i in range(len(units))]
        problem = self._problem(
            "blocks", units, levels, float(levels.budget), stitcher, fit, fp, groups=groups,
            signals={"block_influence": influence},
        )  # fmt: skip
        result, search_s = self._search(problem, stitcher, fit)
        summary = _summary(problem, alloc, result, search_s, 0.0)
        dropped = [u for u, lv in zip(units, result.levels) if problem.levels[units.index(u)][lv] == 1.0]
        summary["dropped"] = dropped
        summary["block_influence"] = {u: round(b, 6) for u, b in zip(units, influence)}
        if gran == "block":
            remove_blocks(model, [units.index(u) for u in dropped])
        else:
            drop_sub_blocks(model, dropped)
        return summary

    def _widths(self, ratio: float) -> dict[str, Any]:
        """Structured pruning with per-block widths from the search (EvoPress over width levels)."""
        ctx, alloc = self.ctx, self.alloc
        model = ctx.model
        assert ctx.ids is not None
        values, k0 = width_values(ratio, alloc.sparsity_step, alloc.sparsity_span, alloc.max_sparsity)
        _, blocks = find_blocks(model)
        params_before = sum(p.numel() for b in blocks for p in b.parameters())
        widths_before = block_widths(model)
        t0 = time.perf_counter()
        built = build_width_levels(
            model,
            self.stage,
            ctx.ids,
            values,
            k0,
            ctx.device,
            ctx.batch_size,
            ctx.progress,
            ctx.moe_min_tokens,
        )
        build_s = time.perf_counter() - t0
        units, levels, variants, results = built.units, width_level_set(built), built.variants, built.results
        chosen = alloc.fixed_levels()
        if chosen is not None:
            fixed = _fixed(alloc, units, levels)
            pick = [lv.index(c[0]) for lv, c in zip(levels.values, fixed.values)]
            variants = [[v[k]] for v, k in zip(variants, pick)]
            results = [[r[k]] for r, k in zip(results, pick)]
            levels = fixed
        fit = Fitness(model, self.fit_ids.to(ctx.device), alloc.metric, ctx.device, ctx.batch_size)
        stitcher = ModuleStitcher(model, units, variants)
        if chosen is not None:
            stitcher.current = [-1] * len(units)  # level 0 is the chosen variant, not the block
        stage_d = {k: v for k, v in self.stage.entry.items() if k != "allocation"}
        fp = {"units": units, "stage": stage_d, "values": levels.values, "ids": _ids_sha(ctx.ids)}
        problem = self._problem(
            "widths", units, levels, ratio, stitcher, fit, fp, groups=list(range(len(units)))
        )
        result, search_s = self._search(problem, stitcher, fit)
        stitcher.apply(result.levels)
        for i, lv in enumerate(result.levels):
            for name, res in results[i][lv].items():
                self.record.state.layers[name] = res
                rep = self.record.module_report(name, model.get_submodule(name))
                rep.methods = [self.stage.config.method]
                rep.info[f"{alloc.method}_level"] = levels.values[i][lv]
        summary = _summary(problem, alloc, result, search_s, build_s)
        summary["structure"] = structure_summary(params_before, widths_before, model, blocks)
        return summary

    # -- shared ------------------------------------------------------------------------

    def _problem(
        self,
        kind: str,
        units: list[str],
        levels: LevelSet,
        target: float,
        stitcher: Stitcher,
        fit: Fitness,
        fp: dict[str, Any],
        **extra: Any,
    ) -> AllocationProblem:
        """The problem a search solves: a candidate is stitched into the model, then scored;
        ``fp`` (what the levels were built from) identifies it for checkpoints."""

        def fitness(lv: Any, tokens: int) -> float:
            stitcher.apply(lv)
            return fit(tokens)

        problem_fp = _problem_fp(fp, self.alloc, levels)
        return AllocationProblem(
            kind=kind,
            units=units,
            levels=levels.values,
            costs=levels.costs,
            start=levels.start,
            budget=levels.budget,
            target=target,
            fitness=fitness,
            max_tokens=fit.ids.numel(),
            seqlen=int(self.fit_ids.shape[1]),
            checkpoint=_checkpoint(self.alloc, problem_fp),
            fingerprint=problem_fp,
            progress=self.ctx.progress,
            **extra,
        )

    def _search(
        self, problem: AllocationProblem, stitcher: Stitcher, fit: Fitness
    ) -> tuple[AllocationResult, float]:
        """Run the search (the model is restored afterwards, whatever happens); checks the budget."""
        t = time.perf_counter()
        assert self.stage.search is not None
        try:
            result = self.stage.search.search(problem, self.alloc)
        finally:
            stitcher.restore()
        problem.check(result.levels, f"allocation {self.alloc.method!r}")
        result.evaluations = result.evaluations or fit.evaluations
        return result, time.perf_counter() - t


def _fixed(alloc: AllocationConfig, units: list[str], levels: LevelSet) -> LevelSet:
    """The level set, restricted to each unit's one given level when the allocation is
    given rather than searched (``explicit``)."""
    chosen = alloc.fixed_levels()
    if chosen is None:
        return levels
    missing = [u for u in units if u not in chosen]
    extra = sorted(set(chosen) - set(units))
    if missing or extra:
        raise AllocationError(
            f"{alloc.method} allocation: levels {'missing for ' + str(missing[:3]) if missing else ''}"
            f"{' and ' if missing and extra else ''}{'given for unknown units ' + str(extra[:3]) if extra else ''}"
        )
    return levels.restrict([float(chosen[u]) for u in units])


def _problem_fp(fp: dict[str, Any], alloc: AllocationConfig, levels: LevelSet) -> str:
    """Identifies a search problem: database, search options (but not how many generations),
    budget and start."""
    d = {k: v for k, v in alloc.to_dict().items() if k not in ("generations", "checkpoint", "database")}
    blob = [fp, d, levels.budget, levels.start]
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()


def _checkpoint(alloc: AllocationConfig, problem_fp: str) -> str | None:
    """The search's checkpoint file: the config's own, else one per problem in the database
    folder (searches of other budgets on the same database do not collide)."""
    own = alloc.checkpoint_path()
    if own:
        return own
    if alloc.database is None:
        return None
    return str(Path(alloc.database) / f"search_{alloc.method}_{problem_fp[:12]}.json")


def _summary(
    problem: AllocationProblem,
    alloc: AllocationConfig,
    result: AllocationResult,
    search_s: float,
    build_s: float,
) -> dict[str, Any]:
    values = problem.values(result.levels)
    return {
        "method": alloc.method,
        "kind": problem.kind,
        "target": problem.target,
        "budget": problem.budget,
        "cost": problem.cost(result.levels),
        "levels": {
            u: (round(v, 8) if problem.kind in ("sparsity", "widths") else int(v))
            for u, v in zip(problem.units, values)
        },
        "fitness": result.fitness,
        "metric": alloc.metric,
        "history": [float(h) for h in result.history],
        "evaluations": result.evaluations,
        "database_build_s": round(build_s, 3),
        "search_s": round(search_s, 3),
        **({"info": result.info} if result.info else {}),
    }


def _ids_sha(ids: torch.Tensor) -> str:
    return hashlib.sha256(ids.cpu().numpy().tobytes()).hexdigest()
