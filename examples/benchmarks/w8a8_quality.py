"""W8A8 quality and size on the reference model: FP8 and INT8 (with and without SmoothQuant).

    python examples/benchmarks/w8a8_quality.py [--max-tokens 131072]

Compresses ../shared/ref-lm/pycoder-19m, saves each result in llmpress's format, loads it
back with ``from_pretrained`` (so the activations are quantized exactly as at serving time,
with the ``dense`` kernel: exact simulation of the int8/fp8 GEMM) and prints perplexity on
eval.txt with the size on disk and the change against dense. Expected shape (Kurtic et al.,
"Give Me BF16 or Give Me Death", 2024): FP8 within 0.5 % of dense; INT8 with SmoothQuant and
GPTQ within 3 % and ahead of INT8 without smoothing. It also prints the inputs' outlier
ratio (largest per-channel max |x| over the median one) of the smoothed layers, before and
after SmoothQuant.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from _common import REF_LM, print_table
from transformers import AutoModelForCausalLM

import llmpress
from llmpress.cli.evaluate import perplexity_of_windows, text_windows
from llmpress.format.loading import load_model
from llmpress.format.runtime import select_kernels

INT8 = {"bits": 8, "group_size": -1, "symmetric": True, "activations": "int8"}
SQ = {"method": "smoothquant", "alpha": 0.5}
CONFIGS = [
    ("FP8 W8A8 dynamic", [{"method": "fp8"}]),
    ("FP8 W8A8 static", [{"method": "fp8", "activations": "static"}]),
    ("INT8 W8A8 RTN", [{"method": "rtn", **INT8}]),
    ("INT8 W8A8 GPTQ", [{"method": "gptq", **INT8}]),
    ("SmoothQuant + INT8 W8A8 RTN", [SQ, {"method": "rtn", **INT8}]),
    ("SmoothQuant + INT8 W8A8 GPTQ", [SQ, {"method": "gptq", **INT8}]),
    ("SmoothQuant + INT8 W8A8 GPTQ static", [SQ, {"method": "gptq", **INT8, "activations": "int8-static"}]),
    ("W4A16 GPTQ g128", [{"method": "gptq", "bits": 4, "group_size": 128}]),
]
PROBES = ("self_attn.q_proj", "mlp.gate_proj", "mlp.down_proj")


def dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


@torch.no_grad()
def outlier_ratio(model: torch.nn.Module, ids: torch.Tensor) -> dict[str, float]:
    """Mean over blocks of max_j max|x_j| / median_j max|x_j| for the inputs of PROBES."""
    acc: dict[str, list[float]] = {p: [] for p in PROBES}
    hooks = []
    for name, mod in model.named_modules():
        for p in PROBES:
            if name.endswith(p):

                def hook(m, inp, out, p=p):  # noqa: ANN001, ANN202
                    a = inp[0].abs().flatten(0, -2).amax(0)
                    acc[p].append(float(a.max() / a.median()))

                hooks.append(mod.register_forward_hook(hook))
    model(ids)
    for h in hooks:
        h.remove()
    return {p: sum(v) / len(v) for p, v in acc.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(REF_LM / "pycoder-19m"))
    ap.add_argument("--eval", default=str(REF_LM / "eval.txt"))
    ap.add_argument("--calib", default=str(REF_LM / "calib.txt"))
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=None, help="score only the first N eval tokens")
    ap.add_argument("--only", default=None, help="comma-separated substrings of config names to run")
    a = ap.parse_args()

    _, tok = load_model(a.model)
    windows = text_windows(tok, Path(a.eval).read_text(encoding="utf-8"), 256, a.max_tokens)
    probe_ids = windows[:4]
    out_root = Path(tempfile.mkdtemp(prefix="llmpress-w8a8-"))
    dense, _ = load_model(a.model, dtype=torch.float32)
    base = perplexity_of_windows(dense, windows, 32)["perplexity"]
    before = outlier_ratio(dense, probe_ids)
    llmpress.save_compressed(dense, out_root / "dense", dtype=torch.float16)
    rows = [{"name": "dense fp16", "ppl": base, "mb": dir_size(out_root / "dense") / 1e6, "delta": 0.0}]
    after: dict[str, float] = {}
    for name, stages in CONFIGS:
        if a.only and not any(x.strip() in name for x in a.only.split(",")):
            continue
        model, _ = load_model(a.model, dtype=torch.float32)
        t = time.perf_counter()
        model, report = llmpress.compress(
            model,
            {"stages": stages},
            a.calib,
            tokenizer=tok,
            nsamples=a.nsamples,
            seqlen=a.seqlen,
            progress=False,
        )
        dt = time.perf_counter() - t
        if stages[0] is SQ and not after:
            after = outlier_ratio(model, probe_ids)
        d = out_root / name.replace(" ", "_").replace("+", "")
        llmpress.save_quantized(model, d, report=report, dtype=torch.float16)
        del model
        loaded = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
        select_kernels(loaded, "dense")
        ppl = perplexity_of_windows(loaded, windows, 32)["perplexity"]
        rows.append(
            {"name": name, "ppl": ppl, "mb": dir_size(d) / 1e6, "delta": 100 * (ppl / base - 1), "time": dt}
        )
        print(f"{name}: {ppl:.3f}", flush=True)
        del loaded
    print(
        f"\nperplexity on {a.eval} ({windows.shape[0]} windows x 256), calibration {a.nsamples} x {a.seqlen}\n"
    )
    print_table(
        rows,
        [
            ("name", "config", ""),
            ("ppl", "perplexity", ".3f"),
            ("delta", "vs dense %", "+.2f"),
            ("mb", "safetensors MB", ".2f"),
            ("time", "compress s", ".1f"),
        ],
    )
    print("\ninput outlier ratio (max over median of per-channel max |x|), mean over blocks\n")
    print_table(
        [{"layer": p, "before": before[p], "after": after.get(p)} for p in PROBES],
        [("layer", "layer input", ""), ("before", "dense", ".1f"), ("after", "after SmoothQuant 0.5", ".1f")],
    )


if __name__ == "__main__":
    main()
