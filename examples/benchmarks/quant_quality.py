"""Quantization quality and on-disk size on the reference model.

    python examples/benchmarks/quant_quality.py [--device cuda] [--rows main|eora]

Quantizes ../shared/ref-lm/pycoder-19m with RTN and GPTQ (asymmetric, 64 calibration
windows of 256 tokens from calib.txt), saves each in llmpress's packed format, and prints
perplexity on eval.txt (non-overlapping 256-token windows, fp32 math) and the size on disk
next to the dense model and the reference GPTQ code's numbers on the same model.

``--rows eora``: low-rank compensation of 3-bit GPTQ and of SparseGPT 2:4 + GPTQ 4-bit, each
with no compensation, plain SVD (``eora`` with ``basis: identity``) and EoRA at ranks 8 and 32
(:func:`eora_configs`); sizes on disk include the fp16 low-rank factors.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from _common import REF_LM, compare_to_reference, print_table

import llmpress
from llmpress.cli.evaluate import perplexity_of_windows, text_windows
from llmpress.format.loading import load_model

Q4 = {"bits": 4, "group_size": 128}
Q3 = {"bits": 3, "group_size": 128}
SP24 = {"method": "sparsegpt", "sparsity": 0.5, "pattern": "2:4"}
# (name, stages, reference perplexity from the reference GPTQ/SparseGPT code on this model)
CONFIGS = [
    ("RTN 4-bit g128", [{"method": "rtn", **Q4}], 6.018),
    ("GPTQ 4-bit g128", [{"method": "gptq", **Q4}], 5.949),
    ("RTN 3-bit g128", [{"method": "rtn", **Q3}], 6.991),
    ("GPTQ 3-bit g128", [{"method": "gptq", **Q3}], 6.558),
    ("GPTQ 3-bit g128 act-order", [{"method": "gptq", **Q3, "act_order": True}], 6.505),
    (
        "RTN 2:4 + 4-bit g128",
        [{"method": "magnitude", "pattern": "2:4", "group": "row"}, {"method": "rtn", **Q4}],
        None,
    ),
    ("GPTQ 2:4 + 4-bit g128", [SP24, {"method": "gptq", **Q4}], None),
    ("SparseGPT 2:4 + 4-bit per-channel", [SP24, {"method": "gptq", "bits": 4, "group_size": -1}], 9.051),
]


def eora_configs() -> list[tuple[str, list[dict], float | None]]:
    """The ``--rows eora`` rows: each compression alone, then with plain SVD and EoRA paths."""
    bases = [
        ("GPTQ 3-bit g128", [{"method": "gptq", **Q3}]),
        ("SparseGPT 2:4 + GPTQ 4-bit g128", [SP24, {"method": "gptq", **Q4}]),
    ]
    rows: list[tuple[str, list[dict], float | None]] = []
    for name, stages in bases:
        rows.append((name, stages, None))
        for rank in (8, 32):
            for label, basis in (("SVD", "identity"), ("EoRA", "activations")):
                rows.append(
                    (
                        f"{name} + {label} r{rank}",
                        [*stages, {"method": "eora", "rank": rank, "basis": basis}],
                        None,
                    )
                )
    return rows


def dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(REF_LM / "pycoder-19m"))
    ap.add_argument("--eval", default=str(REF_LM / "eval.txt"))
    ap.add_argument("--calib", default=str(REF_LM / "calib.txt"))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=None, help="score only the first N eval tokens")
    ap.add_argument("--only", default=None, help="comma-separated substrings of config names to run")
    ap.add_argument("--rows", default="main", choices=["main", "eora"], help="which table: main or eora")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.backends.cuda.matmul.allow_tf32 = False

    _, tok = load_model(a.model)
    windows = text_windows(tok, Path(a.eval).read_text(encoding="utf-8"), 256, a.max_tokens)
    out_root = Path(tempfile.mkdtemp(prefix="llmpress-qq-"))
    dense, _ = load_model(a.model, dtype=torch.float32, device=a.device)
    dense_dir = out_root / "dense"
    llmpress.save_compressed(dense, dense_dir, dtype=torch.float16)
    rows = [
        {
            "name": "dense fp16",
            "ppl": perplexity_of_windows(dense, windows, 32)["perplexity"],
            "ref": 5.831,
            "mb": dir_size(dense_dir) / 1e6,
            "time": 0.0,
        }
    ]
    del dense
    for name, stages, ref in CONFIGS if a.rows == "main" else eora_configs():
        if a.only and not any(s.strip() in name for s in a.only.split(",")):
            continue
        model, _ = load_model(a.model, dtype=torch.float32, device=a.device)
        t = time.perf_counter()
        model, report = llmpress.compress(
            model,
            {"stages": stages},
            a.calib,
            tokenizer=tok,
            nsamples=a.nsamples,
            seqlen=a.seqlen,
            device=a.device,
            progress=False,
        )
        dt = time.perf_counter() - t
        ppl = perplexity_of_windows(model, windows, 32)["perplexity"]
        row = {"name": name, "ppl": ppl, "ref": ref, "time": dt}
        save = getattr(llmpress, "save_quantized", None)
        if save is not None:
            d = out_root / name.replace(" ", "_").replace(":", "of")
            save(model, d, report=report, dtype=torch.float16)
            row["mb"] = dir_size(d) / 1e6
        rows.append(row)
        print(f"{name}: perplexity {ppl:.3f}, {row.get('mb', 0):.2f} MB, {dt:.0f} s", flush=True)
        del model
    compare_to_reference(rows, 1.0)
    print(
        f"\nperplexity on {a.eval} ({windows.shape[0]} windows x 256), calibration {a.nsamples} x {a.seqlen}, {a.device}\n"
    )
    print_table(
        rows,
        [
            ("name", "config", ""),
            ("ppl", "perplexity", ".3f"),
            ("ref", "reference", ".3f"),
            ("delta", "vs reference %", "+.2f"),
            ("ok", "within 1 %", ""),
            ("mb", "safetensors MB", ".2f"),
            ("time", "compress s", ".1f"),
        ],
    )


if __name__ == "__main__":
    main()
