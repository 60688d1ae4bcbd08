"""Recovery on the reference model: one-shot perplexity, then after distillation at two budgets.

    python examples/benchmarks/recovery_quality.py [--tokens 1000000,4000000] [--rows ...]
        [--device cuda] [--threads N]
    python examples/benchmarks/recovery_quality.py --tokens 8192,16384 --rows sparsegpt70 \\
        --max-tokens 8192          # a quick run (a few minutes on a CPU)

Compresses ../shared/ref-lm/pycoder-19m with each row's recipe (calibration: ``--nsamples``
windows of ``--calib-seqlen`` tokens from calib.txt), scores perplexity on eval.txt
(non-overlapping 256-token windows, fp32 math; ``--max-tokens`` scores only the first N), then
for each ``--tokens`` budget runs the recipe again with a ``distill`` stage after the
compression (training on calib.txt, windows of ``--seqlen``, the teacher the dense model as it
was before the first stage) and scores it again. Columns: the one-shot perplexity, the
perplexity after recovery, training wall time and tokens/s per budget, and the share of the
one-shot gap to the dense model that the largest budget closed.

Rows (``--rows``): 50 % structured (Minitron-style and FLAP, heads + neurons) with CE only, KL
only and KL + SquareHead; 70 % unstructured SparseGPT; 2:4 SparseGPT; 3-bit GPTQ g128 trained
through the straight-through estimator; gradual pruning from 50 % to 70 % during training
(``gradual70``) against one-shot SparseGPT 70 % plus recovery (``sparsegpt70``) at equal tokens.
Unstructured, 2:4, 3-bit and gradual rows use the ``sparse-finetune`` preset (CE 1 + SquareHead 1,
Kurtic et al.).

The one-shot model is compressed once per row; each budget recompresses it (same seed, the same
model) because a recipe's ``distill`` stage must follow a compression stage in the same run.

Measured (2026-12-06) only as a quick CPU run, 2 CPU cores shared with other jobs (the train
seconds and tokens/s are noisy); the default 1M/4M budgets need a GPU (5M training tokens per
row at ~100 tokens/s is ~14 hours on these cores). ``--tokens 8192,32768 --max-tokens 16384
--seqlen 256 --batch-size 4 --lr 3e-4 --nsamples 32 --threads 2`` (``--prune-every 4``):

| row | one-shot ppl | ppl after 8.192k | train s 8.192k | tokens/s 8.192k | ppl after 32.768k | train s 32.768k | tokens/s 32.768k | gap closed at 32.768k % |
|---|---|---|---|---|---|---|---|---|
| dense | 7.258 | - | - | - | - | - | - | - |
| minitron-ce | 98.834 | 24.339 | 48 | 172 | 19.158 | 351 | 93 | 87 |
| minitron-kl+sqh | 98.834 | 22.676 | 112 | 73 | 17.296 | 128 | 256 | 89 |
| sparsegpt70 | 17.666 | 14.543 | 69 | 119 | 13.130 | 778 | 42 | 44 |
| minitron-kl | 98.834 | 23.509 | 33 | 251 | 18.215 | 182 | 180 | 88 |
| gradual70 | 8.508 (at 50 %) | 50.276 | 182 | 45 | 107818.668 | 264 | 124 | - |

Even at 8k-33k tokens (under 1 % of the default budgets) recovery closes most of the
50 % structured gap, and KL + SquareHead beats CE alone at equal tokens (17.3 against 19.2 at 32k);
70 % SparseGPT closes 44 % of its (smaller) gap. ``gradual70`` (its one-shot column: SparseGPT
at 50 %, where it starts) is far worse than one-shot 70 % plus recovery at 8k tokens (50.3
against 14.5): over 8 steps the cubic ramp prunes the last 20 % by score without SparseGPT's
reconstruction and reaches 70 % after 6 of them, leaving 2 steps to recover; the papers'
gradual runs are thousands of steps long. At 32k tokens (32 steps, a Fisher re-selection every
4) it diverges to a perplexity of 1e5: not explained yet (a fault of the schedule, the Fisher
score or the lr 3e-4 with masks changing under AdamW's moments); to investigate before its
numbers mean anything. KL alone sits between CE and KL + SquareHead at both budgets (23.5 and
18.2). Not yet measured: FLAP, 2:4, 3-bit GPTQ, and every row at 1M/4M tokens.
"""

