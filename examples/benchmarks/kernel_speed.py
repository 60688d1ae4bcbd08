"""Weight-only int4/int8 kernels against the dense matmul, per layer shape and row count.

    python examples/benchmarks/kernel_speed.py                 # CUDA: triton-int vs fp16 cuBLAS
    python examples/benchmarks/kernel_speed.py --device cpu    # CPU: cpu-int vs fp32 and bf16

For each shape (out x in) and row count it prints the dense time (fp16 and bf16 on a GPU,
fp32 and bf16 on a CPU), ours (the kernel the runtime picks for a packed layer, int4 with
groups of 128 and int8 per channel by default), torch's built-in int4 kernel on the GPU
(``_weight_int4pack_mm``, bf16), the speedups over the first dense column, and the fraction of
the device's measured copy bandwidth that the int4 kernel reaches (bytes of packed weight,
scales and activations moved per call / time / bandwidth). Targets (issue 12, H200): 1-16 rows
on the large shapes >= 3.0x over fp16, 64 rows >= 1.5x, never below 0.95x.
"""

from __future__ import annotations

import argparse
from functools import partial

import torch
from _common import print_table, random_int_layer, timer

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (28672, 8192), (8192, 28672)]
CPU_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]
ROWS = [1, 4, 16, 64, 256, 1024]


def bandwidth(device: str) -> float:
    """Measured copy bandwidth in bytes/s (read + write of a large buffer)."""
    n = (1 << 30) if device.startswith("cuda") else (1 << 27)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t = timer(device, warmup=2, reps=5)(lambda: dst.copy_(src))
    return 2 * n / t


def torch_int4(w: torch.Tensor, group: int):
    """torch's own CUDA int4 kernel (bf16), or ``None`` where this torch has none."""
    ops = torch.ops.aten
    if not (w.is_cuda and hasattr(ops, "_weight_int4pack_mm")):
        return None
    n, k = w.shape
    pairs = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device=w.device)  # two codes per byte
    packed = ops._convert_weight_to_int4pack(pairs, 8)
    sz = torch.rand(k // group, n, 2, device=w.device, dtype=torch.bfloat16)
    return lambda x: ops._weight_int4pack_mm(x, packed, group, sz)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--rows", type=int, nargs="+", default=None)
    p.add_argument("--shapes", default=None, help="e.g. 4096x4096,11008x4096")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--reps", type=int, default=None)
    a = p.parse_args()
    dev = a.device
    gpu = dev.startswith("cuda")
    shapes = (
        [tuple(map(int, s.split("x"))) for s in a.shapes.split(",")]
        if a.shapes
        else SHAPES
        if gpu
        else CPU_SHAPES
    )
    rows = a.rows or (ROWS if gpu else [1, 4, 16, 64, 256])
    base = torch.float16 if gpu else torch.float32
    time_it = timer(dev, warmup=3, reps=a.reps or (20 if gpu else 5))
    bw = bandwidth(dev)
    name = torch.cuda.get_device_name() if gpu else "CPU"
    print(
        f"device: {name}, {torch.get_num_threads()} threads; copy bandwidth {bw / 1e9:.0f} GB/s; torch {torch.__version__}"
    )
    table = []
    for n, k in shapes:
        w = torch.randn(n, k, device=dev, dtype=base) * 0.02
        wb = w.to(torch.bfloat16)
        int4 = random_int_layer(n, k, 4, a.group_size, dev, "float16" if gpu else "bfloat16")
        int8 = random_int_layer(n, k, 8, -1, dev, "float16" if gpu else "bfloat16")
        ti4 = torch_int4(w, a.group_size)
        for m in rows:
            x = torch.randn(m, k, device=dev, dtype=base)
            xb = x.to(torch.bfloat16)
            r = {"shape": f"{n}x{k}", "rows": m}
            r["dense"] = time_it(partial(torch.matmul, x, w.T)) * 1e3
            r["bf16"] = time_it(partial(torch.matmul, xb, wb.T)) * 1e3
            r["int4"] = time_it(partial(int4, x)) * 1e3
            r["int8"] = time_it(partial(int8, x)) * 1e3
            r["torch_int4"] = time_it(partial(ti4, xb)) * 1e3 if ti4 is not None else None
            r["x_int4"] = r["dense"] / r["int4"]
            r["x_int8"] = r["dense"] / r["int8"]
            r["x_torch_int4"] = r["dense"] / r["torch_int4"] if r["torch_int4"] else None
            moved = (
                n * k / 2 + n * (k // a.group_size) * 2 + m * k * x.element_size() + m * n * x.element_size()
            )
            r["bw_int4"] = 100 * moved / (r["int4"] / 1e3) / bw
            table.append(r)
        kernels = f"int4: {int4.kernel.name}, int8: {int8.kernel.name}"
        print(f"{n}x{k}: {kernels}", flush=True)
    dn = "fp16" if gpu else "fp32"
    print_table(
        table,
        [
            ("shape", "shape", ""),
            ("rows", "rows", "d"),
            ("dense", f"{dn} ms", ".3f"),
            ("bf16", "bf16 ms", ".3f"),
            ("int4", "int4 ms", ".3f"),
            ("int8", "int8 ms", ".3f"),
            ("torch_int4", "torch int4 ms", ".3f"),
            ("x_int4", f"int4 vs {dn}", ".2f"),
            ("x_int8", f"int8 vs {dn}", ".2f"),
            ("x_torch_int4", f"torch int4 vs {dn}", ".2f"),
            ("bw_int4", "int4 % of bw", ".0f"),
        ],
    )


if __name__ == "__main__":
    main()
