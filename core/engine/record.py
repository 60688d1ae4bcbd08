"""The record of one run: what every stage committed and reported, held by the runner.

Nothing is stored on the caller's model: stages write their committed per-layer results into
:attr:`RunRecord.state` and their report entries here, and the pipeline hands both back to the
caller in a :class:`llmpress.model.report.CompressionResult`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from llmpress.model.modules import get_weight
from llmpress.model.report import ModuleReport
from llmpress.model.results import CompressionState, LayerResult, commit


@dataclasses.dataclass
class RunRecord:
    """Committed results and report entries of a run, in the order stages produced them."""

    state: CompressionState = dataclasses.field(default_factory=CompressionState)
    modules: dict[str, ModuleReport] = dataclasses.field(default_factory=dict)
    #: weight gradients of the layers whose stage asks for the ``grad`` statistic
    grads: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    #: MoE: per expert layer, how its statistics were gathered (for the report)
    moe_info: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    #: structured changes: parameters and widths before/after (``CompressionReport.structure``)
    structure: dict[str, Any] = dataclasses.field(default_factory=dict)
    #: the blocks' parameters and widths before the first structural change of the run
    structure_before: tuple[int, list[dict[str, int]] | None] | None = None
    #: an allocation stage's summary (``CompressionReport.allocation``)
    allocation: dict[str, Any] | None = None
    #: a recovery stage's course (``CompressionReport.recovery``)
    recovery: dict[str, Any] | None = None
    #: a transform stage's summary (``CompressionReport.transforms``: rotations, their run-time cost)
    transforms: dict[str, Any] | None = None
    #: stage index -> the recipe entry that reproduces what the stage chose (explicit levels)
    written_back: dict[int, dict[str, Any]] = dataclasses.field(default_factory=dict)
    #: the layers restored from a compressed checkpoint before the run (``llmpress.pipeline.resume``)
    restored: tuple[str, ...] = ()
    #: whether to keep :attr:`originals` (a stage's config asks: ``MethodConfig.needs_original_weights``)
    keep_originals: bool = False
    #: layer name -> its weight before the run's first commit to it (a CPU copy; only with
    #: :attr:`keep_originals`)
    originals: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)

    def module_report(self, name: str, mod: nn.Module) -> ModuleReport:
        """The report entry of layer ``name`` (created on first use; its shape kept current)."""
        shape = tuple(get_weight(mod).shape)
        rep = self.modules.get(name)
        if rep is None:
            rep = self.modules[name] = ModuleReport(name=name, methods=[], shape=shape)  # type: ignore[arg-type]
        rep.shape = shape  # type: ignore[assignment]
        return rep

    def commit(self, name: str, mod: nn.Module, result: LayerResult, method: str) -> LayerResult:
        """Write ``result`` into ``mod``, keep it in the state and report it (sparsity from the
        mask when there is one, else the measured zeros of a dense update; bits)."""
        if self.keep_originals and name not in self.originals:
            self.originals[name] = get_weight(mod).detach().to("cpu", copy=True)
        merged = commit(self.state, name, mod, result)
        rep = self.module_report(name, mod)
        rep.methods.append(method)
        rep.info.update(result.info)
        rep.info.update(self.moe_info.get(name, {}))
        if result.loss is not None:
            rep.losses[method] = float(result.loss)
        # quantization may round a few kept weights to 0, which is not pruning
        if merged.mask is not None:
            rep.sparsity = 1.0 - float(merged.mask.float().mean())
        elif merged.quant is None:
            rep.sparsity = float((get_weight(mod) == 0).float().mean())
        rep.bits = None if merged.quant is None else merged.quant.bits
        rep.activations = None if merged.quant is None else merged.quant.activations
        return merged