from __future__ import annotations

import argparse
import copy
import logging
import time
from pathlib import Path
from typing import Any

import torch
from _common import REF_LM, print_table

import llmpress
from llmpress.cli.evaluate import perplexity_of_windows, text_windows
from llmpress.errors import RecipeError
from llmpress.format.loading import load_model

log = logging.getLogger("recovery_quality")

CE = {"ce": 1.0, "kl": 0.0, "squarehead": 0.0}
KL = {"ce": 0.0, "kl": 1.0, "squarehead": 0.0}
KL_SQH = {"ce": 0.0, "kl": 1.0, "squarehead": 1.0}
SPARSE_FT = {"preset": "sparse-finetune"}
HALF_WIDTH = {"ratio": 0.5, "structures": ["heads", "neurons"]}
#: gradual pruning inside the recovery stage: 50 % -> 70 % on a cubic schedule, the mask
#: re-selected every ``--prune-every`` steps by a diagonal-Fisher score; it starts from
#: one-shot SparseGPT at 50 %
GRADUAL = {"from": 0.5, "to": 0.7, "every": 16, "score": "fisher"}

#: row -> (compression stages, distill-stage loss options)
ROWS: dict[str, tuple[list[dict[str, Any]], dict[str, Any]]] = {
    "minitron-ce": ([{"method": "minitron", **HALF_WIDTH}], CE),
    "minitron-kl": ([{"method": "minitron", **HALF_WIDTH}], KL),
    "minitron-kl+sqh": ([{"method": "minitron", **HALF_WIDTH}], KL_SQH),
    "flap-ce": ([{"method": "flap", **HALF_WIDTH}], CE),
    "flap-kl": ([{"method": "flap", **HALF_WIDTH}], KL),
    "flap-kl+sqh": ([{"method": "flap", **HALF_WIDTH}], KL_SQH),
    "sparsegpt70": ([{"method": "sparsegpt", "sparsity": 0.7}], SPARSE_FT),
    "sparsegpt24": ([{"method": "sparsegpt", "sparsity": 0.5, "pattern": "2:4"}], SPARSE_FT),
    "gptq3-g128": ([{"method": "gptq", "bits": 3, "group_size": 128}], {**SPARSE_FT, "train": "weights"}),
    "gradual70": ([{"method": "sparsegpt", "sparsity": 0.5}], {**SPARSE_FT, "schedule": GRADUAL}),
}


def _budget_label(n: int) -> str:
    return f"{n / 1e6:g}M" if n >= 1_000_000 else f"{n / 1e3:g}k"


def _parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(REF_LM / "pycoder-19m"))
    ap.add_argument("--eval", default=str(REF_LM / "eval.txt"))
    ap.add_argument("--calib", default=str(REF_LM / "calib.txt"))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--rows", default=",".join(ROWS), help="comma-separated, of: " + ", ".join(ROWS))
    ap.add_argument("--tokens", default="1000000,4000000", help="training budgets (tokens), comma-separated")
    ap.add_argument("--nsamples", type=int, default=64, help="calibration windows of the compression")
    ap.add_argument("--calib-seqlen", type=int, default=256)
    ap.add_argument("--seqlen", type=int, default=512, help="training window length")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--warmup", type=float, default=0.05, help="fraction of the steps")
    ap.add_argument("--prune-every", type=int, default=16, help="gradual70: steps between mask updates")
    ap.add_argument("--max-tokens", type=int, default=None, help="score only the first N eval tokens")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    unknown = [r for r in a.rows.split(",") if r not in ROWS]
    if unknown:
        ap.error(f"unknown row(s) {', '.join(unknown)}; choose from {', '.join(ROWS)}")
    a.budgets = [int(float(t)) for t in a.tokens.split(",")]
    one_step = a.batch_size * a.seqlen * a.grad_accum
    if min(a.budgets) < one_step:
        ap.error(f"a budget of {min(a.budgets)} tokens is smaller than one step ({one_step} tokens)")
    return a


def _distill_stage(a: argparse.Namespace, loss: dict[str, Any], tokens: int) -> dict[str, Any]:
    if "schedule" in loss:
        loss = {**loss, "schedule": {**loss["schedule"], "every": a.prune_every}}
    return {
        "method": "distill",
        **loss,
        "tokens": tokens,
        "seqlen": a.seqlen,
        "batch_size": a.batch_size,
        "grad_accum": a.grad_accum,
        "lr": a.lr,
        "warmup": a.warmup,
        "seed": a.seed,
        "data": a.calib,
    }


