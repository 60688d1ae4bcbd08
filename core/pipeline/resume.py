"""Continue from an llmpress checkpoint: a loaded compressed model back to trainable layers.

A model loaded from the llmpress format computes with packed runtime modules
(:class:`llmpress.format.runtime.LlmpressLinear`). Before a recipe runs on such a model (a
distill-only recipe that recovers a model compressed earlier; a quantization stage after a saved
pruning), :func:`restore_checkpoint` swaps each packed layer for an ordinary ``nn.Linear`` holding
the dense weight it stands for, and gives back each layer's committed result (keep mask, integer
grid) from the stored tensors (:attr:`llmpress.format.formats.FormatSpec.restore`). The run then
starts from that state: recovery keeps the zeros and the grid exactly, and the result saves in
the same packed format again.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from llmpress.errors import ModelError, RecipeError
from llmpress.format.runtime import LlmpressLinear, replace_module
from llmpress.model.results import CompressionState, LayerResult
from llmpress.plugin_manager import Llmpress, get_plugin_manager
from llmpress.recipe.config import PruningConfig

log = logging.getLogger(__name__)


def _quantization_config(model: nn.Module) -> Any:  # noqa: ANN401 - transformers' config object
    return getattr(getattr(model, "config", None), "quantization_config", None)


def is_compressed_checkpoint(model: nn.Module) -> bool:
    """Whether ``model`` holds packed llmpress layers (it was loaded from an llmpress checkpoint)."""
    return any(isinstance(m, LlmpressLinear) for m in model.modules())


def _restored(name: str, mod: LlmpressLinear) -> LayerResult:
    spec = mod.fmt.spec
    if spec.restore is None:
        raise ModelError(
            f"{name} is stored as {mod.fmt.format!r}, which cannot be unpacked to continue compressing or "
            f"training; start from the uncompressed model"
        )
    return spec.restore(mod.fmt, {k: v.cpu() for k, v in mod.packed().items()})


def _pruned(recipe: Any, pm: Llmpress) -> bool:  # noqa: ANN401 - the stored recipe dict
    """Whether the checkpoint's recipe pruned weights (a stage of a pruning method)."""
    stages = recipe.get("stages", []) if isinstance(recipe, dict) else []
    for st in stages:
        try:
            cls = pm.method(str(st.get("method"))).config_cls if isinstance(st, dict) else None
        except RecipeError:  # a method this installation lacks: its zeros cannot be told apart
            log.warning("the checkpoint's recipe names method %r, which is not installed", st.get("method"))
            continue
        if cls is not None and issubclass(cls, PruningConfig):
            return True
    return False


def _dense(mod: LlmpressLinear, weight: torch.Tensor, dtype: torch.dtype) -> nn.Linear:
    lin = nn.Linear(
        mod.in_features, mod.out_features, bias=mod.bias is not None, device=weight.device, dtype=dtype
    )
    with torch.no_grad():
        lin.weight.copy_(weight)
        if mod.bias is not None:
            lin.bias.copy_(mod.bias)
    return lin


def restore_checkpoint(model: nn.Module, pm: Llmpress | None = None) -> CompressionState:
    """Replace every packed layer of ``model`` by a dense ``nn.Linear`` (in the model's dtype)
    and return the layers' committed results; the model no longer carries an llmpress
    ``quantization_config`` (what is saved afterwards comes from the new run's result).

    Sparse layers (``bitmask``, ``2:4``, ``int-2:4``) store their keep masks. An ``int`` layer
    of a pruned model stores a pruned weight as the zero point's code: when the checkpoint's
    recipe has a pruning stage, its exact zeros are taken as pruned.

    Raises :class:`ModelError`, before changing anything, for a layer whose format cannot go
    back (FP8 weights)."""
    packed = [(n, m) for n, m in model.named_modules() if isinstance(m, LlmpressLinear)]
    results = {n: _restored(n, m) for n, m in packed}  # all checked before any layer is replaced
    qc = _quantization_config(model)
    pruned = bool(packed) and _pruned(getattr(qc, "recipe", None), pm or get_plugin_manager())
    dtype = getattr(model, "dtype", torch.float32)
    for n, m in packed:  # one layer at a time, each decoded once
        weight = m.dequantized_weight(torch.float32)
        if pruned and results[n].mask is None:
            results[n].mask = (weight != 0).cpu()
        replace_module(model, n, _dense(m, weight, dtype))
    state = _state(results, qc)
    if qc is not None:
        delattr(getattr(model, "config"), "quantization_config")  # noqa: B009 - typed as a Module attribute
    for attr, value in (("hf_quantizer", None), ("quantization_method", None), ("is_quantized", False)):
        if getattr(model, attr, None):
            setattr(model, attr, value)
    log.info("continuing from an llmpress checkpoint: %d packed layers unpacked to dense", len(packed))
    return state


def _state(results: dict[str, LayerResult], qc: Any) -> CompressionState:  # noqa: ANN401
    """The state of the restored layers, with the checkpoint's KV-cache scales."""
    kept = getattr(qc, "state", None)
    kv = kept.kv_cache if isinstance(kept, CompressionState) else None
    return CompressionState(layers=dict(results), kv_cache=kv)
