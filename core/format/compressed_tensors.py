"""Export quantized models in the compressed-tensors layouts that vLLM and transformers (with
the ``compressed-tensors`` package) read natively.

Weight-only int4/int8 layers use ``pack-quantized``:
Per quantized layer ``name`` (weight [out, in], groups of ``group_size`` inputs):
``name.weight_packed`` int32 [out, ceil(in*bits/32)] (signed codes ``q`` stored as
``q + 2**(bits-1)`` in a little-endian bitstream: exactly llmpress's codes),
``name.weight_scale`` [out, n_groups] and ``name.weight_shape`` int64 [2]. Symmetric grids
only: asymmetric pack-quantized checkpoints do not load in transformers 5.x.

W8A8 layers carry their input scheme (``input_activations``: per token and dynamic, or per
tensor and static with ``name.input_scale`` [1]): INT8 as ``int-quantized`` (``name.weight``
int8 [out, in], ``name.weight_scale`` [out, 1]), FP8 as ``float-quantized`` (``name.weight``
float8_e4m3fn [out, in], ``name.weight_scale`` [out, 1]).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmpress.errors import LlmpressError
from llmpress.format.save import REPORT_FILE, atomic_directory, saved_state
from llmpress.model.report import CompressionReport
from llmpress.model.results import QuantState
from llmpress.quant.activations import FP8_DTYPE
from llmpress.quant.packing import pack_int32


def _scheme(q: QuantState) -> dict[str, Any]:
    per_channel = q.group_size == -1
    return {
        "num_bits": q.bits,
        "type": "float" if q.kind == "fp8" else "int",
        "symmetric": q.symmetric,
        "strategy": "channel" if per_channel else "group",
        "group_size": None if per_channel else q.group_size,
        "dynamic": False,
        "actorder": None,
        "observer": "minmax",
        "block_structure": None,
    }


def _input_scheme(q: QuantState) -> dict[str, Any] | None:
    if q.activations is None:
        return None
    dynamic = q.activations.endswith("-dynamic")
    return {
        "num_bits": 8,
        "type": "float" if q.activations.startswith("fp8") else "int",
        "symmetric": True,
        "strategy": "token" if dynamic else "tensor",
        "group_size": None,
        "dynamic": dynamic,
        "actorder": None,
        "observer": None if dynamic else "minmax",
        "block_structure": None,
    }


def _format(q: QuantState) -> str:
    if q.kind == "fp8":
        return "float-quantized"
    return "int-quantized" if q.activations is not None else "pack-quantized"


KV_CACHE_SCHEME = {
    "num_bits": 8,
    "type": "float",
    "symmetric": True,
    "strategy": "tensor",
    "group_size": None,
    "dynamic": False,
    "actorder": None,
    "observer": "minmax",
    "block_structure": None,
}


def compressed_tensors_config(
    quantized: dict[str, QuantState], kv_cache: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The ``quantization_config`` (one config group per distinct scheme)."""
    groups: dict[str, dict[str, Any]] = {}
    for name, q in sorted(quantized.items()):
        group: dict[str, Any] = {
            "targets": [],
            "weights": _scheme(q),
            "input_activations": _input_scheme(q),
            "output_activations": None,
            "format": _format(q),
        }
        key = json.dumps(group, sort_keys=True)
        groups.setdefault(key, group)["targets"].append(name)
    formats = {g["format"] for g in groups.values()}
    return {
        "quant_method": "compressed-tensors",
        "format": formats.pop() if len(formats) == 1 else "mixed-precision",
        "quantization_status": "compressed",
        "config_groups": {f"group_{i}": g for i, g in enumerate(groups.values())},
        "ignore": ["lm_head"],
        "kv_cache_scheme": None if kv_cache is None else KV_CACHE_SCHEME,
        "global_compression_ratio": None,
    }


def check_exportable(model: Any, quantized: dict[str, QuantState]) -> None:
    """Raise :class:`LlmpressError` unless every quantized layer fits compressed-tensors."""
    if not quantized:
        raise LlmpressError("compressed-tensors export needs a quantized model (add an rtn or gptq stage)")
    check_no_experts(model, quantized)
    for name, q in quantized.items():
        if q.bits not in (4, 8):
            raise LlmpressError(f"compressed-tensors export supports 4 and 8 bits; {name} has {q.bits}")
        if type(model.get_submodule(name)).__name__ == "Conv1D":
            raise LlmpressError(
                f"{name} is a GPT-2 style Conv1D, which transformers' compressed-tensors loader does not "
                f"replace (it would load random weights); use --format llmpress for this model"
            )
        if not q.symmetric:
            raise LlmpressError(
                f"{name} uses an asymmetric grid: transformers 5.x cannot load asymmetric compressed-tensors "
                f"pack-quantized checkpoints (it allocates the zero point unpacked while the decompressor "
                f"expects it packed); quantize with 'symmetric: true' for this export, or use --format llmpress"
            )


_PACKED_SUFFIXES = ("weight", "weight_scale", "weight_zero", "weight_meta", "weight_bitmask")


def check_no_experts(model: nn.Module, quantized: Iterable[str]) -> None:
    """Raise :class:`LlmpressError` if a layer of ``quantized`` (qualified names) is a
    mixture-of-experts expert projection: those cannot go into a compressed-tensors checkpoint
    that transformers loads (it keeps experts fused, 3-D, and quantizes only ``nn.Linear``)."""
    from llmpress.model.moe_model import fused_experts, unfused_experts

    experts = {
        **{n: type(model.get_submodule(n)).__name__ for n in fused_experts(model)},
        **{n: "UnfusedExperts" for n in unfused_experts(model)},
    }
    hit = sorted(q for q in quantized if any(q.startswith(e + ".") for e in experts))
    if hit:
        owner = next(e for e in experts if hit[0].startswith(e + "."))
        raise LlmpressError(
            f"{hit[0]} (and {len(hit) - 1} more) are mixture-of-experts expert projections: transformers keeps "
            f"these experts fused ({owner} is a {experts[owner]} with 3-D weights) and its compressed-tensors "
            f"loader only quantizes nn.Linear layers, so the checkpoint would not load; use --format llmpress "
            f"(packed experts load with `import llmpress`), or keep the experts out of the quantization stages "
            f"(ignore: ['.*experts.*'])"
        )


