"""Recipe-versus-export checks of the command line: before any work, whether a recipe's result
can be written in the requested format (the format layer itself knows nothing of recipes)."""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import nn

from llmpress.errors import LlmpressError
from llmpress.format.compressed_tensors import INT_KV_REFUSAL, check_no_experts, transform_config
from llmpress.recipe.config import MethodConfig, QuantConfig
from llmpress.recipe.recipes import ResolvedStage


def _quantizes_weights(config: MethodConfig) -> bool:
    """Whether a stage writes quantized weights (an integer grid, or FP8)."""
    return config.quantizes


def check_recipe_exportable(configs: Sequence[MethodConfig], kv_cache: str | None = None) -> None:
    """Raise :class:`LlmpressError` unless a recipe's result can be written as
    compressed-tensors (a weight quantization stage, symmetric, 4 or 8 bits; an FP8 KV cache or none)."""
    if kv_cache not in (None, "fp8"):
        raise LlmpressError(f"--format compressed-tensors with kv_cache: {kv_cache}: {INT_KV_REFUSAL}")
    if not any(_quantizes_weights(c) for c in configs):
        raise LlmpressError("--format compressed-tensors needs a quantized model: add an rtn or gptq stage")
    for c in configs:
        if not isinstance(c, QuantConfig):
            continue
        if c.bits not in (4, 8):
            raise LlmpressError(
                f"--format compressed-tensors supports 4 and 8 bits; the {c.method} stage asks {c.bits}"
            )
        if not c.symmetric:
            raise LlmpressError(
                f"--format compressed-tensors needs symmetric grids (transformers 5.x cannot load asymmetric "
                f"pack-quantized checkpoints); add 'symmetric: true' to the {c.method} stage, or use --format llmpress"
            )


def check_model_exportable(model: nn.Module, stages: Sequence[ResolvedStage]) -> None:
    """Raise :class:`LlmpressError` if a quantization stage of ``stages`` (resolved recipe
    stages) would reach mixture-of-experts expert projections, or a stage would add an online
    transform compressed-tensors cannot store (a Paley-based Hadamard)."""
    from llmpress.model.moe_model import expert_layer_names

    transform_config([t for st in stages for t in st.config.planned_transforms(model)])  # R4 it cannot store
    names = expert_layer_names(model)
    for st in stages:
        if not _quantizes_weights(st.config) or not names:
            continue
        hit = [n for n in names if st.stage.targets is None or any(re.search(p, n) for p in st.stage.targets)]
        hit = [n for n in hit if not any(re.search(p, n) for p in st.stage.ignore)]
        if hit:
            check_no_experts(model, hit)
