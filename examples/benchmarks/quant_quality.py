"""Quantization quality and on-disk size on the reference model.

    python examples/benchmarks/quant_quality.py [--device cuda] [--rows spqr]

Quantizes ../shared/ref-lm/pycoder-19m with RTN and GPTQ (asymmetric, 64 calibration
windows of 256 tokens from calib.txt), saves each in llmpress's packed format, and prints
perplexity on eval.txt (non-overlapping 256-token windows, fp32 math) and the size on disk
next to the dense model and the reference GPTQ code's numbers on the same model.
``--rows spqr``: GPTQ against SpQR (Dettmers et al.) at about the same stored bits per weight of
the quantized layers (codes, both levels of statistics and outliers, as saved).
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


# SpQR at about 3.2, 3.9 and 4.6 stored bits per weight against GPTQ at 3 and 4 bits
SPQR = {"method": "spqr", "act_order": True}
SPQR_CONFIGS = [
    ("GPTQ 3-bit g128", [{"method": "gptq", **Q3}], 6.558),
    ("GPTQ 3-bit g128 act-order", [{"method": "gptq", **Q3, "act_order": True}], 6.505),
    (
        "SpQR w3 b1=32 b2=32 tau=0.45 (~3.2)",
        [{**SPQR, "group_size": 32, "stat_group_size": 32, "outlier_threshold": 0.45}],
        None,
    ),
    ("GPTQ 4-bit g128", [{"method": "gptq", **Q4}], 5.949),
    ("GPTQ 4-bit g128 act-order", [{"method": "gptq", **Q4, "act_order": True}], None),
    ("SpQR w3 b1=16 b2=16 tau=0.2 (~3.9)", [{**SPQR, "outlier_threshold": 0.2}], None),
    ("SpQR w4 b1=16 b2=16 tau=1 (~4.6)", [{**SPQR, "bits": 4, "outlier_threshold": 1.0}], None),
    ("SpQR w3 b1=16 b2=16 tau=0.6", [{**SPQR, "outlier_threshold": 0.6}], None),
    ("SpQR w3 b1=16 b2=16 tau=1.5", [{**SPQR, "outlier_threshold": 1.5}], None),
    (
        "SpQR w3 b1=16 b2=16 tau=0.6 no act-order",
        [{**SPQR, "outlier_threshold": 0.6, "act_order": False}],
        None,
    ),
    ("SpQR w3 b1=64 b2=16 tau=2", [{**SPQR, "group_size": 64, "outlier_threshold": 2.0}], None),
]


def layer_bits(path: Path) -> float | None:
    """Stored bits per weight of the packed layers of a saved folder (everything their format
    stores but the bias), from the safetensors headers."""
    import json

    from llmpress.format.checkpoint import read_header

    modules = json.loads((path / "config.json").read_text()).get("quantization_config", {}).get("modules", {})
    headers = {k: h for f in path.glob("*.safetensors") for k, h in read_header(f).items()}
    weights = sum(m["in_features"] * m["out_features"] for m in modules.values())
    owned = [
        h.nbytes for k, h in headers.items() if k.rpartition(".")[0] in modules and not k.endswith(".bias")
    ]
    return 8 * sum(owned) / weights if weights else None


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
    ap.add_argument("--rows", choices=("default", "spqr"), default="default", help="which table to run")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--skip-dense", action="store_true", help="leave out the dense row")
    a = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    if a.threads:
        torch.set_num_threads(a.threads)
    configs = SPQR_CONFIGS if a.rows == "spqr" else CONFIGS

    _, tok = load_model(a.model)
    windows = text_windows(tok, Path(a.eval).read_text(encoding="utf-8"), 256, a.max_tokens)
    out_root = Path(tempfile.mkdtemp(prefix="llmpress-qq-"))
    dense, _ = load_model(a.model, dtype=torch.float32, device=a.device)
    dense_dir = out_root / "dense"
    llmpress.save_compressed(dense, dense_dir, dtype=torch.float16)
    rows = [
        {
            "name": "dense fp16",
            "ppl": float("nan") if a.skip_dense else perplexity_of_windows(dense, windows, 32)["perplexity"],
            "ref": 5.831,
            "mb": dir_size(dense_dir) / 1e6,
            "time": 0.0,
        }
    ]
    del dense
    for name, stages, ref in configs:
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
            row["bits"] = layer_bits(d)
        rows.append(row)
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
            ("bits", "layer bits/weight", ".3f"),
            ("mb", "safetensors MB", ".2f"),
            ("time", "compress s", ".1f"),
        ],
    )


if __name__ == "__main__":
    main()
