"""The llmpress hook contract: every hook a plugin may implement.

A plugin is a module (or object) holding functions decorated with ``@llmpress.hookimpl``
whose names match the specs below. Plugins implement only the hooks they need.

**Dispatch by config type.** A plugin registers its methods (config classes) with
``llmpress_register_methods``. The per-method hooks (score, mask, update, block change) of
a plugin that registered methods are called only with configs of *its own* methods, so an
implementation never checks the config's type. Plugins that register no method (the
built-in ``masking`` defaults, say) are *general*: they are called for every method, after
the method's own plugin when marked ``trylast``.

For every target layer of a method of the default per-layer kind the engine calls, without touching
the model::

    score  = llmpress_score_importance(module, stats, config)
    keep   = llmpress_select_mask(scores=score, target, config)  # if score is not None
    result = llmpress_update_weights(module, mask=keep, stats, config)
    result = llmpress_refine_mask(module, result, stats, config)  # if config.refines_mask()

and then commits ``result`` (a :class:`llmpress.model.results.LayerResult`). For a
block-level method (a :class:`llmpress.structure.block_stage.BlockMethodConfig`) it calls
``llmpress_change_block`` once per block and applies the returned change. Plugins register
the kernels that run stored layers with ``llmpress_register_kernels``, keyed by the formats
each kernel declares. A stage with an ``allocation:`` section asks
``llmpress_search_allocation`` for the level of every unit under the stage's budget.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    import torch
    from torch import nn

    from llmpress.allocation.problem import AllocationProblem, AllocationResult
    from llmpress.engine.stats import LayerStats
    from llmpress.kernels.registry import KernelRegistrar
    from llmpress.math.targets import SparsityTarget
    from llmpress.model.results import LayerResult
    from llmpress.recipe.config import MethodConfig
    from llmpress.structure.blocks import BlockChange, BlockContext, BlockScore

PROJECT = "llmpress"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def llmpress_register_methods(register: Callable[..., None]) -> None:
    """Register the compression methods this plugin provides.

    Called once when the plugin manager is built. Call ``register(config_cls)`` (or
    ``register(name, config_cls)``) for each method: the name, ``config_cls.method``, is
    what a recipe's ``method:`` key says; ``config_cls`` is a frozen
    :class:`llmpress.recipe.config.MethodConfig` subclass whose fields are the method's options and
    whose class variables declare what the engine needs (statistics, stage kind, citation).
    The config class is the dispatch key: this plugin's per-method hooks receive only its
    configs. Registering a name twice (from any plugin) is an error. Not ``firstresult``;
    the return value is ignored.
    """


@hookspec(firstresult=True)
def llmpress_score_importance(
    module: nn.Module, stats: LayerStats | None, config: MethodConfig
) -> torch.Tensor | None:
    """Score the importance of ``module``'s weights; higher means more important.

    :param module: the target layer (``nn.Linear`` or GPT-2 ``Conv1D``); read its weight
        as ``[out_features, in_features]`` with :func:`llmpress.model.modules.get_weight`.
    :param stats: the statistics of the layer's input that ``config.stats`` asked for, or
        ``None`` when the stage needs no calibration data (``config.needs_calibration``).
    :param config: the stage's method config (always one of this plugin's methods).
    :returns: a float tensor of per-weight scores ``[out, in]``, or ``None`` when the method
        selects its mask inside the weight update (SparseGPT) or prunes nothing
        (quantization).

    ``firstresult``: the first non-``None`` answer wins.
    """


@hookspec(firstresult=True)
def llmpress_select_mask(
    scores: torch.Tensor, target: SparsityTarget, config: MethodConfig
) -> torch.Tensor | None:
    """Choose which weights to keep from their scores.

    :param scores: the tensor returned by ``llmpress_score_importance``.
    :param target: ``config.sparsity_target()``: sparsity level, pattern (unstructured or
        ``N:M``) and comparison group (per output row or the whole layer).
    :param config: the stage's method config.
    :returns: a boolean *keep* mask of the same shape as ``scores`` (``True`` = kept), or
        ``None`` to leave it to the next plugin. The built-in ``masking`` plugin answers
        last for every method: smallest scores pruned, ties broken by a stable sort (lower
        index pruned first).

    ``firstresult``.
    """


@hookspec(firstresult=True)
def llmpress_update_weights(
    module: nn.Module,
    mask: torch.Tensor | None,
    stats: LayerStats | None,
    config: MethodConfig,
) -> LayerResult | None:
    """Compute the layer's compressed state, without writing the model.

    :param module: the target layer; it must not be modified.
    :param mask: the keep mask from ``llmpress_select_mask``, or the mask accumulated by
        earlier stages (weights they pruned must stay zero), or ``None``.
    :param stats: the statistics ``config.stats`` asked for (``None`` without calibration).
    :param config: the stage's method config.
    :returns: a :class:`llmpress.model.results.LayerResult`: the new weight (or ``None`` to keep
        it), the keep mask, the quantization state, the reconstruction loss; or ``None`` to
        leave it to the next plugin. The built-in ``masking`` plugin answers last when a
        mask is given (a result that only carries the mask).

    The engine commits the result: writes the weight with the accumulated mask applied and
    records the result for saving. ``firstresult``.
    """


@hookspec(firstresult=True)
def llmpress_refine_mask(
    module: nn.Module, result: LayerResult, stats: LayerStats | None, config: MethodConfig
) -> LayerResult | None:
    """Refine a layer's keep mask after the method's mask selection and weight update.

    Called by the engine (:func:`llmpress.engine.solve.solve_layer`) for every target layer
    of a stage whose config says ``config.refines_mask()`` (a pruning stage with a ``dsnot:``
    section), right after ``llmpress_update_weights``: so it runs wherever a layer's result
    is made, in a per-layer stage and for every level of an allocation's level database.
    Refiners are general plugins (they register no method) and read their options from the
    config.

    :param module: the target layer, unchanged (its weight is the dense weight ``W0``).
    :param result: the method's :class:`llmpress.model.results.LayerResult`; its ``mask``
        (``[out, in]`` bool, ``True`` = kept) is what to refine, its ``weight`` (``None``:
        the dense weight) the values the kept weights take.
    :param stats: the statistics ``config.statistics()`` asked for (with a refinement the
        config adds what the refiner needs, e.g. ``mean_var`` and ``sq_norms`` for DSnoT).
    :param config: the stage's method config.
    :returns: a new :class:`~llmpress.model.results.LayerResult` with the refined mask, the
        same number of kept weights in every output row (and in every ``N:M`` group), and a
        weight that is zero where pruned; or ``None`` to leave the result as it is.

    ``firstresult``.
    """


@hookspec(firstresult=True)
def llmpress_change_block(
    block: BlockContext, config: MethodConfig
) -> BlockChange | Sequence[BlockChange] | None:
    """Compute a change spanning several modules of one block (a block-level method).

    :param block: the block (its module, index, qualified name, the model's config), the
        statistics ``config.stats`` asked for, for every linear layer of the block by its
        name relative to the block, and its calibration inputs (``block.inputs``, with
        ``run(i)``: the block's output on batch ``i``).
    :param config: the stage's method config.
    :returns: one change or a sequence of changes for the core to apply
        (:mod:`llmpress.structure.blocks`): :class:`~llmpress.structure.blocks.PruneChannels` (heads or neurons
        removed across coupled modules; shapes change), :class:`~llmpress.structure.blocks.ScaleChannels`
        (scales moved from a norm or linear into the following linears),
        :class:`~llmpress.structure.blocks.DropSubBlocks` or :class:`~llmpress.structure.blocks.SetWeights`
        (new weights, same shapes); ``None`` or an empty sequence to leave the
        block as it is. The block must not be modified by the hook.

    ``firstresult``.
    """


@hookspec(firstresult=True)
def llmpress_score_block(block: BlockContext, config: MethodConfig) -> BlockScore | None:
    """Score one block for a decision across blocks (``config.plans_globally()``).

    Called in a planning pass over every block of the *unchanged* model (statistics from
    its own activations) before the block pass. The answers, one per block in order, reach
    ``llmpress_change_block`` as ``block.scores``, so a method can allocate a global budget
    (FLAP's widths per layer) before changing the first block.

    :param block: as for ``llmpress_change_block`` (``block.scores`` is empty here).
    :param config: the stage's method config.
    :returns: a :class:`llmpress.structure.blocks.BlockScore` (a subclass the method's
        ``llmpress_change_block`` and ``BlockMethodConfig.decide`` read back), or ``None``.
        The block must not be modified. ``firstresult``.
    """


@hookspec(firstresult=True)
def llmpress_search_allocation(problem: AllocationProblem, config: MethodConfig) -> AllocationResult | None:
    """Choose a compression level for every unit of a stage under its global budget.

    :param problem: the typed :class:`llmpress.allocation.problem.AllocationProblem`: the units
        (layers, blocks or sub-blocks), each unit's level values and integer costs, the uniform
        start, the exact budget, and ``fitness(levels, tokens)`` (KL divergence to the dense
        model, lower is better), which stitches a candidate from the level database.
    :param config: the stage's ``allocation:`` config (an
        :class:`llmpress.allocation.problem.AllocationConfig` of this plugin's own method).
    :returns: an :class:`llmpress.allocation.problem.AllocationResult`: one level index per unit whose
        costs sum to exactly the budget (the core checks it), plus the fitness curve and the
        number of fitness evaluations; or ``None`` to leave it to the next plugin.

    ``firstresult``.
    """


@hookspec
def llmpress_register_kernels(register: KernelRegistrar) -> None:
    """Register the kernels this plugin provides for running stored (packed) layers.

    Called once when the plugin manager is built. Call ``register(kernel)`` for each
    :class:`llmpress.kernels.registry.Kernel`: the kernel declares the formats it runs (names of
    the format registry, :data:`llmpress.format.formats.FORMATS`), the device types
    (``kernel.devices``) and a finer ``supports(fmt, device)`` check, so the plugin needs no
    guard on a format name or device. The manager keys kernels by format;
    :meth:`llmpress.plugin_manager.Llmpress.kernels_for` returns the candidates for a layer and
    the runtime picks the one the user asked for (``LLMPRESS_KERNEL``) or else the one with the
    highest ``priority``. An unknown format name or a kernel registered twice for a format is an
    error. Not ``firstresult``; the return value is ignored.
    """
