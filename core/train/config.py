"""The options of a recovery stage, typed (a plugin's config subclasses :class:`RecoveryConfig`)."""

from __future__ import annotations

import dataclasses
from typing import Annotated, ClassVar, Literal

from pydantic import Field

from llmpress.errors import RecipeError
from llmpress.recipe.config import Fraction, MethodConfig, NonNegativeInt, PositiveInt
from llmpress.train.loop import TrainOptions
from llmpress.train.losses import LossWeights
from llmpress.train.schedule import PruneSchedule

#: a loss weight (>= 0)
Weight = Annotated[float, Field(ge=0)]
#: a number > 0
Positive = Annotated[float, Field(gt=0)]

#: the documented presets: SquareHead sparse fine-tuning (Kurtic et al.) and Minitron's logit KD
PRESETS: dict[str, dict[str, float]] = {
    "sparse-finetune": {"ce": 1.0, "kl": 0.0, "squarehead": 1.0},
    "minitron": {"ce": 0.0, "kl": 1.0, "squarehead": 0.0},
}
#: the preset used when neither a preset nor an explicit weight is given
DEFAULT_PRESET = "sparse-finetune"
#: the training window length when neither ``seqlen`` nor calibration windows give one
DEFAULT_SEQLEN = 512


@dataclasses.dataclass(frozen=True)
class RecoveryConfig(MethodConfig):
    """Options of distillation fine-tuning that keeps the compression.

    Loss: ``preset`` (``sparse-finetune``: CE 1 + SquareHead 1; ``minitron``: KL 1; default
    sparse-finetune) with explicit ``ce``/``kl``/``squarehead`` weights overriding it and the KL
    ``temperature``. ``teacher``: a folder or Hub id (default: the model before the recipe's
    first stage). Data: ``data`` (a calibration source; default the run's), ``tokens`` (the
    budget), ``seqlen`` (default: the calibration windows'), ``batch_size``, ``grad_accum``.
    Optimisation: ``lr``, ``warmup`` (a fraction of the steps), ``weight_decay``, ``clip`` (0:
    none), ``seed``. ``train``: ``weights`` (quantized layers through a straight-through
    estimator) or ``scales`` (quantized layers' scales only, codes frozen). ``eval_text`` every
    ``eval_every`` steps (and before/after). ``checkpoint_dir`` every ``checkpoint_every`` steps
    (a rerun resumes). ``gradient_checkpointing`` trades compute for activation memory.
    ``schedule``: gradual pruning of the stage's targets during training, ``{from: s0, to: s,
    every: k, score: magnitude | fisher}`` (:mod:`llmpress.train.schedule`).
    """

    stats: ClassVar[frozenset[str]] = frozenset()
    needs_calibration: ClassVar[bool] = True
    needs_teacher: ClassVar[bool] = True
    preset: Literal["sparse-finetune", "minitron"] | None = None
    ce: Weight | None = None
    kl: Weight | None = None
    squarehead: Weight | None = None
    temperature: Positive = 1.0
    teacher: str | None = None
    data: str | tuple[str, ...] | None = None
    tokens: PositiveInt = 1_000_000
    seqlen: Annotated[int, Field(ge=2)] | None = None
    batch_size: PositiveInt = 8
    grad_accum: PositiveInt = 1
    lr: Positive = 1e-5
    warmup: Fraction = 0.05
    weight_decay: Weight = 0.0
    clip: Weight = 1.0
    seed: int = 0
    train: Literal["weights", "scales"] = "weights"
    eval_text: str | None = None
    eval_every: NonNegativeInt = 0
    checkpoint_dir: str | None = None
    checkpoint_every: NonNegativeInt = 0
    gradient_checkpointing: bool = False
    schedule: dict[str, float | str] | None = None

    def validate(self) -> None:
        super().validate()
        self.prune_schedule()  # raises on a bad schedule
        if sum(self.loss_weights().as_dict()[k] for k in ("ce", "kl", "squarehead")) <= 0:
            raise RecipeError(f"{self.label()}: every loss weight is 0; give ce, kl or squarehead > 0")
        if self.seqlen is not None:
            self.check_budget(self.seqlen)
        if self.checkpoint_every and self.checkpoint_dir is None:
            raise RecipeError(f"{self.label()}: checkpoint_every needs a checkpoint_dir")

    def prune_schedule(self) -> PruneSchedule | None:
        """The gradual-pruning schedule (``None``: the masks stay as the earlier stages left them)."""
        if self.schedule is None:
            return None
        sch = dict(self.schedule)
        bad = sorted(set(sch) - {"from", "to", "every", "score"})
        start, end, every, score = (
            sch.get("from", 0.0),
            sch.get("to"),
            sch.get("every", 1),
            sch.get("score", "magnitude"),
        )
        ok = (
            not bad and isinstance(start, (int, float)) and isinstance(end, (int, float))
            and 0 <= start <= end < 1 and isinstance(every, int) and every >= 1
            and score in ("magnitude", "fisher")
        )  # fmt: skip
        if not ok:
            raise RecipeError(
                f"{self.label()}: schedule must be {{from: s0, to: s, every: k, score: magnitude|fisher}} "
                f"with 0 <= s0 <= s < 1 and k >= 1, got {self.schedule!r}"
            )
        return PruneSchedule(float(start), float(end), int(every), str(score))  # type: ignore[arg-type]

    def loss_weights(self) -> LossWeights:
        """The preset's weights with the explicit ones over them."""
        explicit = self.preset is not None or (self.ce, self.kl, self.squarehead) != (None, None, None)
        base = PRESETS[self.preset or DEFAULT_PRESET] if not explicit or self.preset else {}
        pick = {
            k: v
            for k, v in (("ce", self.ce), ("kl", self.kl), ("squarehead", self.squarehead))
            if v is not None
        }
        w = {"ce": 0.0, "kl": 0.0, "squarehead": 0.0, **base, **pick}
        return LossWeights(temperature=self.temperature, **w)

    def copies_model(self) -> bool:
        return self.teacher is None and self.loss_weights().needs_teacher

    def describe(self) -> str:
        w = self.loss_weights()
        loss = " + ".join(
            f"{k} {v:g}" for k, v in (("ce", w.ce), ("kl", w.kl), ("squarehead", w.squarehead)) if v
        )
        loss = f"preset {self.preset}, {loss}" if self.preset else loss
        teacher = f"`{self.teacher}`" if self.teacher else "the uncompressed model"
        return (
            f"recovery training by distillation from {teacher} ({loss}) on {self.tokens:,} tokens, "
            f"the compression kept"
        )

    def check_budget(self, seqlen: int, world: int = 1) -> None:
        """Raise unless ``tokens`` pays for at least one optimizer step."""
        one = self.batch_size * seqlen * self.grad_accum * world
        if self.tokens < one:
            raise RecipeError(
                f"{self.label()}: tokens {self.tokens} is smaller than one batch ({self.batch_size} x "
                f"{seqlen} tokens x grad_accum {self.grad_accum}{f' x {world} processes' if world > 1 else ''}"
                f" = {one}); raise tokens or lower batch_size/seqlen"
            )

    def train_options(self, seqlen: int) -> TrainOptions:
        """The loop's options at window length ``seqlen``."""
        return TrainOptions(
            tokens=self.tokens, seqlen=seqlen, batch_size=self.batch_size, grad_accum=self.grad_accum,
            lr=self.lr, warmup=self.warmup, weight_decay=self.weight_decay, clip=self.clip,
            seed=self.seed, train=self.train, eval_every=self.eval_every,
            checkpoint_dir=self.checkpoint_dir, checkpoint_every=self.checkpoint_every,
            gradient_checkpointing=self.gradient_checkpointing,
        )  # fmt: skip
