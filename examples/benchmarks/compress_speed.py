"""Compression speed and peak GPU memory on a Llama-3-8B-shaped model with random weights.

    python examples/benchmarks/compress_speed.py            # full 8B shape on a GPU
    python examples/benchmarks/compress_speed.py --small    # reduced config on CPU

Times each method end to end (calibration capture through compressed weights) with
128 x 2048 random calibration tokens, and reports peak GPU memory above the model's own
weights next to the budget "one block's weights + its statistics + calibration activations".
Baseline on one H200 (llm-compressor 0.14, same model and data): Wanda 75.6 s, SparseGPT ~400 s,
GPTQ 4-bit g128 194.7 s.
"""

from __future__ import annotations

import argparse
import gc
import time

import torch
from _common import print_table

import llmpress

BASELINE_S = {"wanda": 75.6, "sparsegpt": 400.0, "gptq": 194.7}
TARGET_S = {"wanda": 25.0, "sparsegpt": 130.0, "gptq": 65.0}
RECIPES = {
    "wanda": {"method": "wanda", "sparsity": 0.5},
    "sparsegpt": {"method": "sparsegpt", "sparsity": 0.5},
    "gptq": {"method": "gptq", "bits": 4, "group_size": 128},
}


def build(small: bool, device: str, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    if small:
        cfg = LlamaConfig(
            hidden_size=256,
            intermediate_size=896,
            num_hidden_layers=4,
            num_attention_heads=8,
            num_key_value_heads=2,
            vocab_size=4096,
            max_position_embeddings=2048,
        )
    else:
        cfg = LlamaConfig(
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            vocab_size=128256,
            max_position_embeddings=8192,
            rope_theta=500000.0,
        )
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    return model.eval()


def budget_bytes(model, nsamples: int, seqlen: int, act_bytes: int) -> int:
    """One block's weights + fp32 Hessians of its distinct inputs + block inputs and outputs."""
    block = model.model.layers[0]
    weights = sum(p.numel() * p.element_size() for p in block.parameters())
    c = model.config
    hess = 4 * (3 * c.hidden_size**2 + c.intermediate_size**2)
    acts = 2 * nsamples * seqlen * c.hidden_size * act_bytes
    return weights + hess + acts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="reduced config on CPU")
    ap.add_argument("--methods", default="wanda,sparsegpt,gptq")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=None)
    a = ap.parse_args()
    device = "cpu" if a.small or not torch.cuda.is_available() else "cuda"
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    if a.small:
        a.nsamples, a.seqlen = min(a.nsamples, 16), min(a.seqlen, 256)
    rows = []
    for method in a.methods.split(","):
        model = build(a.small, device, dtype)
        ids = torch.randint(
            0, model.config.vocab_size, (a.nsamples, a.seqlen), generator=torch.Generator().manual_seed(0)
        )
        model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        t = time.perf_counter()
        _, report = llmpress.compress(
            model, {"stages": [RECIPES[method]]}, ids, device=device, batch_size=a.batch_size, progress=False
        )
        if device == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t
        row = {
            "method": method,
            "time": dt,
            "sparsity": report.overall_sparsity,
            "model_gb": model_bytes / 2**30,
            "baseline": None if a.small else BASELINE_S.get(method),
            "target": None if a.small else TARGET_S.get(method),
        }
        if device == "cuda":
            row["peak_extra_gb"] = (torch.cuda.max_memory_allocated() - base) / 2**30
            row["budget_gb"] = budget_bytes(model, a.nsamples, a.seqlen, 2) / 2**30
        rows.append(row)
        del model, report
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    print(
        f"\n{'Llama-3-8B shape' if not a.small else 'small config'}, calibration {a.nsamples} x {a.seqlen}, device {device}\n"
    )
    print_table(
        rows,
        [
            ("method", "method", ""),
            ("time", "wall s", ".1f"),
            ("baseline", "llm-compressor 0.14 s", ".1f"),
            ("target", "target s", ".0f"),
            ("sparsity", "sparsity", ".3f"),
            ("model_gb", "model GiB", ".2f"),
            ("peak_extra_gb", "peak above model GiB", ".2f"),
            ("budget_gb", "budget GiB", ".2f"),
        ],
    )


if __name__ == "__main__":
    main()
