"""The sequential layer pass (the SparseGPT/GPTQ scheme), dispatching to plugins.

For each block: collect input statistics of its target layers with forward hooks, run
score -> mask -> update for every target layer of every stage, then re-run the compressed
block so the next block sees compressed inputs. Only the current block needs to be on the
compute device; activations can rest on CPU (``offload_activations``).
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from llmpress.calibration import CalibrationSource, build_calibration
from llmpress.capture import BlockActivations, outside_blocks_on
from llmpress.errors import CalibrationError, ModelError
from llmpress.modules import find_blocks, get_weight, in_out_features, select_targets, set_weight
from llmpress.plugin_manager import Llmpress, get_plugin_manager
from llmpress.recipe import Recipe, ResolvedStage, as_recipe
from llmpress.report import CompressionReport, ModuleReport
from llmpress.stats import LayerStats, StatsCollector, input_groups
from llmpress.update import UpdateResult
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
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover
        return torch.device("cpu")


class _Engine:
    """State of one compression run."""

    def __init__(
        self, model: nn.Module, stages: list[ResolvedStage], pm: Llmpress, device: torch.device
    ) -> None:
        self.model = model
        self.stages = stages
        self.pm = pm
        self.device = device
        self.prefix, self.blocks, self.plans = _plan(model, stages)
        self.modules_report: dict[str, ModuleReport] = {}
        self.quant_state: dict[str, dict[str, Any]] = {}

    def compress_block(self, i: int, block: nn.Module, acts: BlockActivations | None) -> None:
        linears = dict(block.named_modules())
        keep: dict[str, torch.Tensor] = {}  # accumulated keep masks of this block
        for si, st in enumerate(self.stages):
            rels = self.plans[si].get(i, [])
            if not rels:
                continue
            pending = {r: linears[r] for r in rels}
            sequential = bool(getattr(st.config, "true_sequential", False))
            while pending:
                stats: dict[str, LayerStats] = {}
                group = list(pending)
                if acts is not None and st.config.needs_calibration:
                    needs = set(st.config.stats) or {"sq_norms"}
                    with StatsCollector(pending, needs) as col:
                        acts.run(block, keep_outputs=False, on_batch=col.new_batch)
                    stats = col.stats
                    if sequential:  # only the first input group now; the rest see its output
                        group = input_groups(col)[0]
                for rel in group:
                    self._apply(f"{self.prefix}.{i}.{rel}", rel, pending.pop(rel), stats.get(rel), st, keep)
                del stats

    def _apply(
        self,
        name: str,
        rel: str,
        mod: nn.Module,
        stats: LayerStats | None,
        st: ResolvedStage,
        keep: dict[str, torch.Tensor],
    ) -> None:
        hook, cfg = self.pm.hook, st.config
        t0 = time.perf_counter()
        scores = hook.llmpress_score_importance(module=mod, stats=stats, config=cfg)
        mask = None
        if scores is not None:
            target_fn = getattr(cfg, "sparsity_target", None)
            if target_fn is None:
                raise ModelError(
                    f"{st.name}: {type(cfg).__name__} returned scores but has no sparsity_target()"
                )
            mask = hook.llmpress_select_mask(scores=scores, target=target_fn(), config=cfg)
        elif rel in keep:
            mask = keep[rel]  # earlier stages' mask: pruned weights must stay zero
        res = hook.llmpress_update_weights(module=mod, mask=mask, stats=stats, config=cfg)
        if res is None:
            raise ModelError(
                f"{st.name}: no plugin updated {name} (method {cfg.method!r} implements no update hook)"
            )
        if not isinstance(res, UpdateResult):
            res = UpdateResult(weight=res, mask=mask)
        new_mask = res.mask if res.mask is not None else mask
        if new_mask is not None:
            keep[rel] = new_mask if rel not in keep else keep[rel] & new_mask
        w = res.weight
        if rel in keep:
            w = w * keep[rel].to(w.device)
        set_weight(mod, w)
        if res.quant is not None:
            self.quant_state[name] = {
                k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in res.quant.items()
            }
        rep = self.modules_report.setdefault(
            name,
            ModuleReport(name=name, methods=[], shape=tuple(get_weight(mod).shape)),  # type: ignore[arg-type]
        )
        rep.methods.append(cfg.method)
        rep.info.update(res.info)
        rep.info[f"{cfg.method}_time_s"] = round(time.perf_counter() - t0, 4)
        # the pruned fraction: from the mask when there is one (quantization may round a few
        # kept weights to 0, which is not pruning), else the measured zeros of a dense update
        if rel in keep:
            rep.sparsity = 1.0 - float(keep[rel].float().mean())
        elif name not in self.quant_state:
            rep.sparsity = float((get_weight(mod) == 0).float().mean())


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
    pm: Llmpress | None = None,
    progress: bool = True,
) -> tuple[nn.Module, CompressionReport]:
    """Compress ``model`` in place with ``recipe``; returns ``(model, report)``.

    :param model: a Hugging Face model (causal LM or encoder) on any device.
    :param recipe: a :class:`Recipe`, a dict/list as in a YAML recipe, a file path, or a
        method config.
    :param calibration: token ids ``[n, L]``, or a text source (file, list of strings,
        dataset) tokenized with ``tokenizer`` into ``nsamples x seqlen`` windows (seed
        ``seed``). Not needed when every stage works without data (magnitude).
    :param device: where each block is compressed (default: the model's device).
    :param batch_size: calibration sequences per block forward (default: ~8k tokens).
    :param offload_activations: keep calibration activations on CPU between uses.
    """
    t_start = time.perf_counter()
    pm = pm or get_plugin_manager()
    rec = as_recipe(recipe)
    stages = rec.resolve(pm)
    dev = torch.device(device) if device is not None else _default_device(model)
    engine = _Engine(model, stages, pm, dev)  # validates targets and shapes before any work
    needs_calib = any(s.config.needs_calibration for s in stages)

    calib_info: dict[str, Any] = {}
    acts: BlockActivations | None = None
    if needs_calib:
        if calibration is None:
            raise CalibrationError(
                f"methods {[s.config.method for s in stages if s.config.needs_calibration]} need calibration "
                f"data: pass a text file, a list of strings or token ids"
            )
        if not isinstance(calibration, torch.Tensor) and tokenizer is None:
            raise CalibrationError("calibration text needs a tokenizer (pass tokenizer=...)")
        ids = build_calibration(tokenizer, calibration, nsamples=nsamples, seqlen=seqlen, seed=seed)
        calib_info = {"nsamples": int(ids.shape[0]), "seqlen": int(ids.shape[1]), "seed": seed}
        if isinstance(calibration, (str,)) or hasattr(calibration, "__fspath__"):
            calib_info["source"] = str(calibration)
        bs = batch_size or max(1, min(ids.shape[0], 8192 // ids.shape[1]))
        store = torch.device("cpu") if offload_activations else dev
        acts = BlockActivations(store=store, compute=dev)
        with outside_blocks_on(model, engine.prefix, dev):
            acts.capture(model, engine.blocks[0], ids, bs, progress=progress)
        log.info("captured %d calibration batches of %d x %d", len(acts.hidden), bs, ids.shape[1])

    blocks = engine.blocks
    was_training = model.training
    model.eval()
    for i in tqdm(range(len(blocks)), desc="compressing blocks", disable=not progress):
        block = blocks[i]
        home = _default_device(block)
        block.to(dev)
        engine.compress_block(i, block, acts)
        if acts is not None and i + 1 < len(blocks):
            acts.run(block, keep_outputs=True)
        block.to(home)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    model.train(was_training)

    report = CompressionReport(
        recipe=rec.to_dict(),
        base_model=getattr(model, "name_or_path", None) or None,
        modules=engine.modules_report,
        calibration=calib_info,
        device=str(dev),
        wall_time_s=time.perf_counter() - t_start,
        versions=versions(),
        quant_state=engine.quant_state,
    )
    log.info(
        "compressed %d layers, overall sparsity %.4f in %.1fs",
        len(report.modules),
        report.overall_sparsity,
        report.wall_time_s,
    )
    return model, report
