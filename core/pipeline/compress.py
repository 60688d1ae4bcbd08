"""``llmpress.compress``: a recipe resolved once into a plan, calibration data built once, one
runner (:mod:`llmpress.pipeline.runner`), and the result handed back to the caller."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmpress.engine import distributed
from llmpress.engine.calibration import CalibrationSource, build_calibration
from llmpress.engine.record import RunRecord
from llmpress.errors import CalibrationError
from llmpress.model.moe_model import with_experts_unfused
from llmpress.model.offload import execution_device
from llmpress.model.report import CompressionResult
from llmpress.pipeline.resume import is_compressed_checkpoint, restore_checkpoint
from llmpress.pipeline.runner import RunOptions, bind, run_plan
from llmpress.plugin_manager import Llmpress
from llmpress.recipe.config import MethodConfig
from llmpress.recipe.plan import Plan, make_plan
from llmpress.recipe.recipes import Recipe
from llmpress.versions import versions

log = logging.getLogger(__name__)


def _default_device(model: nn.Module) -> torch.device:
    dispatched = execution_device(model)  # accelerate hooks (offloaded weights are on meta)
    if dispatched is not None:
        return dispatched
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover
        return torch.device("cpu")


def calibration_ids(
    plan: Plan,
    calibration: CalibrationSource | None,
    tokenizer: Any,
    nsamples: int,
    seqlen: int,
    seed: int,
) -> tuple[torch.Tensor | None, dict[str, Any]]:
    """The calibration windows ``[n, L]`` (``None`` when no stage needs data) and their record."""
    if not plan.needs_calibration():
        return None, {}
    if calibration is None:
        raise CalibrationError(
            f"{plan.needing_calibration()} need calibration data: pass a text file, a list of "
            f"strings or token ids"
        )
    if not isinstance(calibration, torch.Tensor) and tokenizer is None:
        raise CalibrationError(
            "calibration text needs a tokenizer: pass tokenizer=... (command line: --tokenizer PATH_OR_ID, "
            "for a model saved without one)"
        )
    ids = build_calibration(tokenizer, calibration, nsamples=nsamples, seqlen=seqlen, seed=seed)
    info: dict[str, Any] = {"nsamples": int(ids.shape[0]), "seqlen": int(ids.shape[1]), "seed": seed}
    if isinstance(calibration, (str, os.PathLike)):
        info["source"] = str(calibration)
    return ids, info


def _result(
    model: nn.Module, plan: Plan, record: RunRecord, calib: dict[str, Any], dev: torch.device, t0: float
) -> CompressionResult:
    """The typed result of a run: the report (what a card and report.json show) and the state."""
    recipe = plan.to_dict()
    if record.written_back:  # an allocation's choice, as an explicit recipe that reproduces it
        recipe["stages"] = [record.written_back.get(i, s) for i, s in enumerate(recipe["stages"])]
    return CompressionResult(
        recipe=recipe,
        base_model=getattr(model, "name_or_path", None) or None,
        modules=record.modules,
        calibration=calib,
        device=str(dev),
        world_size=distributed.world_size(),
        devices=distributed.gather_objects(str(dev)),
        wall_time_s=time.perf_counter() - t0,
        versions=versions(),
        allocation=record.allocation,
        recovery=record.recovery,
        transforms=record.transforms,
        structure=record.structure,
        kv_cache=_kv_summary(record.state.kv_cache),
        state=record.state,
    )


def _kv_summary(kv: dict[str, Any] | None) -> dict[str, Any] | None:
    """The report's view of the run's KV cache (what is rounded, and how)."""
    if kv is None:
        return None
    if kv["dtype"] == "float8_e4m3fn":
        return {
            "dtype": kv["dtype"],
            "rounding": "static per-layer key/value scales",
            "layers": len(kv["scales"]),
        }
    group = kv.get("group_size")
    return {
        "dtype": kv["dtype"],
        "group_size": group,
        "rounding": f"dynamic symmetric, one scale per token and {'head' if group is None else f'{group} channels'}",
    }


@with_experts_unfused  # MoE: one nn.Linear per expert projection while compressing (llmpress.model.moe)
def compress(
    model: nn.Module,
    recipe: Plan | Recipe | dict[str, Any] | list[Any] | str | Path | MethodConfig,
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
) -> tuple[nn.Module, CompressionResult]:
    """Compress ``model`` in place with ``recipe``; returns ``(model, result)``.

    ``result`` is a :class:`~llmpress.model.report.CompressionResult`: the report (per-layer
    methods, sparsity, losses; allocation and structure summaries) and ``result.state``, each
    layer's committed result (keep mask, quantization state), which the savers read. Nothing
    is stored on ``model``. Mixture-of-experts models keep their architecture: fused experts
    are unfused for the compression and fused back afterwards; results name the per-expert
    layers (``...experts.3.down_proj``, see :mod:`llmpress.model.moe`).

    :param model: a Hugging Face model (causal LM or encoder) on any device, or a model loaded
        from an llmpress checkpoint: its packed layers are unpacked to dense ones and the run
        continues from their masks and grids (:mod:`llmpress.pipeline.resume`).
    :param recipe: a :class:`~llmpress.recipe.plan.Plan`, a :class:`Recipe`, a dict/list as in
        a YAML recipe, a file path, or a method config.
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
    t0 = time.perf_counter()
    plan = make_plan(recipe, pm)
    dev = torch.device(device) if device is not None else _default_device(model)
    start = restore_checkpoint(model, pm) if is_compressed_checkpoint(model) else None
    stages = bind(model, plan)  # validates targets and shapes before any work
    distributed.bind(dev)
    ids, calib = calibration_ids(plan, calibration, tokenizer, nsamples, seqlen, seed)
    opts = RunOptions(dev, batch_size, offload_activations, offload_stats, progress, calibration, tokenizer)
    record = run_plan(model, plan, stages, ids, opts, start)
    result = _result(model, plan, record, calib, dev, t0)
    log.info(
        "compressed %d layers, overall sparsity %.4f in %.1fs",
        len(result.modules),
        result.overall_sparsity,
        result.wall_time_s,
    )
    return model, result
