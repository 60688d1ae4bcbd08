"""The sequential layer pass (the SparseGPT/GPTQ scheme), dispatching to plugins.

For each block: collect input statistics of its target layers with forward hooks, run
score -> mask -> update for every target layer of every stage, then re-run the compressed
block so the next block sees compressed inputs. Only the current block needs to be on the
compute device; activations can rest on CPU (``offload_activations``).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from llmpress.engine import distributed
from llmpress.engine.calibration import CalibrationSource, build_calibration
from llmpress.engine.capture import BlockActivations, outside_blocks_on
from llmpress.engine.gradients import collect_gradients
from llmpress.engine.moe_stats import DEFAULT_MIN_TOKENS, complete_expert_stats
from llmpress.engine.stats import LayerStats, StatsCollector, input_groups
from llmpress.errors import CalibrationError, ModelError
from llmpress.method_hooks import MethodHooks
from llmpress.model.modules import find_blocks, get_weight, in_out_features, is_linear, select_targets
from llmpress.model.moe_model import with_experts_unfused
from llmpress.model.offload import execution_device, onload
from llmpress.model.report import CompressionReport, ModuleReport
from llmpress.model.results import LayerResult, commit, compression_state
from llmpress.model.structures import block_widths
from llmpress.plugin_manager import Llmpress, get_plugin_manager
from llmpress.quant.activations import is_static, static_scale
from llmpress.recipe.recipes import Recipe, ResolvedStage, as_recipe
from llmpress.structure.blocks import BlockContext, apply_block_change
from llmpress.versions import versions

log = logging.getLogger(__name__)


def _plan(
    model: nn.Module, stages: Sequence[ResolvedStage]
) -> tuple[str, nn.ModuleList, list[dict[int, list[str]]]]:
    """Per stage: block index -> target names relative to the block. Validates shapes first."""
    prefix, blocks = find_blocks(model)
    plans: list[dict[int, list[str]]] = []
    modules = dict(model.named_modules())
    for st in stages:
        names = select_targets(model, st.stage.targets, st.stage.ignore, st.name)
        per_block: dict[int, list[str]] = defaultdict(list)
        for n in names:
            st.config.check_module(n, *in_out_features(modules[n]))
            idx, rel = n[len(prefix) + 1 :].split(".", 1)
            per_block[int(idx)].append(rel)
        plans.append(dict(per_block))
    return prefix, blocks, plans


def _default_device(model: nn.Module) -> torch.device:
    dispatched = execution_device(model)  # accelerate hooks (offloaded weights are on meta)
    if dispatched is not None:
        return dispatched
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover
        return torch.device("cpu")


class _Engine:
    """State of one compression run: the plan, each stage's typed hooks, the report."""

    def __init__(
        self, model: nn.Module, stages: list[ResolvedStage], pm: Llmpress, device: torch.device
    ) -> None:
        self.model = model
        self.stages = stages
        self.hooks = [pm.hooks_for(st.config) for st in stages]
        self.device = device
        self.prefix, self.blocks, self.plans = _plan(model, stages)
        if any("hidden" in getattr(st.config, "structures", ()) for st in stages):
            from llmpress.structure.hidden import check_hidden_prunable

            check_hidden_prunable(model)  # before any work: the architecture can shrink its width
        self.modules_report: dict[str, ModuleReport] = {}
        #: weight gradients of the layers whose stage asks for the ``grad`` statistic
        self.grads: dict[str, torch.Tensor] = {}
        #: per stage planning globally: every block's ``llmpress_score_block`` answer
        self.block_scores: dict[int, tuple[Any, ...]] = {}
        #: MoE: experts with fewer routed tokens get statistics from all tokens (llmpress.engine.moe_stats)
        self.moe_min_tokens = DEFAULT_MIN_TOKENS
        #: statistics accumulate on the CPU (each batch's part computed on the device)
        self.offload_stats = False
        self.moe_info: dict[str, dict[str, Any]] = {}  # per expert layer, for the report

    def plan(self, acts: BlockActivations | None, dev: torch.device, progress: bool) -> None:
        """The planning pass of stages that decide across blocks: score every block of the
        unchanged model on its own activations (a copy; the block pass starts afresh)."""
        planning = [si for si, st in enumerate(self.stages) if st.config.plans_globally()]
        if not planning:
            return
        pre: BlockActivations | None = None
        if acts is not None:
            pre = BlockActivations(store=acts.store, compute=acts.compute)
            pre.hidden, pre.kwargs = [h.clone() for h in acts.hidden], acts.kwargs
        answers: dict[int, list[Any]] = {si: [] for si in planning}
        for i in tqdm(range(len(self.blocks)), desc="scoring blocks", disable=not progress):
            block = self.blocks[i]
            with onload(block, dev, write_back=False):
                for si in planning:
                    st = self.stages[si]
                    rels = [r for r in self.plans[si].get(i, []) if is_linear(block.get_submodule(r))]
                    stats, _ = self._collect(block, {r: block.get_submodule(r) for r in rels}, st, pre, i)
                    ctx = BlockContext(
                        i, f"{self.prefix}.{i}", block, getattr(self.model, "config", None), stats
                    )
                    answers[si].append(self.hooks[si].score_block(ctx, st.config))
                if pre is not None and i + 1 < len(self.blocks):
                    pre.run(block, keep_outputs=True)
        self.block_scores = {si: tuple(a) for si, a in answers.items()}

    def change_model(self, acts: BlockActivations | None) -> dict[str, int] | None:
        """Apply the stages' whole-model changes (hidden channels) decided by the planning
        pass; the calibration activations and gradients follow. Returns the hidden width
        ``{"before", "after"}`` when it changed."""
        from llmpress.structure.hidden import PruneHidden, hidden_size, prune_hidden

        widths: dict[str, int] | None = None
        for si, st in enumerate(self.stages):
            for change in st.config.model_changes(self.block_scores.get(si, ())):
                if not isinstance(change, PruneHidden):
                    raise ModelError(f"{st.name}: unknown model change {type(change).__name__}")
                before = hidden_size(self.model)
                keep = change.kept()
                results = prune_hidden(self.model, change)
                widths = {"before": (widths or {}).get("before", before), "after": hidden_size(self.model)}
                if acts is not None:
                    acts.hidden = [h.index_select(-1, keep.to(h.device)) for h in acts.hidden]
                for name, res in results.items():
                    g = self.grads.get(name)
                    if g is not None:
                        dim = 1 if res.removed_cols is not None else 0
                        self.grads[name] = g.index_select(dim, keep.to(g.device))
                    rep = self._module_report(name, self.model.get_submodule(name))
                    rep.info[f"{st.config.method}_removed_hidden"] = before - int(keep.numel())
                self._recheck_shapes()
        return widths

    def _recheck_shapes(self) -> None:
        """Every stage must still accept its (resized) target layers."""
        modules = dict(self.model.named_modules())
        for si, st in enumerate(self.stages):
            for i, rels in self.plans[si].items():
                for rel in rels:
                    name = f"{self.prefix}.{i}.{rel}"
                    st.config.check_module(name, *in_out_features(modules[name]))

    def grad_targets(self) -> list[str]:
        """Qualified names of the layers whose stage needs weight gradients."""
        names: list[str] = []
        for si, st in enumerate(self.stages):
            if "grad" in st.config.statistics():
                names += [f"{self.prefix}.{i}.{r}" for i, rels in self.plans[si].items() for r in rels]
        return list(dict.fromkeys(names))

    def _collect(
        self,
        block: nn.Module,
        mods: dict[str, nn.Module],
        st: ResolvedStage,
        acts: BlockActivations | None,
        i: int,
    ) -> tuple[dict[str, LayerStats], StatsCollector | None]:
        """Every statistic the stage asks for, for ``mods``, in one pass over the block."""
        if acts is None or not st.config.calibrated():
            return {}, None
        store = torch.device("cpu") if self.offload_stats else None
        with StatsCollector(mods, st.config.statistics(), store) as col:
            acts.run(block, keep_outputs=False, on_batch=col.new_batch)
        info = complete_expert_stats(block, mods, col, acts, self.moe_min_tokens, f"{self.prefix}.{i}")
        self.moe_info.update({f"{self.prefix}.{i}.{r}": v for r, v in info.items()})
        distributed.reduce_stats(col.stats)  # every rank solves on the sums of all ranks
        stats = dict(col.stats)
        if "grad" in st.config.statistics():
            stats = {r: s.with_grad(self.grads[f"{self.prefix}.{i}.{r}"]) for r, s in stats.items()}
        return stats, col

    def compress_block(self, i: int, block: nn.Module, acts: BlockActivations | None) -> None:
        for si, st in enumerate(self.stages):
            rels = [r for r in self.plans[si].get(i, []) if is_linear(block.get_submodule(r))]
            if not rels:
                continue
            if st.config.scope == "block":
                self._change_block(
                    i, block, {r: block.get_submodule(r) for r in rels}, st, self.hooks[si], acts, si
                )
                continue
            pending = {r: block.get_submodule(r) for r in rels}
            while pending:
                stats, col = self._collect(block, pending, st, acts, i)
                group = list(pending)
                if col is not None and st.config.sequential():
                    group = input_groups(col)[0]  # only the first input group now; the rest see its output
                self._apply_group(i, {rel: pending.pop(rel) for rel in group}, stats, st, self.hooks[si])
                del stats, col

    def _apply_group(
        self,
        i: int,
        mods: dict[str, nn.Module],
        stats: dict[str, LayerStats],
        st: ResolvedStage,
        hooks: MethodHooks,
    ) -> None:
        """Solve and commit layers that need no other's result. Over several processes each
        layer is solved on one owner rank (spread by cost) and its result broadcast, so every
        rank commits the same block."""
        names = {rel: f"{self.prefix}.{i}.{rel}" for rel in mods}
        if distributed.world_size() == 1:
            for rel, mod in mods.items():
                t0 = time.perf_counter()
                res = self._solve(names[rel], mod, stats.get(rel), st, hooks)
                self._record(names[rel], mod, res, st, time.perf_counter() - t0)
            return
        owners = distributed.assign([_solve_cost(m) for m in mods.values()])
        solved: dict[str, tuple[LayerResult, float]] = {}
        for (rel, mod), owner in zip(mods.items(), owners):
            if owner == distributed.rank():
                t0 = time.perf_counter()
                res = self._solve(names[rel], mod, stats.get(rel), st, hooks)
                solved[rel] = (res, time.perf_counter() - t0)
        for (rel, mod), owner in zip(mods.items(), owners):
            res, dt = distributed.broadcast_result(solved.pop(rel, None), owner, get_weight(mod).device)
            self._record(names[rel], mod, res, st, dt)

    def _change_block(
        self,
        i: int,
        block: nn.Module,
        mods: dict[str, nn.Module],
        st: ResolvedStage,
        hooks: MethodHooks,
        acts: BlockActivations | None,
        si: int,
    ) -> None:
        t0 = time.perf_counter()
        stats, _ = self._collect(block, mods, st, acts, i)
        name = f"{self.prefix}.{i}"
        scores = self.block_scores.get(si, ())
        ctx = BlockContext(i, name, block, getattr(self.model, "config", None), stats, scores)
        for change in hooks.change_block(ctx, st.config):
            results = apply_block_change(self.model, ctx, change)
            for lname, res in results.items():
                rep = self._module_report(lname, self.model.get_submodule(lname))
                rep.methods.append(st.config.method)
                rep.info[f"{st.config.method}_removed_rows"] = (
                    0 if res.removed_rows is None else res.removed_rows.numel()
                )
                rep.info[f"{st.config.method}_removed_cols"] = (
                    0 if res.removed_cols is None else res.removed_cols.numel()
                )
        log.debug("%s: block change in %.3fs", name, time.perf_counter() - t0)

    def _module_report(self, name: str, mod: nn.Module) -> ModuleReport:
        rep = self.modules_report.setdefault(
            name,
            ModuleReport(name=name, methods=[], shape=tuple(get_weight(mod).shape)),  # type: ignore[arg-type]
        )
        rep.shape = tuple(get_weight(mod).shape)  # type: ignore[assignment]
        return rep

    def _solve(
        self, name: str, mod: nn.Module, stats: LayerStats | None, st: ResolvedStage, hooks: MethodHooks
    ) -> LayerResult:
        """One layer's result (the model is not changed)."""
        cfg = st.config
        prev = compression_state(self.model).keep_mask(name)
        scores = hooks.score(mod, stats, cfg)
        mask = None
        if scores is not None:
            target = cfg.sparsity_target()
            if target is None:
                raise ModelError(
                    f"{st.name}: {type(cfg).__name__} returned scores but declares no sparsity_target()"
                )
            mask = hooks.select_mask(scores, target, cfg)
        elif prev is not None:
            mask = prev.to(get_weight(mod).device)  # earlier stages' mask: pruned weights must stay zero
        res = hooks.update(mod, mask, stats, cfg)
        if res is None:
            raise ModelError(f"{st.name}: no plugin computed a result for {name} (method {cfg.method!r})")
        if res.mask is None and scores is not None:
            res = dataclasses.replace(res, mask=mask)
        return _calibrate_inputs(res, stats, name)

    def _record(self, name: str, mod: nn.Module, res: LayerResult, st: ResolvedStage, seconds: float) -> None:
        """Commit one layer's result to the model and report it."""
        cfg = st.config
        merged = commit(self.model, name, mod, res)
        rep = self._module_report(name, mod)
        rep.methods.append(cfg.method)
        rep.info.update(res.info)
        rep.info.update(self.moe_info.get(name, {}))
        rep.info[f"{cfg.method}_time_s"] = round(seconds, 4)
        if res.loss is not None:
            rep.losses[cfg.method] = float(res.loss)
        # the pruned fraction: from the mask when there is one (quantization may round a few
        # kept weights to 0, which is not pruning), else the measured zeros of a dense update
        if merged.mask is not None:
            rep.sparsity = 1.0 - float(merged.mask.float().mean())
        elif merged.quant is None:
            rep.sparsity = float((get_weight(mod) == 0).float().mean())
        rep.bits = None if merged.quant is None else merged.quant.bits


