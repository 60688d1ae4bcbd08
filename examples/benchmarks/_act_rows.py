"""The activation-quantization rows of quant_quality.py (``--rows activations``): W4A8 and
W4A4KV4, with and without a rotation stage, and each linear's max |x| per input channel.

Activations are quantized at run time only, by the packed layers (the in-memory compressed
model holds dequantized weights): each row is saved in llmpress's format, reloaded and scored
with the ``dense`` kernel (dequantized weights, inputs rounded by
``llmpress.quant.activations.fake_quantize``: the exact simulation). Rows that need the
``rotate`` method are skipped while it is not registered.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

import llmpress
from llmpress.cli.evaluate import perplexity_of_windows
from llmpress.engine.calibration import build_calibration
from llmpress.format.loading import load_model
from llmpress.format.runtime import select_kernels
from llmpress.plugin_manager import get_plugin_manager
from llmpress.quant.activations import fake_quantize

log = logging.getLogger(__name__)

Q4 = {"bits": 4, "group_size": 128}
ROTATE = {"method": "rotate"}


def _w(method: str, acts: str | None) -> dict[str, Any]:
    return {"method": method, **Q4, **({"activations": acts} if acts else {})}


# (name, recipe, whether it needs the rotate method)
ACT_CONFIGS: list[tuple[str, dict[str, Any], bool]] = [
    ("GPTQ W4A16 g128 (reloaded)", {"stages": [_w("gptq", None)]}, False),
    ("RTN W4A8 g128", {"stages": [_w("rtn", "int8")]}, False),
    ("GPTQ W4A8 g128", {"stages": [_w("gptq", "int8")]}, False),
    ("GPTQ W4A16 g128 KV4", {"stages": [_w("gptq", None)], "kv_cache": "int4"}, False),
    ("GPTQ W4A4 g128 (KV16)", {"stages": [_w("gptq", "int4")]}, False),
    ("RTN W4A4KV4 g128", {"stages": [_w("rtn", "int4")], "kv_cache": "int4"}, False),
    ("GPTQ W4A4KV4 g128", {"stages": [_w("gptq", "int4")], "kv_cache": "int4"}, False),
    ("rotate + GPTQ W4A8 g128", {"stages": [ROTATE, _w("gptq", "int8")]}, True),
    ("rotate + RTN W4A4KV4 g128", {"stages": [ROTATE, _w("rtn", "int4")], "kv_cache": "int4"}, True),
    ("rotate + GPTQ W4A4KV4 g128", {"stages": [ROTATE, _w("gptq", "int4")], "kv_cache": "int4"}, True),
]


def _dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def activation_rows(a: Any, tok: Any, windows: torch.Tensor, out_root: Path) -> list[dict[str, Any]]:
    """Compress, save, reload and score each activation row (``a``: quant_quality's arguments)."""
    rotate = "rotate" in get_plugin_manager().methods
    rows = []
    for name, recipe, needs_rotate in ACT_CONFIGS:
        if a.only and not any(s.strip() in name for s in a.only.split(",")):
            continue
        if needs_rotate and not rotate:
            log.warning("%s: skipped (the rotate method is not registered)", name)
            continue
        model, _ = load_model(a.model, dtype=torch.float32, device=a.device)
        t = time.perf_counter()
        model, report = llmpress.compress(
            model, recipe, a.calib, tokenizer=tok, nsamples=a.nsamples, seqlen=a.seqlen, device=a.device,
            progress=False,
        )  # fmt: skip
        dt = time.perf_counter() - t
        d = out_root / name.replace(" ", "_").replace("(", "").replace(")", "")
        llmpress.save_quantized(model, d, report=report, dtype=torch.float16)
        del model
        loaded, _ = load_model(d, dtype=torch.float32, device=a.device)
        select_kernels(loaded, "dense")  # dequantized weights: the exact simulation of the rounding
        ppl = perplexity_of_windows(loaded, windows, 32)["perplexity"]
        rows.append({"name": name, "ppl": ppl, "ref": None, "mb": _dir_size(d) / 1e6, "time": dt})
        del loaded
    return rows


def planted_copy(model_dir: str, factor: float, n: int = 4) -> Path:
    """A saved copy of ``model_dir`` with ``n`` planted outlier channels
    (:func:`_common.plant_outliers`: the same function, so the dense perplexity is unchanged)."""
    import tempfile

    from _common import plant_outliers

    model, tok = load_model(model_dir, dtype=torch.float32)
    channels = plant_outliers(model, channels=n, scale=factor)
    out = Path(tempfile.mkdtemp(prefix="llmpress-planted-"))
    model.save_pretrained(out)
    if tok is not None:
        tok.save_pretrained(out)
    log.warning("planted outlier channels %s (x%g) into a copy of %s at %s", channels, factor, model_dir, out)
    return out


def _kind(name: str) -> str:
    for key, kind in (
        ("q_proj", "q/k/v in (attn norm)"),
        ("o_proj", "o_proj in"),
        ("gate_proj", "gate/up in (mlp norm)"),
        ("down_proj", "down_proj in"),
    ):
        if name.endswith(key):
            return kind
    return ""


@torch.no_grad()
def channel_stats(model: nn.Module, ids: torch.Tensor, batch: int = 8) -> list[dict[str, Any]]:
    """Per kind of linear input: the largest max |x| of a channel, the median channel's, their
    ratio, the channels above 10x the median (largest of any block) and the per-token INT4 /
    INT8 rounding error ||x - q(x)|| / ||x|| (mean over layers), on ``ids``."""
    absmax: dict[str, torch.Tensor] = {}
    err: dict[str, list[float]] = {}
    hooks = []
    for n, m in model.named_modules():
        if isinstance(m, nn.Linear) and _kind(n):

            def hook(mod: nn.Module, args: tuple[torch.Tensor, ...], n: str = n) -> None:
                x = args[0].reshape(-1, args[0].shape[-1]).float()
                cur = x.abs().amax(0)
                absmax[n] = cur if n not in absmax else torch.maximum(absmax[n], cur)
                for scheme in ("int4-dynamic", "int8-dynamic"):
                    e = float((x - fake_quantize(x, scheme)).norm() / x.norm().clamp_min(1e-12))
                    err.setdefault(f"{n}|{scheme}", []).append(e)

            hooks.append(m.register_forward_pre_hook(hook))
    dev = next(model.parameters()).device
    try:
        for x in ids.split(batch):
            model(input_ids=x.to(dev), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    out: dict[str, dict[str, Any]] = {}
    for n, am in absmax.items():
        r = out.setdefault(
            _kind(n), {"kind": _kind(n), "max": 0.0, "ratio": 0.0, "over10": 0, "e4": [], "e8": []}
        )
        med = float(am.median())
        r["max"] = max(r["max"], float(am.max()))
        if float(am.max()) / med > r["ratio"]:
            r["ratio"], r["median"], r["where"] = (
                float(am.max()) / med,
                med,
                n.split(".mlp")[0].split(".self_attn")[0],
            )
        r["over10"] = max(r["over10"], int((am > 10 * med).sum()))
        r["e4"] += err[f"{n}|int4-dynamic"]
        r["e8"] += err[f"{n}|int8-dynamic"]
    for r in out.values():
        r["e4"], r["e8"] = sum(r["e4"]) / len(r["e4"]), sum(r["e8"]) / len(r["e8"])
    return list(out.values())


def outlier_table(a: Any, tok: Any) -> None:
    """Print max |x| per input channel of the dense model (and after rotation, when registered)."""
    from _common import print_table

    ids = build_calibration(tok, a.calib, nsamples=min(a.nsamples, 16), seqlen=a.seqlen, seed=1)
    models = [("dense", None)]
    if "rotate" in get_plugin_manager().methods:
        models.append(("rotated", [ROTATE]))
    for label, stages in models:
        model, _ = load_model(a.model, dtype=torch.float32, device=a.device)
        if stages is not None:
            model, _ = llmpress.compress(model, {"stages": stages}, ids, device=a.device, progress=False)
        print(
            f"\nmax |x| per input channel, {label} model ({ids.shape[0]} x {ids.shape[1]} calibration tokens)\n"
        )
        print_table(
            channel_stats(model, ids),
            [
                ("kind", "linear input", ""),
                ("max", "max |x| (top channel)", ".2f"),
                ("median", "median channel", ".3f"),
                ("ratio", "top / median", ".1f"),
                ("where", "block", ""),
                ("over10", "channels > 10x median", "d"),
                ("e4", "INT4 per-token rel. err", ".3f"),
                ("e8", "INT8 per-token rel. err", ".4f"),
            ],
        )
        del model
