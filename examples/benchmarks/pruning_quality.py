"""Pruning quality on the reference model: perplexity of each method at 50 % and 2:4.

    python examples/benchmarks/pruning_quality.py [--device cuda]

Prunes ../shared/ref-lm/pycoder-19m with each built-in method (64 calibration windows of
256 tokens from calib.txt), then scores perplexity on eval.txt over non-overlapping
256-token windows of the whole file (fp32 math), next to the dense model and the numbers
the methods' reference implementations give on the same model.
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
    a = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False

    _, tok = load_model(a.model)
    windows = text_windows(tok, Path(a.eval).read_text(encoding="utf-8"), 256, a.max_tokens)

    def fresh():
        m, _ = load_model(a.model, dtype=torch.float32, device=a.device)
        return m

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


if __name__ == "__main__":
    main()
