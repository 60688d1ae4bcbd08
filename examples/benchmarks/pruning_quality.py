"""Pruning quality on the reference model: perplexity of each method at 50 % and 2:4.

    python examples/benchmarks/pruning_quality.py [--device cuda]
    python examples/benchmarks/pruning_quality.py --table admm [--threads 1 --max-tokens 32768]

Prunes ../shared/ref-lm/pycoder-19m with each built-in method (64 calibration windows of
256 tokens from calib.txt), then scores perplexity on eval.txt over non-overlapping
256-token windows of the whole file (fp32 math), next to the dense model and the numbers
the methods' reference implementations give on the same model.

``--table admm`` (issue 22): SparseGPT, ADMM (cubic and final mask schedules), Wanda and
DSnoT on top of Wanda, SparseGPT and ADMM, at 50/60/70/80 % and 2:4: perplexity per
sparsity and the compress time summed over the five settings.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from _common import REF_LM, compare_to_reference, print_table

import llmpress
from llmpress.cli.evaluate import perplexity_of_windows, text_windows
from llmpress.format.loading import load_model

# reference implementations (the papers' code) on this model, 64 x 256 calibration
REFERENCE = {
    ("dense", "-"): 5.831,
    ("magnitude", "unstructured"): 8.437,
    ("magnitude", "2:4"): 17.199,
    ("wanda", "unstructured"): 7.796,
    ("wanda", "2:4"): 12.541,
    ("sparsegpt", "unstructured"): 6.992,
    ("sparsegpt", "2:4"): 8.824,
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(REF_LM / "pycoder-19m"))
    ap.add_argument("--eval", default=str(REF_LM / "eval.txt"))
    ap.add_argument("--calib", default=str(REF_LM / "calib.txt"))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-tokens", type=int, default=None, help="score only the first N eval tokens")
    ap.add_argument("--methods", default="magnitude,wanda,sparsegpt")
    ap.add_argument("--patterns", default="unstructured,2:4")
    ap.add_argument("--table", choices=["methods", "admm"], default="methods")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--rows", default=None, help="--table admm: only these rows (comma-separated labels)")
    a = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    if a.threads:
        torch.set_num_threads(a.threads)

    _, tok = load_model(a.model)
    windows = text_windows(tok, Path(a.eval).read_text(encoding="utf-8"), 256, a.max_tokens)

    def fresh():
        m, _ = load_model(a.model, dtype=torch.float32, device=a.device)
        return m

    if a.table == "admm":
        admm_table(a, tok, windows, fresh)
        return

    rows = []
    dense = fresh()
    ppl = perplexity_of_windows(dense, windows, batch_size=32)["perplexity"]
    rows.append(
        {"method": "dense", "pattern": "-", "ppl": ppl, "ref": REFERENCE[("dense", "-")], "time": 0.0}
    )
    del dense
    for method in a.methods.split(","):
        for pattern in a.patterns.split(","):
            model = fresh()
            recipe = {"stages": [{"method": method, "sparsity": 0.5, "pattern": pattern}]}
            if a.device.startswith("cuda"):
                torch.cuda.synchronize()
            t = time.perf_counter()
            llmpress.compress(
                model,
                recipe,
                a.calib,
                tokenizer=tok,
                nsamples=a.nsamples,
                seqlen=a.seqlen,
                seed=a.seed,
                device=a.device,
                progress=False,
            )
            if a.device.startswith("cuda"):
                torch.cuda.synchronize()
            dt = time.perf_counter() - t
            ppl = perplexity_of_windows(model, windows, batch_size=32)["perplexity"]
            rows.append(
                {
                    "method": method,
                    "pattern": pattern,
                    "ppl": ppl,
                    "ref": REFERENCE.get((method, pattern)),
                    "time": dt,
                }
            )
            del model
    compare_to_reference(rows, 1.5)
    print(
        f"\nperplexity on {a.eval} ({windows.shape[0]} windows x 256 tokens), calibration {a.nsamples} x {a.seqlen}, device {a.device}\n"
    )
    print_table(
        rows,
        [
            ("method", "method", ""),
            ("pattern", "pattern", ""),
            ("ppl", "perplexity", ".3f"),
            ("ref", "reference", ".3f"),
            ("delta", "vs reference %", "+.2f"),
            ("ok", "within 1.5 %", ""),
            ("time", "compress time s", ".2f"),
        ],
    )


# issue 22: (label, stage options without the sparsity) and the settings of the table
ADMM_ROWS = [
    ("sparsegpt", {"method": "sparsegpt"}),
    ("admm (cubic)", {"method": "admm", "schedule": "cubic"}),
    ("admm (final)", {"method": "admm", "schedule": "final"}),
    ("wanda", {"method": "wanda"}),
    ("wanda + dsnot", {"method": "wanda", "dsnot": {}}),
    ("sparsegpt + dsnot", {"method": "sparsegpt", "dsnot": {}}),
    ("admm + dsnot", {"method": "admm", "dsnot": {}}),
]
ADMM_SETTINGS = [("50%", {"sparsity": 0.5}), ("60%", {"sparsity": 0.6}), ("70%", {"sparsity": 0.7}),
                 ("80%", {"sparsity": 0.8}), ("2:4", {"pattern": "2:4"})]  # fmt: skip


def admm_table(a: argparse.Namespace, tok: object, windows: torch.Tensor, fresh) -> None:  # noqa: ANN001
    """Perplexity of each ADMM/DSnoT row at each setting, and its summed compress time."""
    dense = perplexity_of_windows(fresh(), windows, batch_size=32)["perplexity"]
    rows: list[dict] = [{"method": "dense", **{c: dense for c, _ in ADMM_SETTINGS}, "time": 0.0}]
    only = None if a.rows is None else set(a.rows.split(","))
    if only is not None and not only <= {label for label, _ in ADMM_ROWS}:
        raise SystemExit(f"--rows: unknown {sorted(only - {label for label, _ in ADMM_ROWS})}")
    for label, stage in ADMM_ROWS:
        if only is not None and label not in only:
            continue
        row: dict = {"method": label, "time": 0.0}
        for col, target in ADMM_SETTINGS:
            model = fresh()
            t = time.perf_counter()
            llmpress.compress(model, {"stages": [{**stage, **target}]}, a.calib, tokenizer=tok,
                              nsamples=a.nsamples, seqlen=a.seqlen, seed=a.seed, device=a.device,
                              progress=False)  # fmt: skip
            if a.device.startswith("cuda"):
                torch.cuda.synchronize()
            row["time"] += time.perf_counter() - t
            row[col] = perplexity_of_windows(model, windows, batch_size=32)["perplexity"]
            print(f"{label} {col}: {row[col]:.3f}", flush=True)
            del model
        rows.append(row)
    print(
        f"\nperplexity on {a.eval} ({windows.shape[0]} windows x 256 tokens), calibration "
        f"{a.nsamples} x {a.seqlen}, device {a.device}, threads {torch.get_num_threads()}\n"
    )
    cols = [("method", "method", "")] + [(c, c, ".3f") for c, _ in ADMM_SETTINGS]
    print_table(rows, [*cols, ("time", "compress time s (all 5)", ".1f")])


if __name__ == "__main__":
    main()
