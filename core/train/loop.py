"""The recovery loop: AdamW, a cosine schedule with linear warmup, clipping, accumulation.

Data are token windows of ``seqlen`` from the same sources as calibration (read by
:mod:`llmpress.engine.calibration`); window ``i`` of a run depends only on the seed and ``i``
(:class:`TrainData`), so a run resumed from a checkpoint (written atomically every
``checkpoint_every`` steps: trainable state, optimizer, scheduler, RNG states, step, loss
curve) ends with the same weights as an uninterrupted one. accelerate places the model,
casts to bf16 on a GPU (fp32 on CPU) and splits each step's windows over the processes of a
data-parallel launch (``accelerate launch``/``torchrun``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import random
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from llmpress.engine.calibration import CalibrationSource, read_documents, tokenize_documents
from llmpress.errors import CalibrationError
from llmpress.train.constraints import Constraints, set_trainable
from llmpress.train.losses import LossWeights, combined
from llmpress.train.schedule import GradualPruning, PruneSchedule

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "distill-checkpoint.pt"


@dataclasses.dataclass(frozen=True)
class TrainOptions:
    """How the loop runs (the optimisation options of a ``distill`` stage)."""

    tokens: int
    seqlen: int
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-5
    warmup: float = 0.05
    weight_decay: float = 0.0
    clip: float = 1.0
    seed: int = 0
    train: str = "weights"
    eval_every: int = 0
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0
    gradient_checkpointing: bool = False

    def tokens_per_step(self, world: int = 1) -> int:
        return self.batch_size * self.seqlen * self.grad_accum * world

    def steps(self, world: int = 1) -> int:
        return self.tokens // self.tokens_per_step(world)


@dataclasses.dataclass
class Outcome:
    """What a finished run did (the report's ``recovery`` entry is built from it)."""

    steps: int
    tokens: int
    curve: list[tuple[int, float]]
    evals: list[tuple[int, float]]
    wall_s: float
    resumed_from: int
    quantized: list[str]
    #: the final keep masks of the layers a pruning schedule pruned
    masks: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    #: the teacher's perplexity on the evaluation windows (the base the card compares against)
    base: float | None = None


def token_source(tokenizer: Any, source: CalibrationSource) -> torch.Tensor:
    """The training tokens of any calibration source: a 1-D stream, or token-id rows [m, L]."""
    if isinstance(source, torch.Tensor):
        return source.long()
    return tokenize_documents(tokenizer, read_documents(source, what="training"))


def eval_windows(tokenizer: Any, text: str, seqlen: int, limit: int = 64) -> torch.Tensor:
    """Consecutive non-overlapping windows [m, seqlen] of a held-out text (at most ``limit``)."""
    stream = tokenize_documents(tokenizer, read_documents(text, what="evaluation"))
    m = min(limit, stream.numel() // seqlen)
    if m < 1:
        raise CalibrationError(f"distill: eval_text {text!r} has fewer than {seqlen} tokens")
    return stream[: m * seqlen].view(m, seqlen)


@torch.no_grad()
def perplexity(model: nn.Module, ids: torch.Tensor, batch_size: int, device: torch.device) -> float:
    """Perplexity of ``model`` on windows ``ids`` [m, L] (mean next-token loss, exponentiated)."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    for b in ids.split(batch_size):
        b = b.to(device)
        logits = model(b).logits  # [B, L, V]
        loss = nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), b[:, 1:].flatten(), reduction="sum"
        )
        total, count = total + float(loss), count + b[:, 1:].numel()
    model.train(was)
    return math.exp(total / count)


def lr_lambda(steps: int, warmup: float) -> Any:
    """Linear warmup over ``warmup`` of the steps, then cosine decay to zero."""
    w = int(round(warmup * steps))

    def f(step: int) -> float:
        if step < w:
            return (step + 1) / (w + 1)
        return 0.5 * (1.0 + math.cos(math.pi * (step - w) / max(1, steps - w)))

    return f


def _after_step(step: int) -> None:
    """Called after each optimizer step (tests make it raise to simulate a killed run)."""


@dataclasses.dataclass
class _Run:
    """The live state of a run: what a checkpoint saves and restores."""

    params: list[tuple[str, nn.Parameter]]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    step: int = 0
    curve: list[tuple[int, float]] = dataclasses.field(default_factory=list)
    evals: list[tuple[int, float]] = dataclasses.field(default_factory=list)
    pruning: GradualPruning | None = None
    base: float | None = None

    def _pruning_tensors(self) -> dict[str, torch.Tensor]:
        if self.pruning is None:
            return {}
        out = {f"keep:{n}": keep for n, (_, keep) in self.pruning.layers.items()}
        return {**out, **{f"fisher:{n}": f for n, f in self.pruning.fisher.items()}}

    def state(self, key: dict[str, Any]) -> dict[str, Any]:
        rng: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {
            "key": key,
            "step": self.step,
            "params": {n: p.detach().cpu().clone() for n, p in self.params},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rng,
            "curve": list(self.curve),
            "evals": list(self.evals),
            "base": self.base,
            "pruning": {n: t.detach().cpu().clone() for n, t in self._pruning_tensors().items()},
        }

    @torch.no_grad()
    def restore(self, ckpt: dict[str, Any]) -> None:
        for n, p in self.params:
            p.copy_(ckpt["params"][n].to(p.device))
        for n, t in self._pruning_tensors().items():
            t.copy_(ckpt["pruning"][n].to(t.device))
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        random.setstate(ckpt["rng"]["python"])
        if "cuda" in ckpt["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
        self.step = int(ckpt["step"])
        self.curve = [tuple(c) for c in ckpt["curve"]]  # type: ignore[misc]
        self.evals = [tuple(e) for e in ckpt["evals"]]  # type: ignore[misc]
        self.base = ckpt.get("base")


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically (a temporary file renamed over it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, key: dict[str, Any]) -> dict[str, Any] | None:
    """The checkpoint at ``path`` if it was written by a run with the same options."""
    if not path.is_file():
        return None
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if ckpt.get("key") != key:
        log.warning("distill: %s was written by a run with other options; starting afresh", path)
        return None
    log.info("distill: resuming from %s at step %d", path, ckpt["step"])
    return ckpt


@dataclasses.dataclass(frozen=True)
class TrainData:
    """The training tokens (a 1-D stream or rows [m, L]) and held-out windows, if any.

    Window ``i`` of a run is fixed by the seed and ``i`` alone (a random start in the stream, or
    row ``i mod m``), so any step's windows are drawn without drawing the ones before it.
    """

    tokens: torch.Tensor
    seqlen: int
    seed: int = 0
    eval_ids: torch.Tensor | None = None

    def __post_init__(self) -> None:
        have = self.tokens.shape[-1]
        if have < self.seqlen:
            raise CalibrationError(
                f"distill: the training data have {have} tokens {'a row' if self.tokens.dim() == 2 else ''}, "
                f"fewer than one window of seqlen {self.seqlen}; give more data or a smaller seqlen"
            )

    def rows(self, first: int, count: int) -> torch.Tensor:
        """Windows ``first .. first + count - 1`` -> [count, seqlen]."""
        idx = range(first, first + count)
        if self.tokens.dim() == 2:
            return self.tokens[torch.tensor([i % self.tokens.shape[0] for i in idx]), : self.seqlen]
        span = self.tokens.numel() - self.seqlen + 1
        starts = [
            int(torch.randint(span, (1,), generator=torch.Generator().manual_seed(self.seed * 1_000_003 + i)))
            for i in idx
        ]
        return torch.stack([self.tokens[s : s + self.seqlen] for s in starts])  # [count, seqlen]


def train(
    model: nn.Module,
    teacher: nn.Module | None,
    constraints_of: Any,
    weights: LossWeights,
    opts: TrainOptions,
    data: TrainData,
    device: torch.device,
    progress: bool = True,
    schedule: PruneSchedule | None = None,
) -> Outcome:
    """Train ``model`` in place (``constraints_of(model)`` attaches the masks and grids and
    its ``finish()`` re-rounds them) and return what the run did."""
    from accelerate import Accelerator

    acc = Accelerator(cpu=device.type == "cpu", mixed_precision="bf16" if device.type == "cuda" else "no")
    steps = opts.steps(acc.num_processes)
    home = next(model.parameters()).device
    dtypes = {n: t.dtype for n, t in [*model.named_parameters(), *model.named_buffers()]}
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.to(acc.device, torch.float32)  # fp32 master weights; accelerate autocasts to bf16 on a GPU
    set_trainable(model)
    cons: Constraints = constraints_of(model)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    pruning = None if schedule is None else GradualPruning(schedule, cons.keeps)
    optimizer = torch.optim.AdamW([p for _, p in params], lr=opts.lr, weight_decay=opts.weight_decay)
    run = _Run(params, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(steps, opts.warmup)))
    run.pruning = pruning
    key = {
        "options": dataclasses.asdict(opts), "weights": weights.as_dict(), "world": acc.num_processes,
        "schedule": None if schedule is None else dataclasses.asdict(schedule),
    }  # fmt: skip
    path = Path(opts.checkpoint_dir) / CHECKPOINT_FILE if opts.checkpoint_dir else None
    ckpt = load_checkpoint(path, key) if path is not None else None
    torch.manual_seed(opts.seed)
    random.seed(opts.seed)
    if ckpt is not None:
        run.restore(ckpt)
    resumed = run.step
    if opts.gradient_checkpointing:
        # non-reentrant: the frozen embeddings' output needs no grad for the blocks' to flow
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})  # type: ignore[operator]
    wrapped = acc.prepare(model)
    if teacher is not None:
        teacher.to(acc.device)
    t0 = time.perf_counter()
    try:
        model.train()
        _loop(acc, wrapped, model, teacher, weights, opts, data, run, cons, steps, progress, path, key)
    finally:
        acc.unwrap_model(wrapped, keep_fp32_wrapper=False)
        model.eval()
        if opts.gradient_checkpointing:
            model.gradient_checkpointing_disable()  # type: ignore[operator]
        if teacher is not None:
            teacher.to("cpu")
        masks = {} if pruning is None else pruning.masks()
        quantized = cons.finish()  # also after an interruption: the model keeps its format
        model.to(home)
        _cast(model, dtypes)
        for p, f in flags:
            p.requires_grad_(f)
    wall = time.perf_counter() - t0
    tokens = steps * opts.tokens_per_step(acc.num_processes)
    return Outcome(steps, tokens, run.curve, run.evals, wall, resumed, quantized, masks, run.base)


@torch.no_grad()
def _cast(model: nn.Module, dtypes: dict[str, torch.dtype]) -> None:
    """Every parameter and buffer back in the dtype it had before training."""
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if name in dtypes and t.dtype != dtypes[name]:
            t.data = t.data.to(dtypes[name])


def _batches(data: TrainData, step: int, opts: TrainOptions, world: int, rank: int) -> list[torch.Tensor]:
    """This process's micro-batches of ``step`` (the same windows whatever the process count,
    as long as ``batch_size * world`` is the same)."""
    base = step * opts.grad_accum * world * opts.batch_size
    starts = [base + (a * world + rank) * opts.batch_size for a in range(opts.grad_accum)]
    return [data.rows(s, opts.batch_size) for s in starts]


def _step(
    acc: Any, wrapped: nn.Module, teacher: nn.Module | None, w: LossWeights, batches: list[torch.Tensor]
) -> float:
    """Forward and backward over one step's micro-batches (gradients synchronised on the last)."""
    import contextlib

    hidden = w.squarehead > 0
    total = 0.0
    for a, ids in enumerate(batches):
        ids = ids.to(acc.device)  # [B, L]
        sync = contextlib.nullcontext() if a == len(batches) - 1 else acc.no_sync(wrapped)
        with sync:
            t_out = None
            if teacher is not None:
                with torch.no_grad(), acc.autocast():
                    t_out = teacher(ids, output_hidden_states=hidden, use_cache=False)
            out = wrapped(ids, output_hidden_states=hidden, use_cache=False)
            loss, _ = combined(
                w, ids, out.logits, out.hidden_states,
                None if t_out is None else t_out.logits, None if t_out is None else t_out.hidden_states,
            )  # fmt: skip
            acc.backward(loss / len(batches))
        total += float(loss.detach()) / len(batches)
    return total


def _loop(
    acc: Any,
    wrapped: nn.Module,
    model: nn.Module,
    teacher: nn.Module | None,
    w: LossWeights,
    opts: TrainOptions,
    data: TrainData,
    run: _Run,
    cons: Constraints,
    steps: int,
    progress: bool,
    path: Path | None,
    key: dict[str, Any],
) -> None:
    """Steps ``run.step`` .. ``steps``: optimise, re-mask, log, evaluate, checkpoint."""
    world, rank = acc.num_processes, acc.process_index
    every = max(1, steps // 100)  # loss-curve resolution
    if data.eval_ids is not None and not run.evals:
        run.evals.append((0, perplexity(model, data.eval_ids, opts.batch_size, acc.device)))
        if teacher is not None:
            run.base = perplexity(teacher, data.eval_ids, opts.batch_size, acc.device)
    if run.pruning is not None and run.step == 0:
        run.pruning.select(0, steps)
    bar = tqdm(total=steps, initial=run.step, disable=not progress or not acc.is_main_process, desc="distill")
    t0, first = time.perf_counter(), run.step
    params = [p for _, p in run.params]
    while run.step < steps:
        loss = _step(acc, wrapped, teacher, w, _batches(data, run.step, opts, world, rank))
        if opts.clip > 0:
            torch.nn.utils.clip_grad_norm_(params, opts.clip)
        run.optimizer.step()
        run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
        cons.apply_masks()
        run.step += 1
        if run.pruning is not None and run.pruning.schedule.due(run.step, steps):
            run.pruning.select(run.step, steps)
        if run.step % every == 0 or run.step == steps:
            run.curve.append((run.step, loss))
        due = opts.eval_every and run.step % opts.eval_every == 0
        if data.eval_ids is not None and (due or run.step == steps):
            run.evals.append((run.step, perplexity(model, data.eval_ids, opts.batch_size, acc.device)))
        if path is not None and opts.checkpoint_every and run.step % opts.checkpoint_every == 0:
            if acc.is_main_process:
                save_checkpoint(path, run.state(key))
            acc.wait_for_everyone()
        rate = (run.step - first) * opts.tokens_per_step(world) / max(time.perf_counter() - t0, 1e-9)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{rate:.0f}")
        log.debug("distill step %d/%d loss %.5f", run.step, steps, loss)
        _after_step(run.step)
    bar.close()
