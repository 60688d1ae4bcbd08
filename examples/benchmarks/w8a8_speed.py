"""W8A8 speed on a GPU: linear layers and a 7B-sized Llama, fp16 against FP8 and INT8 W8A8.

    python examples/benchmarks/w8a8_speed.py            # CUDA (FP8 needs compute capability 8.9+)
    python examples/benchmarks/w8a8_speed.py --small    # a quick check of the script (CPU: simulated)

Part 1: for Llama-3-8B's layer shapes (out x in) and 1 to 4096 rows, the time of fp16
``torch.matmul`` and of packed FP8 / INT8 W8A8 layers with the kernel the runtime picks
(``cuda-fp8``: ``torch._scaled_mm``; ``cuda-int8``: ``torch._int_mm``), activation
quantization included. Part 2: prefill (2048-token prompt) and decode tokens per second of a
Llama-2-7B-sized model with random weights, quantized by llmpress, saved and loaded with
``from_pretrained``. Target (issue 11, H100/H200): FP8 prefill >= 1.4x fp16; torchao reports
1.46x prefill and 1.21x decode on H100.
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
from _common import print_table, timer

import llmpress
from llmpress.format.formats import ModuleFormat, pack_module
from llmpress.format.runtime import LlmpressLinear
from llmpress.model.results import LayerResult

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (1024, 4096)]
ROWS = [1, 16, 64, 256, 1024, 4096]


def packed_layer(weight: torch.Tensor, method: str, device: str) -> LlmpressLinear:
    """A runtime W8A8 layer made from ``weight`` by llmpress's own quantizers."""
    if method == "fp8":
        from llmpress.plugins.fp8 import FP8Config, fp8_quantize

        _, q = fp8_quantize(weight, FP8Config())
        fmt = ModuleFormat("fp8", weight.shape[1], weight.shape[0], activations="fp8-dynamic")
    else:
        from llmpress.plugins.rtn import RTNConfig, rtn_quantize

        _, q = rtn_quantize(weight, RTNConfig(bits=8, group_size=-1, symmetric=True, activations="int8"))
        fmt = ModuleFormat(
            "int",
            weight.shape[1],
            weight.shape[0],
            bits=8,
            group_size=-1,
            symmetric=True,
            activations="int8-dynamic",
        )
    layer = LlmpressLinear(fmt)
    for k, v in pack_module(fmt, weight, LayerResult(quant=q)).items():
        getattr(layer, k).copy_(v)
    return layer.to(device)


def layer_table(dev: str, shapes: list, rows: list[int]) -> None:
    gpu = dev.startswith("cuda")
    dtype = torch.float16 if gpu else torch.float32
    time_it = timer(dev, warmup=3, reps=20 if gpu else 3)
    table = []
    for n, k in shapes:
        w = torch.randn(n, k, device=dev, dtype=dtype) * 0.02
        fp8 = packed_layer(w.float().cpu(), "fp8", dev)
        int8 = packed_layer(w.float().cpu(), "int8", dev)
        for m in rows:
            x = torch.randn(m, k, device=dev, dtype=dtype)
            r = {"shape": f"{n}x{k}", "rows": m}
            r["dense"] = time_it(partial(torch.matmul, x, w.T)) * 1e3
            r["fp8"] = time_it(partial(fp8, x)) * 1e3
            r["int8"] = time_it(partial(int8, x)) * 1e3
            r["x_fp8"], r["x_int8"] = r["dense"] / r["fp8"], r["dense"] / r["int8"]
            table.append(r)
        print(f"{n}x{k}: fp8 kernel {fp8.kernel.name}, int8 kernel {int8.kernel.name}", flush=True)
    dn = "fp16" if gpu else "fp32"
    print_table(
        table,
        [
            ("shape", "shape", ""),
            ("rows", "rows", "d"),
            ("dense", f"{dn} ms", ".3f"),
            ("fp8", "FP8 W8A8 ms", ".3f"),
            ("int8", "INT8 W8A8 ms", ".3f"),
            ("x_fp8", f"FP8 vs {dn}", ".2f"),
            ("x_int8", f"INT8 vs {dn}", ".2f"),
        ],
    )


def model_table(dev: str, small: bool, prompt: int, new_tokens: int) -> None:
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    gpu = dev.startswith("cuda")
    cfg = LlamaConfig(
        **(
            dict(
                hidden_size=256,
                intermediate_size=768,
                num_hidden_layers=2,
                num_attention_heads=4,
                vocab_size=1000,
            )
            if small
            else dict(
                hidden_size=4096,
                intermediate_size=11008,
                num_hidden_layers=32,
                num_attention_heads=32,
                vocab_size=32000,
            )
        )
    )
    dtype = torch.float16 if gpu else torch.float32
    recipes = {
        "FP8 W8A8": [{"method": "fp8"}],
        "INT8 W8A8": [
            {"method": "rtn", "bits": 8, "group_size": -1, "symmetric": True, "activations": "int8"}
        ],
    }
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        LlamaForCausalLM(cfg).to(torch.float16).save_pretrained(Path(tmp) / "dense")
        for name, recipe in recipes.items():
            m = AutoModelForCausalLM.from_pretrained(Path(tmp) / "dense", dtype=torch.float32)
            llmpress.compress(m, recipe)
            llmpress.save_quantized(m, Path(tmp) / name.replace(" ", "_"), dtype=torch.float16)
            del m
            gc.collect()
        for name in ["fp16" if gpu else "fp32", *recipes]:
            path = Path(tmp) / ("dense" if name in ("fp16", "fp32") else name.replace(" ", "_"))
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=dev).eval()
            ids = torch.randint(0, cfg.vocab_size, (1, prompt), device=dev)
            with torch.inference_mode():
                t_prefill = timer(dev, warmup=1, reps=3)(partial(model, ids))

                def gen(n: int, model=model, ids=ids) -> float:  # noqa: ANN001
                    t0 = time.perf_counter()
                    model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
                    if gpu:
                        torch.cuda.synchronize()
                    return time.perf_counter() - t0

                gen(2)
                decode = new_tokens / (
                    min(gen(new_tokens + 1) for _ in range(2)) - min(gen(1) for _ in range(2))
                )
            rows.append({"model": name, "prefill": prompt / t_prefill, "decode": decode})
            del model
            gc.collect()
    for r in rows:
        r["x_prefill"], r["x_decode"] = r["prefill"] / rows[0]["prefill"], r["decode"] / rows[0]["decode"]
    print_table(
        rows,
        [
            ("model", "model", ""),
            ("prefill", "prefill tok/s", ".0f"),
            ("x_prefill", "vs dense", ".2f"),
            ("decode", "decode tok/s", ".1f"),
            ("x_decode", "vs dense", ".2f"),
        ],
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--small", action="store_true")
    p.add_argument("--prompt", type=int, default=None)
    p.add_argument("--new-tokens", type=int, default=32)
    a = p.parse_args()
    name = torch.cuda.get_device_name() if a.device.startswith("cuda") else "CPU (simulated W8A8)"
    print(f"device: {name}; torch {torch.__version__}")
    layer_table(a.device, [(512, 256)] if a.small else SHAPES, [1, 64] if a.small else ROWS)
    model_table(a.device, a.small, a.prompt or (64 if a.small else 2048), 4 if a.small else a.new_tokens)


if __name__ == "__main__":
    main()
