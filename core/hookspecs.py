"""The llmpress hook contract: every hook a plugin may implement.

A plugin is a module (or object) holding functions decorated with ``@llmpress.hookimpl``
whose names match the specs below. Plugins implement only the hooks they need. The
pipeline calls them in this order for every target module of a block:

    score = llmpress_score_importance(module, stats, config)
    keep  = llmpress_select_mask(scores=score, target, config)   # skipped when score is None
    new   = llmpress_update_weights(module, mask=keep, stats, config)

Methods are dispatched by the config object: every ``firstresult`` hook must return
``None`` for a config that is not its own (``isinstance`` check on its config class), so
the first plugin that recognises the config answers. Default behaviours (mask selection by
score, applying a mask) are ordinary built-in plugins marked ``trylast`` so any plugin can
override them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import torch
    from torch import nn

    from llmpress.config import MethodConfig
    from llmpress.stats import LayerStats
    from llmpress.targets import SparsityTarget
    from llmpress.update import UpdateResult

PROJECT = "llmpress"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def llmpress_register_methods(register: Callable[[str, type[MethodConfig]], None]) -> None:
    """Register the compression methods this plugin provides.

    Called once when the plugin manager is built. Call ``register(name, config_cls)`` for
    each method: ``name`` is what a recipe's ``method:`` key says, ``config_cls`` a frozen
    :class:`llmpress.config.MethodConfig` subclass whose fields are the method's options.
    Registering a name twice (from any plugin) is an error. Not ``firstresult``; the return
    value is ignored.
    """


@hookspec(firstresult=True)
def llmpress_method_citation(method: str) -> str | None:
    """BibTeX entry (or entries) to cite when ``method`` was used.

    :param method: a registered method name.
    :returns: a BibTeX string if this plugin provides ``method``, else ``None``. Model cards
        cite every method of a recipe through this hook.

    ``firstresult``.
    """


@hookspec(firstresult=True)
def llmpress_score_importance(
    module: nn.Module, stats: LayerStats | None, config: MethodConfig
) -> torch.Tensor | None:
    """Score the importance of ``module``'s weights; higher means more important.

    :param module: the target layer (``nn.Linear`` or GPT-2 ``Conv1D``); read its weight
        as ``[out_features, in_features]`` with :func:`llmpress.modules.get_weight`.
    :param stats: calibration statistics of the layer's input (``X^T X``, column norms), or
        ``None`` when the stage needs no calibration data (``config.needs_calibration``).
    :param config: the stage's method config.
    :returns: a float tensor of scores. Its shape says the granularity: ``[out, in]`` per
        weight, ``[out]`` per output channel, ``[in]`` per input channel; or ``None`` when
        the config is not this plugin's, or when the method selects its mask inside the
        weight update (SparseGPT's adaptive selection).

    ``firstresult``: the first non-``None`` answer wins.
    """


@hookspec(firstresult=True)
def llmpress_select_mask(
    scores: torch.Tensor, target: SparsityTarget, config: MethodConfig
) -> torch.Tensor | None:
    """Choose which weights to keep from their scores.

    :param scores: the tensor returned by ``llmpress_score_importance``.
    :param target: sparsity level and pattern (unstructured or ``N:M``) and the comparison
        group (per output row or the whole layer).
    :param config: the stage's method config.
    :returns: a boolean *keep* mask of the same shape as ``scores`` (``True`` = kept), or
        ``None`` if this plugin does not handle the config. The built-in ``masking`` plugin
        answers for every config (``trylast``): smallest scores pruned, ties broken by a
        stable sort (lower index pruned first).

    ``firstresult``.
    """


@hookspec(firstresult=True)
def llmpress_update_weights(
    module: nn.Module,
    mask: torch.Tensor | None,
    stats: LayerStats | None,
    config: MethodConfig,
) -> torch.Tensor | UpdateResult | None:
    """Compute the layer's new weights.

    :param module: the target layer; its weight is untouched until the pipeline writes
        the returned value back.
    :param mask: the keep mask from ``llmpress_select_mask``, or ``None`` when the method
        selects its own mask here (SparseGPT) or prunes nothing (quantization).
    :param stats: calibration statistics of the layer's input (``None`` without calibration).
    :param config: the stage's method config.
    :returns: a ``[out, in]`` weight tensor, or an :class:`llmpress.update.UpdateResult`
        carrying the weight plus its keep mask and quantization state; ``None`` if the config
        is not this plugin's. The built-in ``masking`` plugin answers last for any config
        with a mask by zeroing the pruned weights (magnitude, Wanda).

    Weights that a previous stage pruned (exact zeros recorded in the module's mask) must
    stay zero: the pipeline re-applies the accumulated mask after every update.

    ``firstresult``.
    """


@hookspec(firstresult=True)
def llmpress_search_allocation(problem: Any, config: MethodConfig) -> dict[str, Any] | None:
    """Choose a compression level per layer under a global budget.

    :param problem: an allocation problem: the layer names, a *level database* (for each
        layer, compressed variants at several levels with their cost in parameters, bits or
        latency) and a fitness callable (perplexity or KL divergence to the dense model on
        calibration tokens) that scores a candidate assignment.
    :param config: the search method's config (uniform, OWL, EvoPress, greedy depth).
    :returns: ``{layer_name: level}`` for every layer in the problem, or ``None`` if the
        config is not this plugin's. The pipeline stitches the chosen variants together.

    ``firstresult``.
    """


@hookspec(firstresult=True)
def llmpress_export_kernel(module: nn.Module, packed: dict[str, Any], target: str) -> Any | None:
    """Turn a compressed layer into a runtime module for a deployment target.

    :param module: the compressed layer (weights already updated).
    :param packed: its compressed state: keep mask, quantization codes, scales, zeros,
        group index, low-rank factors, as produced by the weight-update stage.
    :param target: the packing target, e.g. ``"dense"``, ``"bitmask"``, ``"2:4"``,
        ``"int4"``, ``"int8"``, ``"lowrank"``.
    :returns: an object holding the runtime ``nn.Module``, the tensors to serialize and the
        per-module ``quantization_config`` entry; ``None`` if this plugin cannot export that
        target (the next plugin is asked).

    ``firstresult``.
    """
