"""One runner for every plan: stages grouped into block passes and model-level steps.

Consecutive blockwise stages (per-layer updates, block changes, a plugin's own kind) share one
block pass; a model-level stage (an allocation search; recovery training) runs alone on the
whole model between passes, and the pass after it captures fresh inputs from the model it
left. The calibration tokens are built once per run. Stages write into one
:class:`~llmpress.engine.record.RunRecord`, which becomes the caller's result.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import defaultdict
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from llmpress.allocation.allocate import AllocationSearch
from llmpress.engine import distributed
from llmpress.engine.block_pass import BlockPass
from llmpress.engine.capture import outside_blocks_on
from llmpress.engine.moe_stats import DEFAULT_MIN_TOKENS
from llmpress.engine.record import RunRecord
from llmpress.engine.stage import BlockwiseStage, BoundStage, ModelContext, ModelStage, StageExecutor
from llmpress.errors import ModelError
from llmpress.format import kv_cache
from llmpress.model.modules import find_blocks, in_out_features, select_targets
from llmpress.model.results import CompressionState
from llmpress.recipe.plan import Plan

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """How a plan runs (the knobs of :func:`llmpress.compress`)."""

    device: torch.device
    batch_size: int | None = None
    offload_activations: bool = False
    offload_stats: bool = False
    progress: bool = True
    #: the calibration source and tokenizer as given to ``compress`` (for training stages)
    source: object = None
    tokenizer: object = None


def bind(model: nn.Module, plan: Plan) -> list[BoundStage]:
    """Each stage's target layers, per block; every target's shape is checked against its
    stage's config before any work."""
    prefix, _ = find_blocks(model)
    modules = dict(model.named_modules())
    out = []
    for rs in plan.stages:
        per_block: dict[int, list[str]] = defaultdict(list)
        for n in select_targets(model, rs.stage.targets, rs.stage.ignore, rs.name):
            rs.config.check_module(n, *in_out_features(modules[n]))
            idx, rel = n[len(prefix) + 1 :].split(".", 1)
            per_block[int(idx)].append(rel)
        assert rs.hooks is not None
        out.append(
            BoundStage(
                rs.index, rs.config, rs.hooks, dict(per_block), rs.stage.to_dict(), rs.allocation, rs.search
            )
        )
    if plan.kv_cache in kv_cache.INT_KV_BITS:
        kv_cache.check_int(model, plan.kv_cache, plan.kv_group_size)  # before any work
    if any(rs.config.prunes_hidden() for rs in plan.stages):
        from llmpress.structure.hidden import check_hidden_prunable

        check_hidden_prunable(model)  # before any work: the architecture can shrink its width
    return out


def executor(stage: BoundStage, record: RunRecord) -> StageExecutor:
    """The stage's executor: an allocation search when it has an ``allocation:`` section,
    else the kind its config names."""
    if stage.allocation is not None:
        return AllocationSearch(stage, record)
    return stage.config.kind(stage, record)


def _groups(executors: Sequence[StageExecutor]) -> Iterator[list[BlockwiseStage] | ModelStage]:
    """Consecutive blockwise stages together; each model-level stage alone."""
    run: list[BlockwiseStage] = []
    for ex in executors:
        if isinstance(ex, BlockwiseStage):
            run.append(ex)
            continue
        if run:
            yield run
            run = []
        if not isinstance(ex, ModelStage):
            raise ModelError(f"{ex.stage.name}: {type(ex).__name__} is neither a blockwise nor a model stage")
        yield ex
    if run:
        yield run


def _restored_record(model: nn.Module, start: CompressionState | None) -> RunRecord:
    """A new record, holding the layers of a compressed checkpoint the run continues from."""
    record = RunRecord()
    if start is None:
        return record
    for name, result in start.layers.items():
        record.commit(name, model.get_submodule(name), result, "checkpoint")
    record.state.kv_cache = start.kv_cache
    record.restored = tuple(start.layers)
    return record


