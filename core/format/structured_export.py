"""Saving structurally pruned models: a standard config when every block has the same shape,
else per-layer shapes (and attention attributes) for the llmpress quantizer.

:func:`export_plan` compares the model with skeletons built from its config (on the meta
device). When one set of config values (``num_attention_heads``, ``num_key_value_heads``,
``head_dim``, ``intermediate_size``/``ffn_dim``, ``attention_bias``/``mlp_bias``) rebuilds
every layer exactly, those values are the plan, and plain transformers loads the checkpoint
with no llmpress import (a bias the skeleton has but the model lacks is saved as zeros). Else
the resized layers go into ``quantization_config`` as ``dense`` entries and the attention
modules' head counts as ``attributes``.

transformers' per-layer ``per_layer_config`` (``integrations/heterogeneity``) does not help
here: Llama-family modeling code builds every layer from the global config, and reading a
per-layer attribute from a heterogeneous global config raises.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig

from llmpress.model.modules import find_blocks, get_weight, is_linear
from llmpress.model.structures import HEAD_ATTRIBUTES, discover

log = logging.getLogger(__name__)

_WIDTH_KEYS = ("intermediate_size", "ffn_dim", "n_inner")


@dataclasses.dataclass(frozen=True)
class ExportPlan:
    """``config``: values to set on the saved config; ``zero_biases``: name -> size of biases
    to save as zeros; ``attributes``: module -> attribute values to restore at load."""

    config: dict[str, Any] = dataclasses.field(default_factory=dict)
    zero_biases: dict[str, int] = dataclasses.field(default_factory=dict)
    attributes: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)

    def zero_tensors(self, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
        return {
            f"{n}.bias": torch.zeros(k, dtype=dtype or torch.float32) for n, k in self.zero_biases.items()
        }


def _skeleton(model: nn.Module, config: Any) -> nn.Module | None:
    try:
        with torch.device("meta"):
            return type(model)(config)
    except Exception as e:  # noqa: BLE001 - a config the class cannot build
        log.debug("cannot build %s from the config (%s)", type(model).__name__, e)
        return None


def _linears(model: nn.Module) -> dict[str, tuple[tuple[int, int], bool]]:
    return {
        n: (tuple(get_weight(m).shape), isinstance(getattr(m, "bias", None), torch.Tensor))  # type: ignore[misc]
        for n, m in model.named_modules()
        if is_linear(m)
    }


def _head_attrs(model: nn.Module) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for n, m in model.named_modules():
        vals = {a: getattr(m, a) for a in HEAD_ATTRIBUTES if isinstance(getattr(m, a, None), int)}
        if vals:
            out[n] = vals
    return out


def _matches(model: nn.Module, skel: nn.Module) -> tuple[bool, dict[str, int]]:
    """Whether ``skel`` has every linear of ``model`` with its shape (and a bias where the
    model has one) and the same head attributes; the biases only the skeleton has."""
    have, want = _linears(model), _linears(skel)
    if set(have) != set(want) or _head_attrs(model) != _head_attrs(skel):
        return False, {}
    zeros: dict[str, int] = {}
    for n, (shape, bias) in have.items():
        s_shape, s_bias = want[n]
        if shape != s_shape or (bias and not s_bias):
            return False, {}
        if s_bias and not bias:
            zeros[n] = shape[0]
    return True, zeros


def _uniform_config(model: nn.Module, config: PretrainedConfig) -> dict[str, Any] | None:
    """Config values describing every block's heads and MLP width, if all blocks agree."""
    _, blocks = find_blocks(model)
    hidden = getattr(config, "hidden_size", None)
    if not isinstance(hidden, int):
        return None
    shapes = set()
    biased = {"attention": False, "mlp": False}
    for b in blocks:
        s = discover(b, config, hidden)
        if len(s.neurons) > 1:  # experts: their width is not one config value
            return None
        h, n = s.heads, (s.neurons[0] if s.neurons else None)
        shapes.add(
            (
                None if h is None else (h.n_heads, h.n_kv, h.head_dim),
                None if n is None else n.width,
            )
        )
        for kind, rels in (
            ("attention", [] if h is None else [*h.q, *h.kv, h.o]),
            ("mlp", [] if n is None else [*n.producers, n.consumer]),
        ):
            biased[kind] |= any(
                isinstance(getattr(b.get_submodule(r), "bias", None), torch.Tensor) for r in rels
            )
    if len(shapes) != 1:
        return None
    heads, width = shapes.pop()
    out: dict[str, Any] = {}
    if heads is not None:
        out.update(num_attention_heads=heads[0], num_key_value_heads=heads[1], head_dim=heads[2])
    if width is not None:
        key = next((k for k in _WIDTH_KEYS if isinstance(getattr(config, k, None), int)), None)
        if key is None:
            return None
        out[key] = width
    for kind, key in (("attention", "attention_bias"), ("mlp", "mlp_bias")):
        if biased[kind] and hasattr(config, key):
            out[key] = True
    return out


def export_plan(model: nn.Module) -> ExportPlan:
    """How to save ``model``'s structure (an empty plan when its config already builds it)."""
    config = getattr(model, "config", None)
    if config is None:
        return ExportPlan()
    skel = _skeleton(model, config)
    if skel is None or _matches(model, skel)[0]:
        return ExportPlan()
    try:
        values = _uniform_config(model, config)
    except Exception as e:  # noqa: BLE001 - no discoverable structure: per-layer entries
        log.debug("no uniform config for %s (%s)", type(model).__name__, e)
        values = None
    if values:
        cfg = copy.deepcopy(config)
        for k, v in values.items():
            setattr(cfg, k, v)
        uskel = _skeleton(model, cfg)
        if uskel is not None:
            ok, zeros = _matches(model, uskel)
            if ok:
                log.info("uniform structure: saving a standard config with %s", values)
                return ExportPlan(config=values, zero_biases=zeros)
    base = _head_attrs(skel)
    attrs = {n: v for n, v in _head_attrs(model).items() if base.get(n) != v}
    return ExportPlan(attributes=attrs)
