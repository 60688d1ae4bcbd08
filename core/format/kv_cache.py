"""Quantized KV cache: FP8 with calibrated per-layer scales, or INT8/INT4 per token and head group.

Keys (after RoPE) and values are what the cache holds. With one static scale per layer
(``s_k = max|K| / 448`` over the calibration tokens, likewise ``s_v``) rounding them onto the
FP8 grid when they are stored or when they are read gives the same numbers, so the runtime
rounds them inside attention: the attention implementation ``llmpress_fp8kv`` (registered with
transformers' ``AttentionInterface``) wraps the model's own (sdpa, eager, ...) and reads the
scales from the attention module's ``k_scale``/``v_scale`` buffers (the names vLLM reads).

The integer caches (``kv_cache: int8`` or ``int4``) need no calibration: each token's key and
value heads are rounded symmetrically with one dynamic scale per group of ``group_size``
channels (default: the head dimension, one scale per head and token;
:func:`llmpress.quant.activations.fake_quantize_groups`). Rounding an already rounded token
again gives the same numbers, so the same wrapper simulates them exactly; the attention module
holds ``(bits, group_size)`` in ``_llmpress_kv_int``.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from llmpress.errors import ModelError
from llmpress.quant.activations import FP8_DTYPE, FP8_MAX, fake_quantize_groups

log = logging.getLogger(__name__)

ATTN_IMPL = "llmpress_fp8kv"
_BASE = "_llmpress_kv_base"
_OBSERVE = "_llmpress_kv_observe"
_INT = "_llmpress_kv_int"
#: the integer KV caches and their bits
INT_KV_BITS = {"int8": 8, "int4": 4}


def attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Attention modules (those with a ``layer_idx`` and ``k_proj``/``v_proj``) by name."""
    return {
        n: m
        for n, m in model.named_modules()
        if hasattr(m, "layer_idx") and hasattr(m, "k_proj") and hasattr(m, "v_proj")
    }