def run_plan(
    model: nn.Module,
    plan: Plan,
    stages: list[BoundStage],
    ids: torch.Tensor | None,
    opts: RunOptions,
    start: CompressionState | None = None,
) -> RunRecord:
    """Execute ``plan`` on ``model`` (changed in place) and return the run's record; ``start``:
    the committed results of a compressed checkpoint the run continues from."""
    record = _restored_record(model, start)
    # EoRA-like stages: each layer's weight before this run's first commit to it
    record.keep_originals = any(s.config.needs_original_weights for s in stages)
    min_tokens = DEFAULT_MIN_TOKENS if plan.moe_min_tokens is None else plan.moe_min_tokens
    local = None if ids is None else distributed.shard(ids)  # this process's share of the sequences
    bs = _batch_size(opts.batch_size, local if local is not None else ids)
    executors = [executor(s, record) for s in stages]
    for ex in executors:
        ex.check(model, stages, ids)  # before any work
    # a run that continues from a compressed checkpoint has no uncompressed model to copy: its
    # recovery stages name their teacher (Distill.check)
    needs_copy = not record.restored and any(s.config.copies_model() for s in stages)
    teacher = _teacher(model) if needs_copy else None
    was_training = model.training
    model.eval()
    try:
        for group in _groups(executors):
            if isinstance(group, ModelStage):
                ctx = ModelContext(
                    model, opts.device, ids, bs, opts.progress, record, min_tokens, plan.to_dict(),
                    teacher=teacher, source=opts.source, tokenizer=opts.tokenizer,
                )  # fmt: skip
                group.run(ctx)
                continue
            run = BlockPass(
                model, opts.device, record, moe_min_tokens=min_tokens, offload_stats=opts.offload_stats
            )
            grad_layers = [
                f"{run.prefix}.{i}.{r}"
                for s in group
                if "grad" in s.config.statistics()
                for i, rels in s.stage.targets.items()
                for r in rels
            ]
            calibrated = any(s.config.calibrated() for s in group)
            run.start(
                local if calibrated else None,
                bs,
                grad_layers=list(dict.fromkeys(grad_layers)),
                offload_activations=opts.offload_activations,
                progress=opts.progress,
            )
            run.run(group, progress=opts.progress)
    finally:
        model.train(was_training)
    if plan.kv_cache in kv_cache.INT_KV_BITS:  # dynamic: nothing to calibrate
        kv_cache.enable_int(model, plan.kv_cache, plan.kv_group_size)
        kv_group = {} if plan.kv_group_size is None else {"group_size": plan.kv_group_size}
        record.state.kv_cache = {"dtype": plan.kv_cache, **kv_group}
    elif plan.kv_cache is not None:
        assert ids is not None
        _calibrate_kv_cache(model, ids, bs, opts.device, record)
    return record


def _teacher(model: nn.Module) -> nn.Module:
    """A frozen CPU copy of the model before any stage (the distillation teacher)."""
    import copy

    teacher = copy.deepcopy(model).to("cpu").eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def _batch_size(asked: int | None, ids: torch.Tensor | None) -> int:
    """Calibration sequences per block forward (default: about 8k tokens)."""
    if asked is not None or ids is None:
        return asked or 1
    return max(1, min(ids.shape[0], 8192 // ids.shape[1]))


def _calibrate_kv_cache(
    model: nn.Module, ids: torch.Tensor, batch_size: int, dev: torch.device, record: RunRecord
) -> None:
    """FP8 KV cache: per-layer key/value scales from the compressed model on the calibration
    tokens, kept in the run's state and switched on."""
    with outside_blocks_on(model, "", dev):
        scales = kv_cache.calibrate(model, ids.split(batch_size))
    kv_cache.enable(model, scales)
    record.state.kv_cache = {"dtype": "float8_e4m3fn", "scales": {n: [k, v] for n, (k, v) in scales.items()}}
