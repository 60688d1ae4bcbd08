"""Helpers shared by the benchmark scripts (not part of the package)."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared"
REF_LM = SHARED / "ref-lm"


def print_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> None:
    """Print rows as a Markdown table; columns are (key, header, format)."""
    print("| " + " | ".join(h for _, h, _ in columns) + " |")
    print("|" + "|".join("---" for _ in columns) + "|")
    for r in rows:
        cells = []
        for key, _, fmt in columns:
            v = r.get(key)
            cells.append("-" if v is None else format(v, fmt) if fmt else str(v))
        print("| " + " | ".join(cells) + " |")


def compare_to_reference(rows: list[dict], tolerance_pct: float) -> None:
    """Add ``delta`` (% vs ``ref``) and ``ok`` (within ``tolerance_pct``, or below) to each row."""
    for r in rows:
        ref = r.get("ref")
        r["delta"] = 100 * (r["ppl"] / ref - 1) if ref else None
        r["ok"] = "-" if r["delta"] is None else ("yes" if r["delta"] <= tolerance_pct else "NO")


def random_int_layer(out_f: int, in_f: int, bits: int, group_size: int, device: str, dtype: str = "float16"):
    """A packed ``int`` runtime layer with random codes and grid (timing does not depend on values)."""
    import torch

    from llmpress.format.formats import ModuleFormat, pack_module
    from llmpress.format.runtime import LlmpressLinear
    from llmpress.model.results import LayerResult, QuantState

    gs = in_f if group_size == -1 else group_size
    codes = torch.randint(0, 2**bits, (out_f, in_f), dtype=torch.uint8)
    scales = torch.rand(out_f, in_f // gs) * 0.01 + 1e-3
    zeros = torch.full_like(scales, float(2 ** (bits - 1)))
    quant = QuantState(codes, scales, zeros, bits=bits, group_size=group_size, symmetric=True)
    fmt = ModuleFormat("int", in_f, out_f, bits=bits, group_size=group_size, symmetric=True, dtype=dtype)
    tensors = pack_module(fmt, codes, LayerResult(quant=quant))
    layer = LlmpressLinear(fmt)
    for k, v in tensors.items():
        getattr(layer, k).copy_(v)
    return layer.to(device)


def timer(device: str, warmup: int = 3, reps: int = 10):
    """``time(fn) -> median seconds`` of ``reps`` calls after ``warmup``, synchronizing CUDA."""
    import statistics
    import time

    import torch

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    def time_it(fn) -> float:
        for _ in range(warmup):
            fn()
        sync()
        out = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            sync()
            out.append(time.perf_counter() - t0)
        return statistics.median(out)

    return time_it
