"""The recovery stage: distillation from the uncompressed teacher that keeps the compression.

:class:`Distill` checks everything before any work (a compression stage ran before it, the
teacher shares the student's vocabulary and architecture, the budget pays for one step, every
compressed format can train), runs :func:`llmpress.train.loop.train` and writes the course
into ``record.recovery`` and each compressed layer's report.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from llmpress.engine import distributed
from llmpress.engine.calibration import CalibrationSource
from llmpress.engine.record import RunRecord
from llmpress.engine.stage import BoundStage, ModelContext, ModelStage
from llmpress.errors import CalibrationError, ModelError, RecipeError
from llmpress.model.modules import find_blocks
from llmpress.model.results import LayerResult
from llmpress.recipe.config import QuantConfig
from llmpress.train.config import DEFAULT_SEQLEN, RecoveryConfig
from llmpress.train.constraints import Constraints, check_trainable
from llmpress.train.loop import Outcome, TrainData, eval_windows, token_source, train
from llmpress.train.losses import LossWeights

log = logging.getLogger(__name__)


def _width(model: nn.Module) -> tuple[int, int]:
    """(vocabulary, hidden width) of a causal LM, from its input embeddings."""
    emb = model.get_input_embeddings()  # type: ignore[operator]
    return int(emb.weight.shape[0]), int(emb.weight.shape[1])


def check_teacher(teacher: nn.Module, student: nn.Module, w: LossWeights) -> None:
    """The teacher must be the student's architecture with the same vocabulary (and, for
    SquareHead, the same hidden width and number of blocks)."""
    if type(teacher).__name__ != type(student).__name__:
        raise ModelError(
            f"distill: the teacher is a {type(teacher).__name__}, the student a {type(student).__name__}; "
            f"give a teacher of the same architecture"
        )
    (tv, th), (sv, sh) = _width(teacher), _width(student)
    if tv != sv:
        raise ModelError(
            f"distill: the teacher's vocabulary has {tv} tokens, the student's {sv}; give a teacher "
            f"with the student's tokenizer"
        )
    if w.squarehead > 0:
        tb, sb = len(find_blocks(teacher)[1]), len(find_blocks(student)[1])
        if (th, tb) != (sh, sb):
            raise ModelError(
                f"distill: squarehead compares hidden states block by block, but the teacher has "
                f"{tb} blocks of width {th} and the student {sb} of width {sh}; use kl/ce instead"
            )


def _parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def check_after_compression(record: RunRecord, label: str) -> None:
    """A recovery stage needs a compression stage before it."""
    if not record.state.layers and not record.modules and not record.structure:
        raise RecipeError(
            f"{label}: a recovery stage must come after a compression stage (nothing was compressed "
            f"before it); move it after a pruning or quantization stage"
        )


def _world() -> int:
    return distributed.world_size() if distributed.is_initialized() else 1


def _describe(source: object) -> str:
    if isinstance(source, torch.Tensor):
        return f"token ids {list(source.shape)}"
    if isinstance(source, (list, tuple)):
        return f"{len(source)} strings"
    return str(source)


def check_formats(before: list[BoundStage], label: str) -> None:
    """Refuse, before any work, a stage before the recovery whose format cannot train: FP8
    (a format that quantizes without an integer grid) and W8A8 (quantized inputs)."""
    for s in before:
        c = s.config
        if c.quantizes and not isinstance(c, QuantConfig):
            raise ModelError(
                f"{label}: a recovery stage cannot train the layers of {s.name} (not an integer grid, "
                f"e.g. fp8): put distill before it"
            )
        if isinstance(c, QuantConfig) and c.activation_scheme() is not None:
            raise ModelError(
                f"{label}: a recovery stage cannot train the W8A8 layers of {s.name} "
                f"(activations {c.activations!r}): put distill before it"
            )


class Distill(ModelStage):
    """Recovery training of the whole model (the stage's ``targets`` are not used)."""

    _loaded: nn.Module | None = None
    #: the model was compressed before this run (:meth:`check`)
    _earlier: bool = False

    def _config(self) -> RecoveryConfig:
        cfg = self.config
        assert isinstance(cfg, RecoveryConfig)
        return cfg

    def _seqlen(self, ids: torch.Tensor | None) -> int:
        cfg = self._config()
        return cfg.seqlen or (int(ids.shape[1]) if ids is not None else DEFAULT_SEQLEN)

    def check(self, model: nn.Module, stages: list[BoundStage], ids: torch.Tensor | None) -> None:
        """Everything that can be known before the run: a compression stage before this one,
        trainable formats, the budget, the teacher's vocabulary and architecture."""
        cfg, name = self._config(), self.stage.name
        before = [s for s in stages if s.index < self.stage.index]
        w = cfg.loss_weights()
        if self.record.restored and w.needs_teacher and cfg.teacher is None:
            raise ModelError(
                f"{name}: the model was loaded compressed (an llmpress checkpoint), so the model before the "
                f"recipe is not the uncompressed one; give 'teacher:' the base model's folder or Hub id"
            )
        check_formats(before, name)
        cfg.check_budget(self._seqlen(ids), _world())
        if w.squarehead > 0 and any(s.config.prunes_hidden() for s in before):
            raise ModelError(
                f"{name}: squarehead compares hidden states of the teacher's width, but a stage "
                f"before it prunes the hidden width; use kl/ce instead"
            )
        if w.needs_teacher and cfg.teacher is not None:
            from llmpress.format.loading import load_model

            teacher, _ = load_model(cfg.teacher, dtype=torch.float32, device="cpu", tokenizer=False)
            self._loaded = teacher.eval().requires_grad_(False)
            check_teacher(self._loaded, model, LossWeights(kl=1.0))  # vocabulary and architecture
        # compressed before this run: loaded from an llmpress checkpoint, or smaller than its teacher
        self._earlier = bool(self.record.restored) or (
            self._loaded is not None and _parameters(model) < _parameters(self._loaded)
        )
        if not before and cfg.schedule is None and not self._earlier:
            raise RecipeError(
                f"{name}: a recovery stage must come after a compression stage (it is the first "
                f"stage); move it after a pruning or quantization stage, or, for a model compressed "
                f"earlier, give 'teacher:' its uncompressed base model"
            )

    def run(self, ctx: ModelContext) -> None:
        cfg = self._config()
        if cfg.schedule is None and not self._earlier:
            check_after_compression(ctx.record, self.stage.name)
        check_trainable(ctx.record.state)
        world = _world()
        seqlen = self._seqlen(ctx.ids)
        cfg.check_budget(seqlen, world)
        weights = cfg.loss_weights()
        teacher = self._teacher(ctx, cfg, weights)
        opts = cfg.train_options(seqlen)
        source = self._source(ctx, cfg)
        data = TrainData(
            token_source(ctx.tokenizer, source),
            seqlen,
            cfg.seed,
            None if cfg.eval_text is None else eval_windows(ctx.tokenizer, cfg.eval_text, seqlen),
        )
        log.info("%s: %d steps of %d tokens, weights %s", self.stage.name, opts.steps(world),
                 opts.tokens_per_step(world), weights.as_dict())  # fmt: skip
        state, scheduled = ctx.record.state, self._scheduled(ctx.model) if cfg.schedule else ()
        out = train(
            ctx.model, teacher, lambda m: Constraints.attach(m, state, cfg.train, scheduled), weights, opts,
            data, ctx.device, ctx.progress, cfg.prune_schedule(),
        )  # fmt: skip
        for name, keep in out.masks.items():  # gradual pruning: the final masks, committed
            ctx.record.commit(name, ctx.model.get_submodule(name), LayerResult(mask=keep), cfg.method)
        self._report(ctx.record, cfg, weights, out, source, seqlen)

    def _scheduled(self, model: nn.Module) -> tuple[str, ...]:
        """The qualified names of the stage's targets (what a pruning schedule prunes)."""
        prefix = find_blocks(model)[0]
        return tuple(f"{prefix}.{i}.{r}" for i, rels in sorted(self.stage.targets.items()) for r in rels)

    def _teacher(self, ctx: ModelContext, cfg: RecoveryConfig, w: LossWeights) -> nn.Module | None:
        """The frozen teacher (``None`` when no loss term needs one)."""
        if not w.needs_teacher:
            return None
        if cfg.teacher is not None:
            from llmpress.format.loading import load_model

            if self._loaded is None:
                loaded, _ = load_model(cfg.teacher, dtype=torch.float32, device="cpu", tokenizer=False)
                self._loaded = loaded.eval().requires_grad_(False)
            teacher = self._loaded
        elif ctx.teacher is not None:
            teacher = ctx.teacher
        else:
            raise ModelError(f"{self.stage.name}: no teacher: give 'teacher:' a model folder or Hub id")
        check_teacher(teacher, ctx.model, w)
        return teacher

    def _source(self, ctx: ModelContext, cfg: RecoveryConfig) -> CalibrationSource:
        """``data:``, else the run's calibration source, else its calibration windows."""
        src: object = list(cfg.data) if isinstance(cfg.data, tuple) else cfg.data
        if src is None:
            src = ctx.source if ctx.source is not None else ctx.ids
        if src is None:
            raise CalibrationError(f"{self.stage.name}: no training data; give 'data:' or calibration data")
        if not isinstance(src, torch.Tensor) and ctx.tokenizer is None:
            raise CalibrationError(f"{self.stage.name}: reading text data needs a tokenizer")
        if isinstance(src, Path):
            src = str(src)
        return src  # type: ignore[return-value]

    def _report(
        self,
        record: RunRecord,
        cfg: RecoveryConfig,
        w: LossWeights,
        out: Outcome,
        source: object,
        seqlen: int,
    ) -> None:
        """``record.recovery`` and each compressed layer's report."""
        trained = out.tokens * (out.steps - out.resumed_from) / max(out.steps, 1)
        evals = None
        if out.evals:
            evals = {
                "text": cfg.eval_text, "base": out.base, "before": out.evals[0][1], "after": out.evals[-1][1],
                "curve": [[s, p] for s, p in out.evals],
            }  # fmt: skip
        record.recovery = {
            "method": cfg.method,
            "preset": cfg.preset,
            "weights": w.as_dict(),
            "teacher": cfg.teacher or "the model before the recipe's first stage",
            "data": _describe(source),
            "tokens": out.tokens,
            "steps": out.steps,
            "seqlen": seqlen,
            "train": cfg.train,
            "loss_curve": [[s, loss] for s, loss in out.curve],
            "eval": evals,
            "resumed_from": out.resumed_from,
            "wall_s": out.wall_s,
            "tokens_per_s": trained / max(out.wall_s, 1e-9),
        }
        for name, rep in record.modules.items():
            rep.info["distill_tokens"] = float(out.tokens)
            rep.info["distill_steps"] = float(out.steps)
            if name in out.quantized:
                rep.info["distill_rerounded"] = 1.0
