"""End-to-end decode speed of a Llama model loaded through ``from_pretrained``: dense vs int8 vs int4.

    python examples/benchmarks/generate.py              # GPU: Llama-2-7B-sized config, fp16 / int8 / int4
    python examples/benchmarks/generate.py --device cpu # CPU: TinyLlama-1.1B-sized config, fp32 / bf16 / int8 / int4

The model has random weights (no download): it is saved once as a dense checkpoint, then
quantized with RTN (int8 per channel, int4 with groups of 128, symmetric) and saved packed
by llmpress; each variant is loaded with ``AutoModelForCausalLM.from_pretrained`` (the
runtime picks its kernels at load) and decodes greedily with a KV cache at batch 1 and 16.
Decode speed is (new tokens x batch) / (time of generating N+1 tokens - time of generating 1),
so the prompt's prefill is not counted. Targets (issue 12): GPU int4 >= 2.2x fp16 at batch 1;
CPU int4 and int8 faster than fp32 at batch 1. On CPU the quantized models also run with
their unquantized layers (embeddings, lm_head, norms) in bf16 (``int4+bf16``), as in the bf16
model.
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time
from pathlib import Path

import torch
from _common import print_table

import llmpress

GPU_CONFIG = dict(  # Llama-2-7B
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    vocab_size=32000,
)
CPU_CONFIG = dict(  # TinyLlama-1.1B
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=22,
    num_attention_heads=32,
    num_key_value_heads=4,
    vocab_size=32000,
)
SMALL_CONFIG = dict(  # for a quick check of the script
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=1000,
)
VARIANTS = {
    "int8": {"method": "rtn", "bits": 8, "group_size": -1, "symmetric": True},
    "int4": {"method": "rtn", "bits": 4, "group_size": 128, "symmetric": True},
}


def decode_speed(model, batch: int, new_tokens: int, prompt: int, device: str) -> float:
    """Decode tokens per second (all sequences of the batch together)."""
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt), device=device)

    def run(n: int) -> float:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    run(2)  # warm-up (kernels, autotuning)
    t1 = min(run(1) for _ in range(2))
    tn = min(run(new_tokens + 1) for _ in range(2))
    return new_tokens * batch / (tn - t1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--small", action="store_true", help="a tiny config, to check the script")
    p.add_argument("--new-tokens", type=int, default=None)
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--only", default=None, help="comma-separated model labels to run (e.g. int4,int4+bf16)")
    a = p.parse_args()
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    dev = a.device
    gpu = dev.startswith("cuda")
    cfg = LlamaConfig(**(SMALL_CONFIG if a.small else GPU_CONFIG if gpu else CPU_CONFIG))
    new_tokens = a.new_tokens or (64 if gpu else 16)
    dense_dtypes = [torch.float16] if gpu else [torch.float32, torch.bfloat16]
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        dense_dir = Path(tmp) / "dense"
        torch.manual_seed(0)
        with torch.device("cpu"):
            model = LlamaForCausalLM(cfg).to(torch.float16)
        model.save_pretrained(dense_dir)
        del model
        for name, recipe in VARIANTS.items():
            if a.only and not any(v.split("+")[0] == name for v in a.only.split(",")):
                continue
            model = AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float32)
            llmpress.compress(model, [recipe])
            llmpress.save_quantized(model, Path(tmp) / name, dtype=torch.float16 if gpu else torch.bfloat16)
            del model
            gc.collect()
        variants = [(str(d).removeprefix("torch."), dense_dir, d) for d in dense_dtypes]
        variants += [(n, Path(tmp) / n, torch.float16 if gpu else torch.float32) for n in VARIANTS]
        if not gpu:  # the layers left unquantized (embeddings, lm_head, norms) in bf16, as in the bf16 model
            variants += [(f"{n}+bf16", Path(tmp) / n, torch.bfloat16) for n in VARIANTS]
        if a.only:
            variants = [v for v in variants if v[0] in a.only.split(",")]
        for label, path, dtype in variants:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=dev).eval()
            kernels = sorted(
                {m.kernel.name for m in model.modules() if getattr(m, "kernel", None) is not None}
            )
            size = sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 2**30
            for b in a.batches:
                with torch.inference_mode():
                    tps = decode_speed(model, b, new_tokens, a.prompt, dev)
                rows.append(
                    {
                        "model": label,
                        "kernels": ",".join(kernels) or "dense",
                        "GiB": size,
                        "batch": b,
                        "tps": tps,
                    }
                )
                print(f"{label} batch {b}: {tps:.1f} tokens/s", flush=True)
            del model
            gc.collect()
    base = {r["batch"]: r["tps"] for r in rows if r["model"] == str(dense_dtypes[0]).removeprefix("torch.")}
    for r in rows:
        r["x"] = r["tps"] / base[r["batch"]] if r["batch"] in base else None
    name = torch.cuda.get_device_name() if gpu else f"CPU ({torch.get_num_threads()} threads)"
    print(
        f"\n{name}; {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}; {new_tokens} new tokens after a {a.prompt}-token prompt"
    )
    print_table(
        rows,
        [
            ("model", "model", ""),
            ("kernels", "kernels", ""),
            ("GiB", "GiB", ".2f"),
            ("batch", "batch", "d"),
            ("tps", "tokens/s", ".1f"),
            ("x", f"vs {str(dense_dtypes[0]).removeprefix('torch.')}", ".2f"),
        ],
    )


if __name__ == "__main__":
    main()