def _solve_cost(mod: nn.Module) -> float:
    """Relative cost of solving a layer (an OBS solve: in^2 * out)."""
    inp, out = in_out_features(mod)
    return float(inp) ** 2 * out


def _calibrate_inputs(res: LayerResult, stats: LayerStats | None, name: str) -> LayerResult:
    """Give a static activation scheme its per-tensor input scale (from the inputs' max |x|)."""
    q = res.quant
    if q is None or not is_static(q.activations) or q.input_scale is not None:
        return res
    assert q.activations is not None
    if stats is None or "absmax" not in stats.acc:
        raise ModelError(f"{name}: activations {q.activations!r} need the calibration inputs' max |x|")
    q = dataclasses.replace(q, input_scale=static_scale(stats.absmax, q.activations))
    return dataclasses.replace(res, quant=q)


def _needing_calibration(stages: list[ResolvedStage], rec: Recipe) -> str:
    methods = [s.config.method for s in stages if s.config.calibrated()]
    parts = [f"methods {methods}"] if methods else []
    return " and ".join(parts + (["kv_cache: fp8"] if rec.kv_cache is not None else []))


def _calibrate_kv_cache(model: nn.Module, ids: torch.Tensor, batch_size: int, dev: torch.device) -> None:
    """FP8 KV cache: per-layer key/value scales from the compressed model on the calibration
    tokens, recorded in the model's compression state and switched on."""
    from llmpress.format import kv_cache

    with outside_blocks_on(model, "", dev):
        scales = kv_cache.calibrate(model, ids.split(batch_size))
    kv_cache.enable(model, scales)
    state = compression_state(model, create=True)
    state.kv_cache = {"dtype": "float8_e4m3fn", "scales": {n: [k, v] for n, (k, v) in scales.items()}}


