"""The stage protocol: what the runner and the block pass know about a stage.

A recipe resolves into a plan of stages (:mod:`llmpress.recipe.plan`); each stage's method
config names its *kind*, a :class:`StageExecutor` subclass (``MethodConfig.kind``). There are
two shapes of kind:

* :class:`BlockwiseStage`: runs inside the block pass (:mod:`llmpress.engine.block_pass`), one
  block at a time, on the calibration inputs that the stages before it in the same pass
  produced. Consecutive blockwise stages share one pass. Built in: per-layer updates
  (:class:`llmpress.engine.layer_stage.LayerUpdate`) and block changes
  (:class:`llmpress.structure.block_stage.BlockChange`).
* :class:`ModelStage`: runs on the whole model between block passes (an allocation search,
  recovery training).

A plugin adds a kind by subclassing one of them and naming the subclass as its config's
``kind``; nothing in the engine changes.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from llmpress.engine.block_pass import BlockPass
    from llmpress.engine.record import RunRecord
    from llmpress.engine.stats import LayerStats
    from llmpress.method_hooks import MethodHooks
    from llmpress.recipe.allocation import AllocationConfig
    from llmpress.recipe.config import MethodConfig


@dataclasses.dataclass(frozen=True)
class BoundStage:
    """A planned stage bound to a model: its config, its hooks and its target layers."""

    index: int
    config: MethodConfig
    hooks: MethodHooks
    #: block index -> target layer names relative to the block
    targets: dict[int, list[str]]
    #: the recipe's text of this stage (``Stage.to_dict()``)
    entry: dict[str, object]
    #: the stage's validated ``allocation:`` config and its search's hooks, if any
    allocation: AllocationConfig | None = None
    search: MethodHooks | None = None

    @property
    def name(self) -> str:
        return f"stage {self.index} ({self.config.method})"


@dataclasses.dataclass
class BlockStep:
    """One block as a blockwise stage sees it during the block pass."""

    index: int
    #: qualified name of the block, e.g. ``model.layers.3``
    name: str
    module: nn.Module
    run: BlockPass

    def targets(self, stage: BoundStage) -> dict[str, nn.Module]:
        """The stage's target linears in this block, by name relative to the block."""
        from llmpress.model.modules import is_linear

        mods = {r: self.module.get_submodule(r) for r in stage.targets.get(self.index, [])}
        return {r: m for r, m in mods.items() if is_linear(m)}

    def statistics(self, stage: BoundStage, mods: dict[str, nn.Module]) -> dict[str, LayerStats]:
        """Every statistic ``stage``'s config asks for, of ``mods``' inputs, in one pass over
        the block's calibration inputs (empty without calibration data)."""
        return self.run.collect(self, mods, stage.config.statistics(), stage.config.calibrated())[0]


@dataclasses.dataclass
class ModelContext:
    """What a model-level stage sees."""

    model: nn.Module
    device: torch.device
    #: the calibration token ids ``[n, L]`` (``None`` when no stage needs data)
    ids: torch.Tensor | None
    batch_size: int
    progress: bool
    record: RunRecord
    moe_min_tokens: int
    #: the whole recipe as written (a model stage may record it next to what it chose)
    recipe: dict[str, object] = dataclasses.field(default_factory=dict)
    #: the model as it was before the recipe's first stage (a frozen copy, on CPU), kept only
    #: when a stage's config asks for it (``MethodConfig.needs_teacher``)
    teacher: nn.Module | None = None
    #: the calibration source as the caller gave it (text file, strings, dataset, token ids)
    #: and the tokenizer, for a stage that reads more data than the calibration windows
    source: object = None
    tokenizer: object = None


class StageExecutor:
    """Runs one bound stage of a plan and writes what it did into the run's record."""

    def __init__(self, stage: BoundStage, record: RunRecord) -> None:
        self.stage = stage
        self.record = record

    @property
    def config(self) -> MethodConfig:
        return self.stage.config

    def check(self, model: nn.Module, stages: list[BoundStage], ids: torch.Tensor | None) -> None:
        """Before any stage of the run works: raise if this stage cannot run after ``stages``
        before it in the plan (``stages`` is the whole plan; ``ids`` the calibration tokens)."""


class BlockwiseStage(StageExecutor, abc.ABC):
    """A stage run block by block inside the block pass."""

    def needs_planning(self) -> bool:
        """True to see every block of the unchanged model first (:meth:`plan_block`)."""
        return False

    def plan_block(self, step: BlockStep) -> None:
        """Planning pass: look at one block of the unchanged model (nothing may change)."""

    def begin(self, run: BlockPass) -> None:
        """After the planning pass, before the first block: whole-model changes, if any."""

    @abc.abstractmethod
    def process_block(self, step: BlockStep) -> None:
        """Compress (or otherwise change) this block; results go to ``self.record``."""

    def finish(self, run: BlockPass) -> None:
        """After the last block."""


class ModelStage(StageExecutor, abc.ABC):
    """A stage run once on the whole model, between block passes."""

    @abc.abstractmethod
    def run(self, ctx: ModelContext) -> None:
        """Run the stage; write results and report entries into ``ctx.record``."""
