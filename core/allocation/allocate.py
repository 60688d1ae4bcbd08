"""Glue of an allocation stage: level database, fitness, search, commit, report.

``compress`` hands a recipe whose stage has an ``allocation:`` section here. For a pruning or
quantization stage: build (or reuse) the level database, cache the dense model's
log-probabilities, ask the search plugin for levels under the exact budget, then commit each
layer's result at its level. For ``drop_blocks``: measure block influence, search, then remove
the blocks (renumbered, a plain architecture) or sub-blocks. The choice is written back as an
explicit recipe (``allocation: {method: explicit, levels: {...}}``) that reproduces it with
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

from llmpress.allocation.fitness import Fitness, ModuleStitcher, WeightStitcher, swap_stitcher
from llmpress.allocation.level_build import build_database, unit_blocks
from llmpress.allocation.level_sets import LevelSet, bit_levels, drop_levels, sparsity_levels
from llmpress.allocation.levels import LevelDatabase, fingerprint
from llmpress.allocation.problem import AllocationConfig, AllocationProblem, AllocationResult, allocation_kind
from llmpress.engine import distributed
from llmpress.engine.calibration import CalibrationSource, build_calibration
from llmpress.engine.moe_stats import DEFAULT_MIN_TOKENS
from llmpress.errors import AllocationError, CalibrationError, RecipeError
from llmpress.model.dropped import DroppedModule
from llmpress.model.modules import find_blocks, get_weight, in_out_features, is_linear, select_targets
from llmpress.model.report import CompressionReport, ModuleReport
from llmpress.model.results import commit
from llmpress.plugin_manager import Llmpress
from llmpress.recipe.recipes import Recipe, ResolvedStage
from llmpress.structure.dropping import SkipBlock, drop_sub_blocks, drop_units, influence_hooks, remove_blocks
from llmpress.versions import versions

log = logging.getLogger(__name__)


def _calibration(
    stage: ResolvedStage,
    calibration: CalibrationSource | None,
    tokenizer: Any,
    nsamples: int,
    seqlen: int,
    seed: int,
) -> tuple[torch.Tensor, dict[str, Any]]:
    if calibration is None:
        raise CalibrationError(
            f"{stage.name}: an allocation search needs calibration data (its fitness compares the "
            f"candidate with the dense model): pass a text file, a list of strings or token ids"
        )
    if not isinstance(calibration, torch.Tensor) and tokenizer is None:
        raise CalibrationError(
            "calibration text needs a tokenizer: pass tokenizer=... (command line: --tokenizer PATH_OR_ID, "
            "for a model saved without one)"
        )
    ids = build_calibration(tokenizer, calibration, nsamples=nsamples, seqlen=seqlen, seed=seed)
    info: dict[str, Any] = {"nsamples": int(ids.shape[0]), "seqlen": int(ids.shape[1]), "seed": seed}
    if isinstance(calibration, str) or hasattr(calibration, "__fspath__"):
        info["source"] = str(calibration)
    return ids, info


def _explicit_levels(alloc: AllocationConfig, units: list[str], levels: LevelSet) -> LevelSet:
    """An ``explicit`` allocation's level set: each unit's one chosen level."""
    chosen = dict(getattr(alloc, "levels", {}) or {})
    missing = [u for u in units if u not in chosen]
    extra = sorted(set(chosen) - set(units))
    if missing or extra:
        raise AllocationError(
            f"explicit allocation: levels {'missing for ' + str(missing[:3]) if missing else ''}"
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
    """The search's checkpoint file: the config's ``checkpoint``, else one per problem in the
    database folder (searches of other budgets on the same database do not collide)."""
    ck = getattr(alloc, "checkpoint", None)
    if ck:
        return str(ck)
    if alloc.database is None:
        return None
    return str(Path(alloc.database) / f"search_{alloc.method}_{problem_fp[:12]}.json")


def compress_allocated(
    model: nn.Module,
    rec: Recipe,
    stages: list[ResolvedStage],
    pm: Llmpress,
    calibration: CalibrationSource | None,
    *,
    tokenizer: Any,
    nsamples: int,
    seqlen: int,
    seed: int,
    device: torch.device,
    batch_size: int | None,
    progress: bool,
) -> tuple[nn.Module, CompressionReport]:
    """Run a one-stage recipe whose stage has an ``allocation:`` section (see module doc)."""
    t_start = time.perf_counter()
    if len(stages) != 1:
        raise RecipeError(
            "a stage with an 'allocation:' section must be the recipe's only stage (for now); "
            "run the other stages as a separate compress call"
        )
    st = stages[0]
    alloc = st.allocation
    assert isinstance(alloc, AllocationConfig)
    kind = allocation_kind(st.config)
    assert kind is not None
    if kind == "sparsity" and getattr(st.config, "pattern", "unstructured") != "unstructured":
        raise RecipeError(f"{st.name}: allocation over sparsity needs pattern: unstructured")
    ids, calib_info = _calibration(st, calibration, tokenizer, nsamples, seqlen, seed)
    fit_ids = ids[: alloc.fitness_samples or ids.shape[0]]
    bs = batch_size or max(1, min(ids.shape[0], 8192 // ids.shape[1]))
    was_training = model.training
    model.eval()
    try:
        if kind == "blocks":
            summary, modules = _run_drop(model, st, alloc, pm, fit_ids, device, bs, progress)
        elif kind == "widths":
            summary, modules = _run_widths(model, st, alloc, pm, ids, fit_ids, device, bs, progress)
        else:
            summary, modules = _run_levels(
                model, st, alloc, kind, pm, ids, fit_ids, device, bs, progress, rec.moe_min_tokens
            )
    finally:
        model.train(was_training)
    explicit = dict(st.stage.to_dict(), allocation={"method": "explicit", "levels": summary["levels"]})
    summary["searched_with"] = alloc.to_dict()
    summary["original_recipe"] = rec.to_dict()
    report = CompressionReport(
        recipe={"stages": [explicit]},
        base_model=getattr(model, "name_or_path", None) or None,
        modules=modules,
        calibration=calib_info,
        device=str(device),
        world_size=distributed.world_size(),
        devices=distributed.gather_objects(str(device)),
        wall_time_s=time.perf_counter() - t_start,
        versions=versions(),
        allocation=summary,
        structure=summary.pop("structure", None) or {},
    )
    log.info(
        "allocation %s: fitness %s after %d evaluations; %.1fs in all",
        alloc.method,
        summary.get("fitness"),
        summary["evaluations"],
        report.wall_time_s,
    )
    return model, report


def _search(
    pm: Llmpress, problem: AllocationProblem, alloc: AllocationConfig, stitcher: Any, fit: Any
) -> tuple[AllocationResult, float]:
    """Run the search (the model is restored afterwards, whatever happens); checks the budget."""
    t = time.perf_counter()
    try:
        result = pm.hooks_for(alloc).search(problem, alloc)
    finally:
        stitcher.restore()
    problem.check(result.levels, f"allocation {alloc.method!r}")
    result.evaluations = result.evaluations or fit.evaluations
    return result, time.perf_counter() - t


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


def _run_levels(
    model: nn.Module,
    st: ResolvedStage,
    alloc: AllocationConfig,
    kind: str,
    pm: Llmpress,
    ids: torch.Tensor,
    fit_ids: torch.Tensor,
    device: torch.device,
    bs: int,
    progress: bool,
    moe_min_tokens: int | None = None,
) -> tuple[dict[str, Any], dict[str, ModuleReport]]:
    cfg = st.config
    prefix, _ = find_blocks(model)
    units = [
        n
        for n in select_targets(model, st.stage.targets, st.stage.ignore, st.name)
        if is_linear(model.get_submodule(n))
    ]
    mods = [model.get_submodule(u) for u in units]
    for u, m in zip(units, mods):
        cfg.check_module(u, *in_out_features(m))
    shapes = [tuple(get_weight(m).shape) for m in mods]
    numels = [o * i for o, i in shapes]
    if kind == "sparsity":
        target = float(alloc.average if alloc.average is not None else cfg.sparsity_target().sparsity)  # type: ignore[union-attr]
        levels = sparsity_levels(numels, target, alloc.sparsity_step, alloc.sparsity_span, alloc.max_sparsity)
    else:
        target = float(alloc.average if alloc.average is not None else cfg.bits)  # type: ignore[attr-defined]
        levels = bit_levels(numels, target, alloc.bits)
    if alloc.method == "explicit":
        levels = _explicit_levels(alloc, units, levels)
    # the budget is not part of the database: one built for 3 bits serves a 2.5-bit search
    stage_d = {k: v for k, v in st.stage.to_dict().items() if k not in ("allocation", "sparsity", "bits")}
    fp = fingerprint(model, units, stage_d, levels, ids)
    db = LevelDatabase(units, shapes, fp, alloc.database)  # type: ignore[arg-type]
    hooks = pm.hooks_for(cfg)
    t0 = time.perf_counter()
    min_tokens = DEFAULT_MIN_TOKENS if moe_min_tokens is None else moe_min_tokens  # MoE statistics fallback
    build_database(model, cfg, hooks, kind, db, levels, ids, device, bs, progress, min_tokens)
    build_s = time.perf_counter() - t0
    fit = Fitness(model, fit_ids.to(device), alloc.metric, device, bs)
    stitcher = WeightStitcher(model, units, db)

    def scores(i: int) -> torch.Tensor:
        norms = db.sq_norms(i)
        if norms is None:
            raise AllocationError(f"the level database holds no input norms for {units[i]}")
        w = stitcher.dense[i].float()  # [out, in]
        return w.abs() * norms.sqrt().unsqueeze(0)

    problem = _make_problem(
        kind,
        units,
        levels,
        target,
        stitcher,
        fit,
        fp,
        alloc,
        int(ids.shape[1]),
        progress,
        groups=unit_blocks(units, prefix),
        scores=scores,
    )
    result, search_s = _search(pm, problem, alloc, stitcher, fit)
    reports: dict[str, ModuleReport] = {}
    for i, (name, mod) in enumerate(zip(units, mods)):
        res = db.get(i, result.levels[i], get_weight(mod).dtype)
        merged = commit(model, name, mod, res)
        rep = reports[name] = ModuleReport(name=name, methods=[cfg.method], shape=shapes[i])  # type: ignore[arg-type]
        rep.info[f"{alloc.method}_level"] = levels.values[i][result.levels[i]]
        if res.loss is not None:
            rep.losses[cfg.method] = float(res.loss)
        if merged.mask is not None:
            rep.sparsity = 1.0 - float(merged.mask.float().mean())
        rep.bits = None if merged.quant is None else merged.quant.bits
    return _summary(problem, alloc, result, search_s, build_s), reports


def _run_drop(
    model: nn.Module,
    st: ResolvedStage,
    alloc: AllocationConfig,
    pm: Llmpress,
    fit_ids: torch.Tensor,
    device: torch.device,
    bs: int,
    progress: bool,
) -> tuple[dict[str, Any], dict[str, ModuleReport]]:
    cfg = st.config
    gran = str(getattr(cfg, "granularity", "block"))
    units = drop_units(model, gran)
    levels = drop_levels(
        len(units), int(getattr(cfg, "blocks", 1)), "blocks" if gran == "block" else "sub-blocks"
    )
    if alloc.method == "explicit":
        levels = _explicit_levels(alloc, units, levels)
    ids = fit_ids.to(device)
    with influence_hooks(model, gran) as (sums, tokens, as_tuple), torch.no_grad():
        for x in ids.split(bs):
            model(input_ids=x, use_cache=False)
    influence = [s / max(tokens[0], 1) for s in sums]
    fit = Fitness(model, ids, alloc.metric, device, bs)

    def make_skip(i: int) -> nn.Module:
        if gran == "block":
            return SkipBlock(as_tuple[0])
        return DroppedModule("attention" if i % 2 == 0 else "mlp")

    stitcher = swap_stitcher(model, units, make_skip)

    fp = {
        "units": units,
        "blocks": levels.budget,
        "ids": _ids_sha(ids),
    }
    problem = _make_problem(
        "blocks",
        units,
        levels,
        float(levels.budget),
        stitcher,
        fit,
        fp,
        alloc,
        int(ids.shape[1]),
        progress,
        groups=[i // (1 if gran == "block" else 2) for i in range(len(units))],
        signals={"block_influence": influence},
    )
    result, search_s = _search(pm, problem, alloc, stitcher, fit)
    summary = _summary(problem, alloc, result, search_s, 0.0)
    dropped = [u for u, lv in zip(units, result.levels) if problem.levels[units.index(u)][lv] == 1.0]
    summary["dropped"] = dropped
    summary["block_influence"] = {u: round(b, 6) for u, b in zip(units, influence)}
    if gran == "block":
        remove_blocks(model, [units.index(u) for u in dropped])
    else:
        drop_sub_blocks(model, dropped)
    return summary, {}


def _run_widths(
    model: nn.Module,
    st: ResolvedStage,
    alloc: AllocationConfig,
    pm: Llmpress,
    ids: torch.Tensor,
    fit_ids: torch.Tensor,
    device: torch.device,
    bs: int,
    progress: bool,
) -> tuple[dict[str, Any], dict[str, ModuleReport]]:
    """Structured pruning with per-block widths from the search (EvoPress over width levels)."""
    from llmpress.allocation.width_levels import build_width_levels, width_values
    from llmpress.model.results import compression_state
    from llmpress.model.structures import block_widths
    from llmpress.pipeline.compress import structure_summary

    cfg = st.config
    ratio = float(getattr(cfg, "ratio", 0.0))
    values, k0 = width_values(ratio, alloc.sparsity_step, alloc.sparsity_span, alloc.max_sparsity)
    _, blocks = find_blocks(model)
    params_before = sum(p.numel() for b in blocks for p in b.parameters())
    widths_before = block_widths(model)
    t0 = time.perf_counter()
    units, levels, variants = build_width_levels(model, st, pm, ids, values, k0, device, bs, progress)
    build_s = time.perf_counter() - t0
    if alloc.method == "explicit":
        chosen = _explicit_levels(alloc, units, levels)
        variants = [[v[lv.index(c[0])]] for v, lv, c in zip(variants, levels.values, chosen.values)]
        levels = chosen
    fit = Fitness(model, fit_ids.to(device), alloc.metric, device, bs)
    stitcher = ModuleStitcher(model, units, variants)
    if alloc.method == "explicit":
        stitcher.current = [-1] * len(units)  # level 0 is the chosen variant, not the block

    stage_d = {k: v for k, v in st.stage.to_dict().items() if k != "allocation"}
    fp = {"units": units, "stage": stage_d, "values": levels.values, "ids": _ids_sha(ids)}
    problem = _make_problem(
        "widths",
        units,
        levels,
        ratio,
        stitcher,
        fit,
        fp,
        alloc,
        int(ids.shape[1]),
        progress,
        groups=list(range(len(units))),
    )
    result, search_s = _search(pm, problem, alloc, stitcher, fit)
    stitcher.apply(result.levels)
    state = compression_state(model, create=True)
    reports: dict[str, ModuleReport] = {}
    for i, lv in enumerate(result.levels):
        for name, res in compression_state(variants[i][lv]).layers.items():
            state.layers[name] = res
            rep = reports[name] = ModuleReport(
                name=name,
                methods=[cfg.method],
                shape=tuple(get_weight(model.get_submodule(name)).shape),  # type: ignore[arg-type]
            )
            rep.info[f"{alloc.method}_level"] = levels.values[i][lv]
    summary = _summary(problem, alloc, result, search_s, build_s)
    summary["structure"] = structure_summary(params_before, widths_before, model, blocks)
    return summary, reports


def _ids_sha(ids: torch.Tensor) -> str:
    return hashlib.sha256(ids.cpu().numpy().tobytes()).hexdigest()


def _make_problem(
    kind: str,
    units: list[str],
    levels: LevelSet,
    target: float,
    stitcher: Any,
    fit: Fitness,
    fp: dict[str, Any],
    alloc: AllocationConfig,
    seqlen: int,
    progress: bool,
    **extra: Any,
) -> AllocationProblem:
    """The problem a search solves: a candidate is stitched into the model, then scored;
    ``fp`` (what the levels were built from) identifies it for checkpoints."""

    def fitness(lv: Any, tokens: int) -> float:
        stitcher.apply(lv)
        return fit(tokens)

    problem_fp = _problem_fp(fp, alloc, levels)
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
        seqlen=seqlen,
        checkpoint=_checkpoint(alloc, problem_fp),
        fingerprint=problem_fp,
        progress=progress,
        **extra,
    )
