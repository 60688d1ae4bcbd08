"""Saving compressed models: packed per the format registry, atomically, without changing the model.

The saver reads each layer's committed result from the run's
:class:`llmpress.model.report.CompressionResult` (``result.state``, see :func:`saved_state`):
its keep mask and quantization state, never zero patterns. Layers whose shape differs from
what the model's config builds (structured pruning) and dropped sub-blocks are recorded in
``quantization_config`` too, so ``from_pretrained`` rebuilds them.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmpress.format.formats import ModuleFormat, choose_format, pack_module
from llmpress.format.lowrank import LowRankLinear
from llmpress.format.output import atomic_directory
from llmpress.format.runtime import LlmpressLinear, replace_module
from llmpress.format.shards import reverse_conversion, write_shards
from llmpress.format.transforms import attach_transforms
from llmpress.model.dropped import DroppedModule
from llmpress.model.modules import _is_conv1d, get_weight, is_linear
from llmpress.model.moe import UnfusedExperts
from llmpress.model.moe_model import (
    expert_views,
    fuse_state_dict,
    fused_experts,
    irregular_experts,
    unfuse_model,
    unfused_experts,
)
from llmpress.model.offload import stored_tensor as _stored
from llmpress.model.report import CompressionReport, CompressionResult
from llmpress.model.results import CompressionState, LayerResult

log = logging.getLogger(__name__)

REPORT_FILE = "llmpress_report.json"
RECIPE_FILE = "llmpress_recipe.json"


def saved_state(model: nn.Module, report: CompressionReport | None = None) -> CompressionState:
    """The per-layer results and KV-cache scales to save with ``model``.

    In order: ``report.state`` when ``report`` is the :class:`CompressionResult` of a
    ``compress`` run; the state a model loaded with ``from_pretrained`` keeps on its
    :class:`llmpress.format.hf_quantizer.LlmpressConfig` (``model.config.quantization_config.state``);
    else none (an uncompressed model saves as it is).
    """
    if isinstance(report, CompressionResult):
        return report.state
    from llmpress.format.hf_quantizer import LlmpressConfig

    qc = getattr(getattr(model, "config", None), "quantization_config", None)
    if isinstance(qc, LlmpressConfig) and qc.state is not None:
        return qc.state
    return CompressionState()


def _config_shapes(model: nn.Module, config: Any = None) -> dict[str, tuple[int, int]] | None:
    """``[out, in]`` of every linear layer as ``config`` (default: the model's) builds it (on
    the meta device, no memory), or ``None`` if the model cannot be rebuilt from it."""
    config = config if config is not None else getattr(model, "config", None)
    if config is None:
        return None
    try:
        with torch.device("meta"):
            skeleton = type(model)(config)
    except Exception as e:  # noqa: BLE001 - a custom model class: fall back to recorded results
        log.debug("cannot rebuild %s from its config (%s)", type(model).__name__, e)
        return None
    return {n: tuple(get_weight(m).shape) for n, m in skeleton.named_modules() if is_linear(m)}  # type: ignore[misc]


def export_state_dict(
    model: nn.Module,
    sparse: str = "auto",
    dtype: torch.dtype | None = torch.float16,
    state: CompressionState | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]]:
    """The tensors to save and the per-module ``quantization_config`` entries; the model is
    not changed (all tensors at once; :func:`export_units` builds them one module at a time).

    Quantized layers are stored ``int`` (or ``int-2:4``); pruned-only layers ``2:4`` or
    ``bitmask`` when that is smaller (``sparse="dense"`` keeps them dense); resized layers
    ``dense`` with their shape; dropped sub-blocks ``dropped``. Floating tensors are cast to
    ``dtype`` (``None``: kept). ``state``: the results to save (default: :func:`saved_state`).
    """
    units, modules = export_units(model, sparse, dtype, dedupe_tied=False, state=state)
    sd: dict[str, torch.Tensor] = {}
    for unit in units:
        sd.update(unit())
    return sd, modules


def _cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return t.to(dtype) if dtype is not None and t.is_floating_point() else t


def _layer_format(
    name: str,
    mod: nn.Module,
    res: LayerResult | None,
    shapes: dict[str, tuple[int, int]] | None,
    irregular: Iterable[str],
    sparse: str,
    dtype_name: str,
) -> ModuleFormat | None:
    """The stored format of linear layer ``name`` (its committed result ``res``), or ``None``
    when it is saved as an ordinary weight. ``shapes``: what the saved config builds;
    ``irregular``: MoE experts modules resized by structured pruning (stored unfused)."""
    out_f, in_f = get_weight(mod).shape
    resized = res is not None and (res.removed_rows is not None or res.removed_cols is not None)
    if shapes is not None:
        resized = name in shapes and shapes[name] != (out_f, in_f)
    target = None if res is None else choose_format(res.quant, res.mask, sparse)
    if target is None and any(name.startswith(e + ".") for e in irregular):
        resized = True
    if target is None and resized:
        target = "dense"
    lowrank = None if res is None or res.lowrank is None else int(res.lowrank[0].shape[0])
    if target is None and lowrank is not None:  # a low-rank path beside a plain weight (EoRA)
        target = "dense"
    if target is None:
        return None
    q = None if res is None else res.quant
    grid = q is not None and q.kind in ("int", "spqr")
    spqr = None if q is None else q.spqr
    return ModuleFormat(
        format=target,
        in_features=int(in_f),
        out_features=int(out_f),
        bits=q.bits if grid and q is not None else None,
        group_size=q.group_size if grid and q is not None else None,
        symmetric=bool(grid and q is not None and q.symmetric),
        activations=None if q is None else q.activations,
        dtype=dtype_name,
        nnz=int(res.mask.sum())
        if target == "bitmask" and res is not None and res.mask is not None
        else (spqr.nnz if spqr is not None else None),
        stat_bits=None if spqr is None else spqr.stat_bits,
        stat_group_size=None if spqr is None else spqr.stat_group,
        resized=resized,
        bias=isinstance(getattr(mod, "bias", None), torch.Tensor) if resized else None,
        lowrank=lowrank,
    )


def export_units(
    model: nn.Module,
    sparse: str = "auto",
    dtype: torch.dtype | None = torch.float16,
    dedupe_tied: bool = True,
    config: Any = None,
    state: CompressionState | None = None,
) -> tuple[list[Callable[[], dict[str, torch.Tensor]]], dict[str, dict[str, Any]]]:
    """What :func:`export_state_dict` returns, lazily: callables each building the tensors
    of one state-dict entry or one packed layer (offloaded weights read from their storage),
    in state-dict order, so that a writer holds one shard at a time. Tied tensors appear once.
    ``config``: the config the checkpoint is saved with (default: the model's); a layer whose
    shape differs from what it builds gets a ``dense`` entry. ``state``: the results to save
    (default: :func:`saved_state`)."""
    state = state if state is not None else saved_state(model)
    # fused MoE experts with packed per-expert results: stored unfused (temporary per-expert copies)
    with_result = {n for n, r in state.layers.items() if choose_format(r.quant, r.mask, sparse) is not None}
    views = expert_views(model, with_result)
    dtype_name = str(dtype or next(model.parameters()).dtype).replace("torch.", "")
    shapes = _config_shapes(model, config)  # resized layers, also of a loaded model without results
    mods = dict(model.named_modules())
    modules: dict[str, dict[str, Any]] = {}
    packed: dict[str, ModuleFormat] = {}  # layer name -> its format (the weight key is replaced)
    view_mods = {f"{e}.{n}": m for e, v in views.items() for n, m in v.named_modules() if n}
    irregular = irregular_experts(model)  # MoE experts resized by structured pruning: stored unfused
    for name, mod in [*mods.items(), *view_mods.items()]:
        if isinstance(mod, (LlmpressLinear, LowRankLinear)):  # loaded packed or low-rank: as it is
            modules[name] = mod.fmt.to_dict()
            continue
        if isinstance(mod, DroppedModule):
            modules[name] = ModuleFormat("dropped", 0, 0, kind=mod.kind).to_dict()
            continue
        if not is_linear(mod):
            continue
        fmt = _layer_format(name, mod, state.layers.get(name), shapes, irregular, sparse, dtype_name)
        if fmt is None:
            continue
        packed[name] = fmt
        modules[name] = fmt.to_dict()

    # the tensors of one MoE experts module are built together (fused back, or per expert)
    experts = {**unfused_experts(model), **views}
    mods.update(view_mods)
    units: list[Callable[[], dict[str, torch.Tensor]]] = []
    seen: set[int] = set()
    for key, t in model.state_dict(keep_vars=True).items():
        if dedupe_tied and id(t) in seen:  # tied (lm_head = embed_tokens): once, as save_pretrained does
            continue
        seen.add(id(t))
        group = next((e for e in experts if key.startswith(e + ".")), None)
        if group is not None:
            if id(experts[group]) not in seen:
                seen.add(id(experts[group]))
                units.append(_experts_unit(group, experts[group], mods, packed, state, dtype, modules))
            continue
        owner, _, leaf = key.rpartition(".")
        if leaf == "weight" and owner in packed:
            units.append(_packed_unit(mods, owner, packed[owner], state.layers.get(owner)))
        elif isinstance(mods.get(owner), LlmpressLinear) and leaf != "bias":  # packed: as stored
            units.append(_tensor_unit(mods, key, t, None))
        else:
            units.append(_tensor_unit(mods, key, t, dtype))
    return units, modules


def _tensor_unit(
    mods: dict[str, nn.Module], key: str, t: torch.Tensor, dtype: torch.dtype | None
) -> Callable[[], dict[str, torch.Tensor]]:
    def unit() -> dict[str, torch.Tensor]:
        v = _stored(mods, key) if t.device.type == "meta" else t.detach()
        return {key: _cast(v.to("cpu"), dtype)}

    return unit


def _packed_unit(
    mods: dict[str, nn.Module], name: str, fmt: ModuleFormat, res: Any
) -> Callable[[], dict[str, torch.Tensor]]:
    def unit() -> dict[str, torch.Tensor]:
        mod = mods[name]
        w = get_weight(mod)
        if w.device.type == "meta":  # offloaded: the compressed weight in its storage
            w = _stored(mods, f"{name}.weight")
            w = w.t() if _is_conv1d(mod) else w  # stored as the module holds it
        return {
            f"{name}.{suffix}": t for suffix, t in pack_module(fmt, w.detach().float(), res, name).items()
        }

    return unit


def _experts_unit(
    name: str,
    experts: UnfusedExperts,
    mods: dict[str, nn.Module],
    packed: dict[str, ModuleFormat],
    state: Any,
    dtype: torch.dtype | None,
    modules: dict[str, Any],
) -> Callable[[], dict[str, torch.Tensor]]:
    """One MoE experts module's tensors: per expert (packed layers packed) when any of its
    layers has a ``quantization_config`` entry, else the standard fused tensors
    (:mod:`llmpress.model.moe`)."""

    def unit() -> dict[str, torch.Tensor]:
        sd = {f"{name}.{k}": _cast(v.detach().to("cpu"), dtype) for k, v in experts.state_dict().items()}
        for layer in [n for n in packed if n.startswith(name + ".")]:
            sd.pop(f"{layer}.weight", None)
            sd.update(_packed_unit(mods, layer, packed[layer], state.layers.get(layer))())
        fuse_state_dict({name: experts}, sd, modules)
        return sd

    return unit


def stored_unfused(model: nn.Module, modules: dict[str, Any]) -> dict[str, str]:
    """MoE experts modules (fused or not) stored unfused because some of their layers are in
    ``modules``: name -> fused layout name."""
    found = {n: m.layout for n, m in unfused_experts(model).items()}
    found.update({n: lay for n, lay in fused_experts(model).items() if lay is not None})
    return {n: lay.name for n, lay in found.items() if any(k.startswith(n + ".") for k in modules)}


@torch.no_grad()
def to_runtime(
    model: nn.Module,
    sparse: str = "auto",
    dtype: torch.dtype = torch.float16,
    *,
    result: CompressionReport | None = None,
) -> nn.Module:
    """Turn ``model`` (in place) into what loading its saved checkpoint gives: compressed
    layers become their runtime modules (packed layers run by a kernel), floating tensors
    are cast to ``dtype``. ``result``: the run's result (its ``state`` is what is packed; see
    :func:`saved_state`). Returns the model."""
    sd, modules = export_state_dict(model, sparse, dtype, saved_state(model, result))
    unfuse_model(model, list(stored_unfused(model, modules)))  # packed MoE experts: per-expert layers
    for name, entry in modules.items():
        fmt = ModuleFormat.from_dict(entry, name)
        old = model.get_submodule(name)
        if isinstance(old, LlmpressLinear):
            continue
        bias = getattr(old, "bias", None)
        dev = get_weight(old).device if is_linear(old) else None
        new = fmt.spec.runtime(fmt, isinstance(bias, torch.Tensor), dev, dtype)
        new.load_state_dict({k[len(name) + 1 :]: v for k, v in sd.items() if k.startswith(name + ".")})
        replace_module(model, name, new)
    attach_transforms(model, saved_state(model, result).transforms or [])  # online rotations follow
    cast_saved_tensors(model, dtype)
    return model


def save_compressed(
    model: Any,
    out_dir: str | Path,
    *,
    tokenizer: Any = None,
    report: CompressionReport | None = None,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    sparse: str = "dense",
    extra: Callable[[Path], None] | None = None,
) -> Path:
    """Save a compressed model; the model itself is not changed.

    Pruned layers are saved dense by default (an ordinary checkpoint that plain
    ``AutoModel*.from_pretrained`` loads); quantized, sparse-packed (``sparse``), resized or
    dropped modules go with a ``quantization_config`` and load after ``import llmpress``.
    ``dtype`` casts the saved weights (e.g. back to the checkpoint's fp16). ``report``: the
    run's :class:`CompressionResult` (its ``state`` is what is saved, see :func:`saved_state`)
    or a plain report.
    """
    from llmpress.format.hf_quantizer import LlmpressConfig
    from llmpress.format.structured_export import export_plan

    plan = export_plan(model)  # structured pruning: a smaller standard config, or per-layer shapes
    config = copy.deepcopy(model.config)  # what is saved; the caller's config is never touched
    config.__dict__.update(plan.config)
    state = saved_state(model, report)
    with atomic_directory(out_dir, overwrite) as tmp:
        units, modules = export_units(model, sparse, dtype, config=config, state=state)
        units.append(lambda: plan.zero_tensors(dtype))
        config.dtype = dtype if dtype is not None else getattr(model, "dtype", None)
        config.architectures = [type(model).__name__]
        kv = state.kv_cache
        transforms = state.transforms or None
        experts = stored_unfused(model, modules)  # MoE experts stored unfused, unfused again at load
        llmpress_ckpt = bool(modules or plan.attributes or kv or transforms)
        if llmpress_ckpt:
            recipe = report.recipe if report is not None else {}
            config.quantization_config = LlmpressConfig(
                modules=modules,
                recipe=recipe,
                attributes=plan.attributes or None,
                kv_cache=kv,
                experts=experts or None,
                transforms=transforms,
            )
        # an llmpress checkpoint keeps the model's own tensor names (what the quantizer checks at
        # load); transformers would otherwise rename some (Mixtral: mlp -> block_sparse_moe)
        llmpress_ckpt = bool(modules or plan.attributes or kv)
        config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None and model.can_generate():
            model.generation_config.save_pretrained(tmp)
        convert = None if llmpress_ckpt else reverse_conversion(model)
        write_shards(tmp, units, convert=convert)  # streamed: one shard in memory
        _finish_config(tmp, dtype, checksums=llmpress_ckpt)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if report is not None:
            report.write(tmp / REPORT_FILE)
            (tmp / RECIPE_FILE).write_text(json.dumps(report.recipe, indent=2))
        if extra is not None:
            extra(tmp)
    log.info("saved to %s", out_dir)
    return Path(out_dir)


def _finish_config(folder: Path, dtype: torch.dtype | None, checksums: bool) -> None:
    """Fix up the saved ``config.json``: the stored ``dtype`` (save_pretrained records the
    in-memory one) and, for llmpress checkpoints, the checksums of every tensor and of the
    model config, verified at load (:mod:`llmpress.format.checkpoint`)."""
    from llmpress.format.checkpoint import config_checksum, record_checksums

    cfg_file = folder / "config.json"
    saved = json.loads(cfg_file.read_text())
    if dtype is not None:
        saved["dtype"] = str(dtype).replace("torch.", "")
    if checksums:
        q = saved["quantization_config"]
        record_checksums(q, sorted(folder.glob("*.safetensors")))
        q["config_checksum"] = config_checksum(saved)
    cfg_file.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")


def cast_saved_tensors(model: Any, dtype: torch.dtype) -> None:
    """Cast floating parameters and *persistent* buffers to ``dtype`` (in place), leaving
    computed buffers such as RoPE's ``inv_freq`` as ``from_pretrained`` would: the model then
    computes exactly like its saved-and-reloaded copy."""
    persistent = set(model.state_dict().keys())
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point() and (name in persistent) and t.dtype != dtype:
            t.data = t.data.to(dtype)


def save_quantized(
    model: Any,
    out_dir: str | Path,
    *,
    report: CompressionReport | None = None,
    tokenizer: Any = None,
    sparse: str = "auto",
    dtype: torch.dtype = torch.float16,
    overwrite: bool = False,
) -> Path:
    """Save with packed layers (quantized, and pruned ones stored sparsely when smaller);
    loads with ``import llmpress; AutoModel*.from_pretrained(dir)``. The model is not changed."""
    return save_compressed(
        model, out_dir, tokenizer=tokenizer, report=report, dtype=dtype, overwrite=overwrite, sparse=sparse
    )


def save_result(
    model: Any,
    out_dir: str | Path,
    *,
    report: CompressionReport,
    tokenizer: Any = None,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    fmt: str = "llmpress",
    sparse_format: str | None = None,
) -> Path:
    """Save a compression result in the right form: packed (quantized, or pruned with a
    sparse format), compressed-tensors, or an ordinary dense checkpoint."""
    if fmt == "compressed-tensors":
        from llmpress.format.compressed_tensors import save_compressed_tensors

        return save_compressed_tensors(
            model,
            out_dir,
            report=report,
            tokenizer=tokenizer,
            overwrite=overwrite,
            dtype=dtype or torch.float16,
        )
    if fmt != "llmpress":
        raise ValueError(f"unknown format {fmt!r}; use 'llmpress' or 'compressed-tensors'")
    state = saved_state(model, report)
    if state.quantized or state.transforms or sparse_format not in (None, "dense"):
        return save_quantized(
            model,
            out_dir,
            report=report,
            tokenizer=tokenizer,
            sparse=sparse_format or "auto",
            dtype=dtype or torch.float16,
            overwrite=overwrite,
        )
    return save_compressed(
        model, out_dir, tokenizer=tokenizer, report=report, dtype=dtype, overwrite=overwrite
    )
