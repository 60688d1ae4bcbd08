"""Compression speed, peak GPU memory and peak host memory; 1 process against N, and a GPU budget.

    python examples/benchmarks/compress_speed.py                          # Llama-3-8B shape, one GPU
    python examples/benchmarks/compress_speed.py --max-gpu-memory 8GiB    # budget below the model size
    python examples/benchmarks/compress_speed.py --nproc 8                # 8 GPUs (nccl) against 1
    python examples/benchmarks/compress_speed.py --shape small --nproc 2  # CPU: 2 gloo processes against 1

The model (random weights) is built on the meta device and materialized in every process with
the same seed. With ``--max-gpu-memory`` it is dispatched by accelerate under that budget
(what does not fit stays on CPU, offloaded; blocks are onloaded one at a time) and the
calibration activations go to CPU when they would not fit. Every configuration runs in fresh
processes (``torch.multiprocessing``), so peak host RSS is per run; the table shows the
largest over the ranks. On CPU each process is one "device" of ``cpu_count / N`` threads, in
the 1-process run too, as each GPU process has one GPU. Calibration: ``nsamples x seqlen`` random tokens.
Baseline on one H200 (llm-compressor 0.14, same model and data, whole model on the GPU):
Wanda 75.6 s, SparseGPT ~400 s, GPTQ 4-bit g128 194.7 s.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _common import print_table

BASELINE_S = {"wanda": 75.6, "sparsegpt": 400.0, "gptq": 194.7}
RECIPES = {
    "wanda": {"method": "wanda", "sparsity": 0.5},
    "sparsegpt": {"method": "sparsegpt", "sparsity": 0.5},
    "gptq": {"method": "gptq", "bits": 4, "group_size": 128},
}
SHAPES = {
    "small": dict(
        hidden_size=256,
        intermediate_size=896,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        vocab_size=4096,
        max_position_embeddings=2048,
    ),
    "8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        max_position_embeddings=8192,
        rope_theta=500000.0,
    ),
}


def build(shape: str, dtype: torch.dtype) -> torch.nn.Module:
    """The model on the meta device, materialized on CPU with seeded random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**SHAPES[shape])).to(dtype)
    model.to_empty(device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
    rope = model.model.rotary_emb  # computed buffers: rebuilt, not random
    model.model.rotary_emb = type(rope)(model.config)
    return model.eval()


def place(
    model: torch.nn.Module, device: str, budget: int | None, nsamples: int, seqlen: int, world: int
) -> bool:
    """Put the model where it computes; returns whether activations rest on CPU."""
    if budget is None or not device.startswith("cuda"):
        model.to(device)
        return False
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_max_memory

    from llmpress.cli.budget import plan_memory

    plan = plan_memory(model.config, budget, nsamples, seqlen, 2, world)
    gpu = torch.device(device).index or 0
    mem = {k: v for k, v in get_max_memory().items() if not isinstance(k, int)} | {gpu: plan.weights}
    dmap = infer_auto_device_map(model, max_memory=mem, no_split_module_classes=model._no_split_modules)
    dispatch_model(model, device_map=dmap, main_device=device)
    return plan.offload_activations


def run(rank: int, world: int, port: int, a: dict[str, Any], method: str, out: str) -> None:
    """One process of one configuration: build, place, compress, measure."""
    import torch.distributed as dist

    import llmpress

    cuda = torch.cuda.is_available() and a["shape"] != "small"
    torch.set_num_threads(a["threads"])  # on CPU each process is one "device" of cpu_count / N cores
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_RANK=str(rank))
        dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    device = f"cuda:{rank}" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(device)
    dtype = torch.bfloat16 if cuda else torch.float32
    model = build(a["shape"], dtype)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    offload_acts = place(model, device, a["budget"], a["nsamples"], a["seqlen"], world)
    ids = torch.randint(
        0, model.config.vocab_size, (a["nsamples"], a["seqlen"]), generator=torch.Generator().manual_seed(0)
    )
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    _, report = llmpress.compress(
        model,
        {"stages": [RECIPES[method]]},
        ids,
        device=device,
        batch_size=a["batch_size"],
        offload_activations=offload_acts,
        progress=False,
    )
    if cuda:
        torch.cuda.synchronize()
    row = {
        "time": time.perf_counter() - t,
        "gpu_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,  # KiB on Linux
        "model_gb": model_bytes / 2**30,
        "sparsity": report.overall_sparsity,
        "acts": "CPU" if offload_acts else device.split(":")[0].upper(),
    }
    rows = [row]
    if world > 1:
        rows = [None] * world
        dist.all_gather_object(rows, row)
        dist.destroy_process_group()
    if rank == 0:
        Path(out).write_text(json.dumps(rows))


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def measure(a: dict[str, Any], method: str, world: int) -> dict[str, Any]:
    """Run one configuration in ``world`` fresh processes; the slowest rank's time, the largest peaks."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "rows.json")
        mp.spawn(run, args=(world, _port(), a, method, out), nprocs=world)
        rows = json.loads(Path(out).read_text())
    gpu = [r["gpu_gb"] for r in rows if r["gpu_gb"] is not None]
    return {
        "method": method,
        "nproc": world,
        "time": max(r["time"] for r in rows),
        "gpu_gb": max(gpu) if gpu else None,
        "rss_gb": max(r["rss_gb"] for r in rows),
        "model_gb": rows[0]["model_gb"],
        "sparsity": rows[0]["sparsity"],
        "acts": rows[0]["acts"],
    }


def main() -> None:
    from llmpress.cli.budget import parse_memory

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="8b", help="model shape (small: on CPU)")
    ap.add_argument("--small", action="store_true", help="the same as --shape small")
    ap.add_argument("--methods", default="gptq", help="comma-separated: wanda, sparsegpt, gptq")
    ap.add_argument("--nproc", type=int, default=1, help="also run with N processes (GPUs, or gloo on CPU)")
    ap.add_argument("--max-gpu-memory", default=None, help="GPU budget per process, e.g. 8GiB")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=None)
    args = ap.parse_args()
    shape = "small" if args.small else args.shape
    cuda = torch.cuda.is_available() and shape != "small"
    nsamples, seqlen = (
        (min(args.nsamples, 16), min(args.seqlen, 256)) if shape == "small" else (args.nsamples, args.seqlen)
    )
    a = {
        "shape": shape,
        "nsamples": nsamples,
        "seqlen": seqlen,
        "batch_size": args.batch_size,
        "threads": max(1, (os.cpu_count() or 1) // max(args.nproc, 1)),
        "budget": parse_memory(args.max_gpu_memory) if args.max_gpu_memory and cuda else None,
    }
    if cuda and args.nproc > torch.cuda.device_count():
        raise SystemExit(f"--nproc {args.nproc}: only {torch.cuda.device_count()} GPU(s) visible")
    rows = []
    for method in args.methods.split(","):
        one = measure(a, method, 1)
        one["baseline"] = BASELINE_S.get(method) if shape == "8b" and cuda else None
        rows.append(one)
        if args.nproc > 1:
            many = measure(a, method, args.nproc)
            many["speedup"] = one["time"] / many["time"]
            rows.append(many)
        one["speedup"] = 1.0
    where = (
        f"{torch.cuda.get_device_name()} per process"
        if cuda
        else f"CPU, gloo, {a['threads']} thread(s) per process on {os.cpu_count()} cores"
    )
    budget = f", GPU budget {args.max_gpu_memory} per process" if a["budget"] else ""
    print(f"\n{shape} Llama shape, calibration {nsamples} x {seqlen}, {where}{budget}\n")
    print_table(
        rows,
        [
            ("method", "method", ""),
            ("nproc", "processes", "d"),
            ("time", "wall s", ".1f"),
            ("speedup", "speedup vs 1", ".2f"),
            ("baseline", "llm-compressor 0.14 s", ".1f"),
            ("model_gb", "model GiB", ".2f"),
            ("gpu_gb", "peak GPU GiB", ".2f"),
            ("rss_gb", "peak host RSS GiB", ".2f"),
            ("acts", "activations on", ""),
            ("sparsity", "sparsity", ".3f"),
        ],
    )


if __name__ == "__main__":
    main()
