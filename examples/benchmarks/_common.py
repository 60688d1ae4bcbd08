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


def plant_outliers(model, channels: int = 4, scale: float = 32.0, seed: int = 0) -> dict[str, list[int]]:
    """Give a pre-RMSNorm Llama activation outlier channels without changing its function.

    In every block the same ``channels`` hidden channels of both RMSNorms' outputs are scaled by
    ``scale`` (norm weight ``* scale``, the readers' input columns ``/ scale``) and the same
    ``channels`` MLP channels (up_proj rows ``* scale``, down_proj input columns ``/ scale``:
    SwiGLU is linear in up), the consistent outlier channels of large LLMs (LLM.int8(),
    SmoothQuant). The logits change only by rounding. Returns the channels chosen.
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    hidden = int(model.config.hidden_size)
    inter = int(model.config.intermediate_size)
    hid = torch.randperm(hidden, generator=g)[:channels].tolist()
    mlp = torch.randperm(inter, generator=g)[:channels].tolist()
    with torch.no_grad():
        for block in model.model.layers:
            for norm, readers in (
                (block.input_layernorm, ("q_proj", "k_proj", "v_proj")),
                (block.post_attention_layernorm, ("gate_proj", "up_proj")),
            ):
                norm.weight[hid] *= scale
                parent = block.self_attn if readers[0] == "q_proj" else block.mlp
                for r in readers:
                    getattr(parent, r).weight[:, hid] /= scale
            block.mlp.up_proj.weight[mlp, :] *= scale
            block.mlp.down_proj.weight[:, mlp] /= scale
    return {"hidden": hid, "mlp": mlp}


def channel_absmax(model, ids, layers: list[int]) -> dict:
    """Per input channel, max |x| over ``ids`` at three points of each block in ``layers``: the
    residual stream entering the block, the normed input of q_proj and the input of down_proj
    (after any online transform). Keys ``"<i> residual"``, ``"<i> q_proj in"``, ``"<i> down_proj in"``."""
    import torch

    seen: dict[str, torch.Tensor] = {}
    handles = []

    def grab(key: str):  # noqa: ANN202
        def hook(_mod, args, kwargs) -> None:  # noqa: ANN001
            x = args[0] if args else kwargs["hidden_states"]
            m = x.detach().abs().float().reshape(-1, x.shape[-1]).amax(0)
            seen[key] = m if key not in seen else torch.maximum(seen[key], m)

        return hook

    for i in layers:
        block = model.model.layers[i]
        handles.append(block.register_forward_pre_hook(grab(f"{i} residual"), with_kwargs=True))
        handles.append(
            block.self_attn.q_proj.register_forward_pre_hook(grab(f"{i} q_proj in"), with_kwargs=True)
        )
        # after the online transform's pre-hook (registered first, prepended)
        handles.append(
            block.mlp.down_proj.register_forward_pre_hook(grab(f"{i} down_proj in"), with_kwargs=True)
        )
    try:
        with torch.no_grad():
            for row in ids:
                model(row[None].to(next(model.parameters()).device))
    finally:
        for h in handles:
            h.remove()
    return seen