def structure_summary(
    params_before: int, widths_before: list[dict[str, int]] | None, model: nn.Module, blocks: nn.ModuleList
) -> dict[str, Any]:
    """The blocks' parameters before/after and per-block widths ``[before, after]``."""
    after = sum(p.numel() for b in blocks for p in b.parameters())
    out: dict[str, Any] = {
        "params_before": params_before,
        "params_after": after,
        "removed_fraction": round(1 - after / max(params_before, 1), 6),
    }
    widths_after = block_widths(model)
    if widths_before is not None and widths_after is not None:
        out["layers"] = [{k: [b[k], a.get(k, 0)] for k in b} for b, a in zip(widths_before, widths_after)]
    log.info(
        "block parameters %d -> %d (%.2f %% removed)", params_before, after, 100 * out["removed_fraction"]
    )
    return out


@with_experts_unfused  # MoE: one nn.Linear per expert projection while compressing (llmpress.model.moe)
def compress(
    model: nn.Module,
    recipe: Recipe | dict[str, Any] | list[Any] | str | Any,
    calibration: CalibrationSource | None = None,
    *,
    tokenizer: Any = None,
    nsamples: int = 128,
    seqlen: int = 2048,
    seed: int = 0,
    device: str | torch.device | None = None,
    batch_size: int | None = None,
    offload_activations: bool = False,
    offload_stats: bool = False,
    pm: Llmpress | None = None,
    progress: bool = True,
) -> tuple[nn.Module, CompressionReport]:
    """Compress ``model`` in place with ``recipe``; returns ``(model, report)``.

    Each layer's result (keep mask, quantization state, loss) is committed to the model and
    recorded in its :func:`llmpress.model.results.compression_state`, which the savers read.
    Mixture-of-experts models keep their architecture: fused experts are unfused for the
    compression and fused back afterwards; results name the per-expert layers
    (``...experts.3.down_proj``, see :mod:`llmpress.model.moe`).

    :param model: a Hugging Face model (causal LM or encoder) on any device.
    :param recipe: a :class:`Recipe`, a dict/list as in a YAML recipe, a file path, or a
        method config.
    :param calibration: token ids ``[n, L]``, or a text source (file, list of strings,
        dataset) tokenized with ``tokenizer`` into ``nsamples x seqlen`` windows (seed
        ``seed``). Not needed when every stage works without data (magnitude).
    :param device: where each block is compressed (default: the model's device).
    :param batch_size: calibration sequences per block forward (default: ~8k tokens).
    :param offload_activations: keep calibration activations on CPU between uses.
    :param offload_stats: keep the layers' input statistics (``X^T X`` and the like) on CPU:
        each batch's part is computed on ``device`` and added there, and a layer's statistics
        come back to ``device`` only for its solve (for blocks with many or wide inputs, such
        as mixture-of-experts blocks).
    """
    t_start = time.perf_counter()
    pm = pm or get_plugin_manager()
    rec = as_recipe(recipe)
    stages = rec.resolve(pm)
    dev = torch.device(device) if device is not None else _default_device(model)
    if any(st.allocation is not None for st in stages):  # per-layer levels under a budget
        from llmpress.allocation.allocate import compress_allocated

        return compress_allocated(
            model,
            rec,
            stages,
            pm,
            calibration,
            tokenizer=tokenizer,
            nsamples=nsamples,
            seqlen=seqlen,
            seed=seed,
            device=dev,
            batch_size=batch_size,
            progress=progress,
        )
    engine = _Engine(model, stages, pm, dev)  # validates targets and shapes before any work
    distributed.bind(dev)
    if rec.moe_min_tokens is not None:
        engine.moe_min_tokens = rec.moe_min_tokens
    engine.offload_stats = offload_stats
    needs_calib = any(s.config.calibrated() for s in stages) or rec.kv_cache is not None

    calib_info: dict[str, Any] = {}
    acts: BlockActivations | None = None
    if needs_calib:
        if calibration is None:
            raise CalibrationError(
                f"{_needing_calibration(stages, rec)} need calibration data: pass a text file, a list of "
                f"strings or token ids"
            )
        if not isinstance(calibration, torch.Tensor) and tokenizer is None:
            raise CalibrationError(
                "calibration text needs a tokenizer: pass tokenizer=... (command line: --tokenizer PATH_OR_ID, "
                "for a model saved without one)"
            )
        ids = build_calibration(tokenizer, calibration, nsamples=nsamples, seqlen=seqlen, seed=seed)
        calib_info = {"nsamples": int(ids.shape[0]), "seqlen": int(ids.shape[1]), "seed": seed}
        if isinstance(calibration, (str,)) or hasattr(calibration, "__fspath__"):
            calib_info["source"] = str(calibration)
        local = distributed.shard(ids)  # this process's share of the sequences
        bs = batch_size or max(1, min(local.shape[0], 8192 // ids.shape[1]))
        store = torch.device("cpu") if offload_activations else dev
        acts = BlockActivations(store=store, compute=dev)
        grad_names = engine.grad_targets()
        if grad_names:
            engine.grads = collect_gradients(model, local, grad_names, bs, dev, progress=progress)
            distributed.all_reduce_sum(engine.grads.values())
        with outside_blocks_on(model, engine.prefix, dev):
            acts.capture(model, engine.blocks[0], local, bs, progress=progress)
        log.info("captured %d calibration batches of %d x %d", len(acts.hidden), bs, ids.shape[1])

    blocks = engine.blocks
    structured = any(st.config.scope == "block" for st in stages)
    params_before = sum(p.numel() for b in blocks for p in b.parameters())
    widths_before = block_widths(model) if structured else None
    was_training = model.training
    model.eval()
    engine.plan(acts, dev, progress)
    hidden = engine.change_model(acts)
    for i in tqdm(range(len(blocks)), desc="compressing blocks", disable=not progress):
        block = blocks[i]
        with onload(block, dev):  # back home (or to its offload storage) with the compressed weights
            engine.compress_block(i, block, acts)
            if acts is not None and i + 1 < len(blocks):
                acts.run(block, keep_outputs=True)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    model.train(was_training)
    if rec.kv_cache is not None:
        _calibrate_kv_cache(model, ids, bs, dev)

    report = CompressionReport(
        recipe=rec.to_dict(),
        base_model=getattr(model, "name_or_path", None) or None,
        modules=engine.modules_report,
        calibration=calib_info,
        device=str(dev),
        world_size=distributed.world_size(),
        devices=distributed.gather_objects(str(dev)),
        wall_time_s=time.perf_counter() - t_start,
        versions=versions(),
    )
    if structured:
        report.structure = structure_summary(params_before, widths_before, model, blocks)
        if hidden is not None:
            report.structure["hidden"] = [hidden["before"], hidden["after"]]
    log.info(
        "compressed %d layers, overall sparsity %.4f in %.1fs",
        len(report.modules),
        report.overall_sparsity,
        report.wall_time_s,
    )
    return model, report