def compressed_tensors_state_dict(
    model: Any, quantized: dict[str, QuantState], dtype: torch.dtype, kv_cache: dict[str, Any] | None = None
) -> dict[str, torch.Tensor]:
    """The model's state dict with each quantized layer's ``weight`` replaced by its packed form."""
    sd: dict[str, torch.Tensor] = {}
    for unit in compressed_tensors_units(model, quantized, dtype, cast=False, kv_cache=kv_cache):
        sd.update(unit())
    return sd


def compressed_tensors_units(
    model: Any,
    quantized: dict[str, QuantState],
    dtype: torch.dtype,
    cast: bool = True,
    kv_cache: dict[str, Any] | None = None,
) -> list[Callable[[], dict[str, torch.Tensor]]]:
    """:func:`compressed_tensors_state_dict` lazily, one entry or packed layer per callable (for
    :func:`llmpress.format.shards.write_shards`); offloaded weights are read from their storage.
    ``cast``: floating tensors (but FP8 codes) to ``dtype``; a tied ``lm_head`` is left out;
    ``kv_cache``: the run's KV-cache scales (``CompressionState.kv_cache``), stored per attention."""
    check_exportable(model, quantized)
    mods = dict(model.named_modules())
    tied = cast and getattr(model.config, "tie_word_embeddings", False)
    units: list[Callable[[], dict[str, torch.Tensor]]] = []
    done: set[str] = set()
    for key, t in model.state_dict(keep_vars=True).items():
        owner, _, leaf = key.rpartition(".")
        if tied and key == "lm_head.weight":
            continue
        if owner in quantized and leaf in _PACKED_SUFFIXES:
            if owner not in done:  # dense weight, or llmpress's packed tensors: replaced once
                done.add(owner)
                units.append(functools.partial(_packed, owner, quantized[owner], dtype))
            continue
        units.append(functools.partial(_entry, mods, key, t, dtype if cast else None))
    for attn, (k, v) in ({} if kv_cache is None else kv_cache["scales"]).items():
        units.append(functools.partial(_kv_scales, attn, k, v, dtype))
    return units


def _entry(
    mods: dict[str, Any], key: str, t: torch.Tensor, dtype: torch.dtype | None
) -> dict[str, torch.Tensor]:
    from llmpress.model.offload import stored_tensor

    v = stored_tensor(mods, key) if t.device.type == "meta" else t.detach()
    if dtype is not None and v.is_floating_point() and v.dtype != FP8_DTYPE:
        v = v.to(dtype)
    return {key: v.contiguous().cpu()}


def _packed(name: str, q: QuantState, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    out_f, in_f = q.codes.shape
    codes = q.codes.to(torch.uint8)  # pruned weights hold the zero point's code
    sd: dict[str, torch.Tensor] = {}
    if q.kind == "fp8":
        sd[f"{name}.weight"] = codes.view(FP8_DTYPE)
    elif q.activations is not None:  # int-quantized: signed int8 values
        sd[f"{name}.weight"] = (codes.to(torch.int16) - 128).to(torch.int8)
    else:
        sd[f"{name}.weight_packed"] = pack_int32(codes, q.bits)
        sd[f"{name}.weight_shape"] = torch.tensor([out_f, in_f], dtype=torch.int64)
    sd[f"{name}.weight_scale"] = q.scales.to(dtype).contiguous()
    if q.input_scale is not None:
        sd[f"{name}.input_scale"] = q.input_scale.to(dtype).reshape(1).contiguous()
    return {k: v.contiguous().cpu() for k, v in sd.items()}


def _kv_scales(attn: str, k: float, v: float, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {
        f"{attn}.k_scale": torch.tensor([k], dtype=dtype),
        f"{attn}.v_scale": torch.tensor([v], dtype=dtype),
    }


def save_compressed_tensors(
    model: Any,
    out_dir: str | Path,
    *,
    report: CompressionReport,
    tokenizer: Any = None,
    dtype: torch.dtype = torch.float16,
    overwrite: bool = False,
) -> Path:
    """Write a compressed-tensors checkpoint (atomically). Pruned-only layers stay dense.
    ``report``: the run's :class:`llmpress.model.report.CompressionResult` (its ``state`` is what
    is saved, see :func:`llmpress.format.save.saved_state`) or a plain report."""
    from llmpress.format.shards import write_shards

    state = saved_state(model, report)
    quantized = state.quantized
    other = sorted(n for n, q in quantized.items() if q.kind not in ("int", "fp8"))
    if other:
        raise LlmpressError(
            f"compressed-tensors cannot store {quantized[other[0]].kind!r} layers ({other[0]}, ...): "
            f"save them in llmpress's own format"
        )
    units = compressed_tensors_units(model, quantized, dtype, kv_cache=state.kv_cache)
    with atomic_directory(out_dir, overwrite) as tmp:
        write_shards(tmp, units)  # streamed: one shard in memory at a time
        cfg = model.config.to_dict()
        cfg["quantization_config"] = compressed_tensors_config(quantized, state.kv_cache)
        cfg["dtype"] = str(dtype).replace("torch.", "")
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        report.write(tmp / REPORT_FILE)
    return Path(out_dir)