def fp8_round(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x`` on the E4M3 grid of ``scale`` (saturating), in ``x``'s dtype."""
    s = scale.to(device=x.device, dtype=torch.float32)
    return (torch.clamp(x.float() / s, -FP8_MAX, FP8_MAX).to(FP8_DTYPE).float() * s).to(x.dtype)


def _base_attention(module: nn.Module) -> Callable[..., Any]:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    name = getattr(module, _BASE, "sdpa")
    if name in ALL_ATTENTION_FUNCTIONS:
        return ALL_ATTENTION_FUNCTIONS[name]
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if eager is None:
        raise RuntimeError(f"{type(module).__name__}: no attention implementation {name!r} to wrap")
    return eager


def fp8kv_attention(
    module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any, **kwargs: Any
) -> Any:
    """The model's attention with keys and values rounded to FP8 or to the integer grid (or
    observed, when calibrating FP8 scales)."""
    observe = getattr(module, _OBSERVE, None)
    if observe is not None:
        observe[0] = max(observe[0], float(key.detach().abs().amax()))
        observe[1] = max(observe[1], float(value.detach().abs().amax()))
    elif getattr(module, _INT, None) is not None:
        bits, group = getattr(module, _INT)
        key = fake_quantize_groups(key, bits, group)
        value = fake_quantize_groups(value, bits, group)
    elif isinstance(getattr(module, "k_scale", None), torch.Tensor):
        key = fp8_round(key, module.get_buffer("k_scale"))
        value = fp8_round(value, module.get_buffer("v_scale"))
    return _base_attention(module)(module, query, key, value, *args, **kwargs)


def register_attention() -> None:
    """Make ``llmpress_fp8kv`` known to transformers (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPL, fp8kv_attention)


def _configs(model: nn.Module) -> list[Any]:
    seen: dict[int, Any] = {}
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation"):
            seen.setdefault(id(cfg), cfg)
    return list(seen.values())


def _use_wrapper(model: nn.Module, attns: Iterable[nn.Module]) -> None:
    register_attention()
    base = getattr(model.config, "_attn_implementation", None) or "sdpa"
    if base == ATTN_IMPL:
        base = getattr(next(iter(attns), None), _BASE, "sdpa")
    for m in attns:
        setattr(m, _BASE, base)
    for cfg in _configs(model):
        cfg._attn_implementation = ATTN_IMPL


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable[torch.Tensor]) -> dict[str, tuple[float, float]]:
    """``{attention module: (k_scale, v_scale)}`` from the max ``|K|``/``|V|`` seen on ``batches``."""
    attns = attention_modules(model)
    if not attns:
        raise RuntimeError("kv_cache: fp8 found no attention modules with k_proj/v_proj in this model")
    saved = {id(c): c._attn_implementation for c in _configs(model)}
    _use_wrapper(model, attns.values())
    for m in attns.values():
        setattr(m, _OBSERVE, [0.0, 0.0])
    try:
        dev = next(model.parameters()).device
        for ids in batches:
            model(input_ids=ids.to(dev), use_cache=False)
        maxima = {n: tuple(getattr(m, _OBSERVE)) for n, m in attns.items()}
    finally:
        for m in attns.values():
            delattr(m, _OBSERVE)
        for c in _configs(model):
            c._attn_implementation = saved.get(id(c), c._attn_implementation)
    return {n: (max(k, 1e-12) / FP8_MAX, max(v, 1e-12) / FP8_MAX) for n, (k, v) in maxima.items()}


def enable(model: nn.Module, scales: dict[str, tuple[float, float]]) -> None:
    """Give each attention module its scales and make the model round its KV cache to FP8."""
    attns = attention_modules(model)
    missing = set(attns) - set(scales)
    if missing:
        raise ValueError(f"kv_cache scales are missing for {sorted(missing)[:3]}")
    for name, m in attns.items():
        k_proj = m.get_submodule("k_proj")
        dev = next(iter([*k_proj.parameters(), *k_proj.buffers()])).device
        k, v = scales[name]
        m.register_buffer("k_scale", torch.tensor([k], dtype=torch.float32, device=dev), persistent=False)
        m.register_buffer("v_scale", torch.tensor([v], dtype=torch.float32, device=dev), persistent=False)
    _use_wrapper(model, attns.values())
    log.info("FP8 KV cache on %d attention layers", len(attns))


def head_dim(module: nn.Module) -> int:
    """The head dimension of an attention module (its ``head_dim``, else from its config)."""
    hd = getattr(module, "head_dim", None)
    if isinstance(hd, int):
        return hd
    cfg = getattr(module, "config", None)
    hd = getattr(cfg, "head_dim", None)
    if isinstance(hd, int):
        return hd
    return int(cfg.hidden_size // cfg.num_attention_heads)  # type: ignore[union-attr]


def check_int(model: nn.Module, kv_type: str, group_size: int | None) -> None:
    """Before any work: the model has attention modules and ``group_size`` divides their head
    dimension; :class:`ModelError` naming the fix otherwise."""
    attns = attention_modules(model)
    if not attns:
        raise ModelError(f"kv_cache: {kv_type} found no attention modules with k_proj/v_proj in this model")
    if group_size is None:
        return
    for name, m in attns.items():
        d = head_dim(m)
        if d % group_size:
            divisors = [g for g in (16, 32, 64, 128) if d % g == 0 and g <= d]
            raise ModelError(
                f"kv_cache: {kv_type} group_size {group_size} does not divide the head dimension {d} of {name}; "
                f"use a divisor such as {divisors or [d]} or leave group_size out (one scale per head)"
            )


def enable_int(model: nn.Module, kv_type: str, group_size: int | None = None) -> None:
    """Make the model round its keys and values to ``kv_type`` (``int8``/``int4``) per token
    and group of ``group_size`` channels (``None``: the head dimension)."""
    if kv_type not in INT_KV_BITS:
        raise ValueError(f"integer KV cache must be one of {sorted(INT_KV_BITS)}, got {kv_type!r}")
    check_int(model, kv_type, group_size)
    attns = attention_modules(model)
    for m in attns.values():
        setattr(m, _INT, (INT_KV_BITS[kv_type], group_size))
    _use_wrapper(model, attns.values())
    log.info(
        "%s KV cache (group %s) on %d attention layers", kv_type.upper(), group_size or "head", len(attns)
    )


def enable_state(model: nn.Module, state: dict[str, Any]) -> None:
    """Switch on the KV cache a run recorded (``CompressionState.kv_cache``, or a checkpoint's
    ``quantization_config.kv_cache``)."""
    if state["dtype"] in INT_KV_BITS:
        enable_int(model, state["dtype"], state.get("group_size"))
    else:
        enable(model, {n: (k, v) for n, (k, v) in state["scales"].items()})