def _run(
    a: argparse.Namespace, dense: torch.nn.Module, tok: Any, stages: list[dict[str, Any]]
) -> tuple[torch.nn.Module, Any, float]:
    """Compress a copy of ``dense`` with ``stages``; (model, result, seconds)."""
    model = copy.deepcopy(dense)
    t = time.perf_counter()
    model, result = llmpress.compress(
        model,
        {"stages": stages},
        a.calib,
        tokenizer=tok,
        nsamples=a.nsamples,
        seqlen=a.calib_seqlen,
        seed=a.seed,
        device=a.device,
        progress=False,
    )
    return model, result, time.perf_counter() - t


def _row(
    a: argparse.Namespace,
    name: str,
    dense: torch.nn.Module,
    tok: Any,
    windows: torch.Tensor,
    ppl_dense: float,
) -> dict[str, Any]:
    """One table row: one-shot perplexity, then per budget perplexity, wall time and tokens/s."""
    stages, loss = ROWS[name]
    model, _, dt = _run(a, dense, tok, stages)
    row: dict[str, Any] = {
        "row": name,
        "oneshot": perplexity_of_windows(model, windows, batch_size=32)["perplexity"],
    }
    row["compress_s"] = dt
    del model
    for budget in a.budgets:
        b = _budget_label(budget)
        model, result, dt = _run(a, dense, tok, [*stages, _distill_stage(a, loss, budget)])
        rec = result.recovery or {}
        row[f"ppl {b}"] = perplexity_of_windows(model, windows, batch_size=32)["perplexity"]
        row[f"s {b}"] = float(rec.get("wall_s", dt))
        row[f"tok/s {b}"] = float(rec.get("tokens_per_s", budget / dt))
        del model
        log.info(
            "%s %s: %s", name, b, {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}
        )
    last = row[f"ppl {_budget_label(a.budgets[-1])}"]
    gap = row["oneshot"] - ppl_dense
    # a gradual row's one-shot model is its starting point (a lower sparsity): no gap to close
    row["closed"] = 100 * (row["oneshot"] - last) / gap if gap > 0 and "schedule" not in loss else None
    return row


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    a = _parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.backends.cuda.matmul.allow_tf32 = False
    dense, tok = load_model(a.model, dtype=torch.float32, device=a.device)
    windows = text_windows(tok, Path(a.eval).read_text(encoding="utf-8"), 256, a.max_tokens)
    ppl_dense = perplexity_of_windows(dense, windows, batch_size=32)["perplexity"]
    rows: list[dict[str, Any]] = [{"row": "dense", "oneshot": ppl_dense}]
    for name in a.rows.split(","):
        try:
            rows.append(_row(a, name, dense, tok, windows, ppl_dense))
        except RecipeError as e:  # an option this version's distill stage lacks (e.g. schedule:)
            log.warning("%s: skipped: %s", name, e)
            rows.append({"row": name, "note": f"skipped: {e}"})
    print(
        f"\nperplexity on {a.eval} ({windows.shape[0]} windows x 256 tokens); compression calibrated on "
        f"{a.nsamples} x {a.calib_seqlen} tokens of {a.calib}; recovery trained on {a.calib} in windows of "
        f"{a.seqlen}, batch {a.batch_size} x {a.grad_accum}, lr {a.lr:g}, warmup {a.warmup:g}; device "
        f"{a.device}, {torch.get_num_threads()} threads\n"
    )
    columns = [("row", "row", ""), ("oneshot", "one-shot ppl", ".3f")]
    for budget in a.budgets:
        b = _budget_label(budget)
        columns += [(f"ppl {b}", f"ppl after {b}", ".3f"), (f"s {b}", f"train s {b}", ".0f")]
        columns += [(f"tok/s {b}", f"tokens/s {b}", ".0f")]
    columns += [("closed", f"gap closed at {_budget_label(a.budgets[-1])} %", ".0f")]
    if any("note" in r for r in rows):
        columns.append(("note", "note", ""))
    print_table(rows, columns)


if __name__ == "__main__":
    main()
