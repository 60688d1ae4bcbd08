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
float8_e4m3fn [out, in], ``name.weight_scale`` [out, 1]). W4A8 and W4A4 layers are
``pack-quantized`` with ``input_activations`` of 8 or 4 bits, int, per token and dynamic (what
compressed-tensors' ``QuantizationArgs`` expresses; its reader fake-quantizes the inputs).
An integer KV cache (per token and head group, dynamic) has no compressed-tensors form: the
export refuses it (:data:`INT_KV_REFUSAL`).

Rotations (``method: rotate``): R1 and R2 are fused into the saved weights and need nothing at
run time. An online Hadamard (R4, before ``down_proj``) goes into ``transform_config``, which vLLM
applies: one scheme per transform, ``type: hadamard`` (compressed-tensors' deterministic Sylvester
matrix), ``location: input`` on the named layers, ``head_dim`` the block size of a block-diagonal
one, with its ``+-1`` matrix stored as ``name.<scheme>_input.weight`` as compressed-tensors saves
it. compressed-tensors has no Paley construction, so an online transform whose size is not a
power of two times its block (a Paley base, e.g. 384 = 12 * 32) is refused before any work, naming
``online_block_size`` as the fix.
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
from llmpress.format.transforms import OnlineTransform
from llmpress.model.report import CompressionReport
from llmpress.model.results import QuantState
from llmpress.quant.activations import FP8_DTYPE, activation_bits
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
        "num_bits": activation_bits(q.activations),
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
    return "int-quantized" if _int8_weights(q) else "pack-quantized"


def _int8_weights(q: QuantState) -> bool:
    """W8A8 INT8: weights stored unpacked as int8 (``int-quantized``); W4A8/W4A4 stay packed."""
    return q.kind != "fp8" and q.activations is not None and q.bits == 8


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


def transform_config(transforms: list[dict[str, Any]] | None) -> dict[str, Any] | None:
    """compressed-tensors' ``transform_config`` of the run's online transforms, or ``None``;
    :class:`LlmpressError` for one it cannot express (before any work)."""
    if not transforms:
        return None
    groups: dict[str, Any] = {}
    for i, raw in enumerate(transforms):
        t = OnlineTransform.model_validate(raw)
        if t.base != 1:
            raise LlmpressError(
                f"compressed-tensors cannot store the online {t.plan().describe()} ({t.role or 'online'} "
                f"rotation): its Hadamard transforms are Sylvester matrices (powers of two) and it has no "
                f"Paley construction; rotate with online_block_size set to a power of two dividing "
                f"{t.size}, or save with --format llmpress"
            )
        groups[_scheme_name(t, i)] = {
            "type": "hadamard",
            "apply": [{"targets": list(t.modules), "location": "input", "inverse": False, "ignore": []}],
            "randomize": False,
            "requires_grad": False,
            "head_dim": None if t.block_size == t.size else t.block_size,
            "precision": "float32",
        }
    return {"config_groups": groups}


def _scheme_name(t: OnlineTransform, i: int) -> str:
    return t.role or f"T{i}"


def _transform_weights(
    transforms: list[dict[str, Any]] | None,
) -> list[Callable[[], dict[str, torch.Tensor]]]:
    """The ``+-1`` matrix of every online transform, per layer, named as compressed-tensors saves it."""
    units: list[Callable[[], dict[str, torch.Tensor]]] = []
    for i, raw in enumerate(transforms or []):
        t = OnlineTransform.model_validate(raw)
        for name in t.modules:
            key = f"{name}.{_scheme_name(t, i)}_input.weight"
            units.append(functools.partial(_hadamard_weight, key, t.block_size))
    return units


def _hadamard_weight(key: str, size: int) -> dict[str, torch.Tensor]:
    from llmpress.math.hadamard import sylvester

    return {key: sylvester(size, torch.float32)}


#: why an integer KV cache has no compressed-tensors form
INT_KV_REFUSAL = (
    "compressed-tensors' kv_cache_scheme has one static scale per tensor (or per head), calibrated and stored; "
    "llmpress's integer KV cache is rounded per token and head group at run time, which it cannot express: use "
    "--format llmpress, or kv_cache: fp8"
)


def check_exportable(
    model: Any, quantized: dict[str, QuantState], kv_cache: dict[str, Any] | None = None
) -> None:
    """Raise :class:`LlmpressError` unless every quantized layer (and the KV cache) fits
    compressed-tensors."""
    if not quantized:
        raise LlmpressError("compressed-tensors export needs a quantized model (add an rtn or gptq stage)")
    if kv_cache is not None and kv_cache.get("dtype") != "float8_e4m3fn":
        raise LlmpressError(f"kv_cache {kv_cache.get('dtype')}: {INT_KV_REFUSAL}")
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
    check_exportable(model, quantized, kv_cache)
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
    elif _int8_weights(q):  # int-quantized: signed int8 values
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
    transforms = transform_config(state.transforms)  # refused here, before any work, if inexpressible

    other = sorted(n for n, q in quantized.items() if q.kind not in ("int", "fp8"))
    if other:
        raise LlmpressError(
            f"compressed-tensors cannot store {quantized[other[0]].kind!r} layers ({other[0]}, ...): "
            f"save them in llmpress's own format"
        )
    units = compressed_tensors_units(model, quantized, dtype, kv_cache=state.kv_cache)
    units += _transform_weights(state.transforms)
    with atomic_directory(out_dir, overwrite) as tmp:
        write_shards(tmp, units)  # streamed: one shard in memory at a time
        cfg = model.config.to_dict()
        cfg["quantization_config"] = compressed_tensors_config(quantized, state.kv_cache)
        if transforms is not None:
            cfg["quantization_config"]["transform_config"] = transforms
        cfg["dtype"] = str(dtype).replace("torch.", "")
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        report.write(tmp / REPORT_FILE)
    return Path(out_dir)
