"""Quantization quality and on-disk size on the reference model.

    python examples/benchmarks/quant_quality.py [--device cuda] [--rows base|gptaq|awq|spqr|eora|rotate|outliers|activations] [--threads N]

Quantizes ../shared/ref-lm/pycoder-19m with RTN and GPTQ (asymmetric, 64 calibration
windows of 256 tokens from calib.txt), saves each in llmpress's packed format, and prints
perplexity on eval.txt (non-overlapping 256-token windows, fp32 math) and the size on disk
next to the dense model and the reference GPTQ code's numbers on the same model.

``--rows gptaq``: GPTAQ against GPTQ (W4/W3 g128, act-order) and asymmetric against plain
SparseGPT 50 %, alone and before GPTQ/GPTAQ (:data:`GPTAQ_CONFIGS`).
``--rows awq``: AWQ before RTN and GPTQ at W4/W3 g128 (:data:`AWQ_CONFIGS`); ``--outliers``
prints max |x| per input channel of every kind of block linear first.
``--rows spqr``: GPTQ against SpQR (Dettmers et al.) at about the same stored bits per weight of
the quantized layers (codes, both levels of statistics and outliers, as saved).
``--rows eora``: low-rank compensation of 3-bit GPTQ and of SparseGPT 2:4 + GPTQ 4-bit, each
with no compensation, plain SVD (``eora`` with ``basis: identity``) and EoRA at ranks 8 and 32
(:func:`eora_configs`); sizes on disk include the fp16 low-rank factors.
``--rows rotate``: RTN and GPTQ at W4/W3 g128 with and without a QuaRot rotation before them
(``method: rotate``), then max |x| per channel before and after rotation at a few layers.
``--rows outliers``: the same on the model with planted activation outlier channels
(:func:`_common.plant_outliers`: function-preserving, so the dense perplexity is unchanged).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from _common import REF_LM, channel_absmax, compare_to_reference, plant_outliers, print_table

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


SP50 = {"method": "sparsegpt", "sparsity": 0.5}
SP50_ASYM = {**SP50, "asymmetric": True}
# GPTAQ (asymmetric calibration, alpha 0.25) next to the same GPTQ / SparseGPT settings
GPTAQ_CONFIGS = [
    ("GPTQ 4-bit g128", [{"method": "gptq", **Q4}], 5.949),
    ("GPTAQ 4-bit g128", [{"method": "gptaq", **Q4}], None),
    ("GPTQ 3-bit g128", [{"method": "gptq", **Q3}], 6.558),
    ("GPTAQ 3-bit g128", [{"method": "gptaq", **Q3}], None),
    ("GPTQ 3-bit g128 act-order", [{"method": "gptq", **Q3, "act_order": True}], 6.505),
    ("GPTAQ 3-bit g128 act-order", [{"method": "gptaq", **Q3, "act_order": True}], None),
    ("SparseGPT 50%", [SP50], None),
    ("SparseGPT 50% asymmetric", [SP50_ASYM], None),
    ("SparseGPT 50% + GPTQ 4-bit g128", [SP50, {"method": "gptq", **Q4}], None),
    ("SparseGPT 50% + GPTAQ 4-bit g128", [SP50, {"method": "gptaq", **Q4}], None),
    ("SparseGPT 50% asym + GPTAQ 4-bit g128", [SP50_ASYM, {"method": "gptaq", **Q4}], None),
]
# issue 21, AWQ: scales and clips searched for the quantizer after it (same grid)
AWQ_CONFIGS = [
    (f"AWQ+{q.upper()} {b}-bit g128", [{"method": "awq", **grid}, {"method": q, **grid}], None)
    for b, grid in ((4, Q4), (3, Q3))
    for q in ("rtn", "gptq")
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


def eora_configs() -> list[tuple[str, list[dict], float | None]]:
    """The ``--rows eora`` rows: each compression alone, then with plain SVD and EoRA paths."""
    bases = [
        ("GPTQ 3-bit g128", [{"method": "gptq", **Q3}]),
        ("SparseGPT 2:4 + GPTQ 4-bit g128", [SP24, {"method": "gptq", **Q4}]),
    ]
    rows: list[tuple[str, list[dict], float | None]] = []
    for name, stages in bases:
        rows.append((name, stages, None))
        for rank in (8, 32):
            for label, basis in (("SVD", "identity"), ("EoRA", "activations")):
                rows.append(
                    (
                        f"{name} + {label} r{rank}",
                        [*stages, {"method": "eora", "rank": rank, "basis": basis}],
                        None,
                    )
                )
    return rows


ROT = {"method": "rotate"}
# RTN/GPTQ at W4/W3 g128 without and with a rotation before them (no reference code numbers)
ROTATE_CONFIGS = [  # the reference numbers are for the whole eval.txt: left out here (--max-tokens)
    *[
        (n, st, None)
        for n, st, _ in CONFIGS
        if n in ("RTN 4-bit g128", "GPTQ 4-bit g128", "RTN 3-bit g128", "GPTQ 3-bit g128")
    ],
    ("rotate + RTN 4-bit g128", [ROT, {"method": "rtn", **Q4}], None),
    ("rotate + GPTQ 4-bit g128", [ROT, {"method": "gptq", **Q4}], None),
    ("rotate + RTN 3-bit g128", [ROT, {"method": "rtn", **Q3}], None),
    ("rotate + GPTQ 3-bit g128", [ROT, {"method": "gptq", **Q3}], None),
]
OUTLIER_CONFIGS = ROTATE_CONFIGS


def _no_change(model: torch.nn.Module) -> None:
    return None


def _planted(model: torch.nn.Module) -> None:
    plant_outliers(model, channels=4, scale=32.0)


#: --rows choice -> (configs, how each freshly loaded model is prepared)
ROWS = {
    "base": (CONFIGS, _no_change),
    "gptaq": (GPTAQ_CONFIGS, _no_change),
    "awq": (AWQ_CONFIGS, _no_change),
    "spqr": (SPQR_CONFIGS, _no_change),
    "eora": (eora_configs(), _no_change),
    "rotate": (ROTATE_CONFIGS, _no_change),
    "outliers": (OUTLIER_CONFIGS, _planted),
    # W4A8 / W4A4KV4 with and without rotation, saved, reloaded and simulated (_act_rows.py)
    "activations": ([], _no_change),
}


def outlier_table(model_path: str, prepare, ids: torch.Tensor, device: str) -> None:  # noqa: ANN001
    """Print max |x| per channel (largest, median, ratio) before and after rotation at layers
    0, 3 and the last: the residual stream, q_proj's normed input and down_proj's input."""
    model, _ = load_model(model_path, dtype=torch.float32, device=device)
    prepare(model)
    n = len(model.model.layers)
    layers = [0, n // 2 - 1, n - 1]
    before = channel_absmax(model, ids, layers)
    model, _ = llmpress.compress(model, {"stages": [ROT]}, None, device=device, progress=False)
    after = channel_absmax(model, ids, layers)
    rows = []
    for key, b in before.items():
        a = after[key]
        rows.append(
            {
                "point": f"layer {key}",
                "bmax": float(b.max()),
                "bratio": float(b.max() / b.median()),
                "amax": float(a.max()),
                "aratio": float(a.max() / a.median()),
            }
        )
    print(
        f"\nmax |x| per input channel over {ids.shape[0]} x {ids.shape[1]} tokens, before -> after rotation\n"
    )
    print_table(
        rows,
        [
            ("point", "where", ""),
            ("bmax", "max before", ".2f"),
            ("bratio", "max/median before", ".1f"),
            ("amax", "max after", ".2f"),
            ("aratio", "max/median after", ".1f"),
        ],
    )


def activation_outliers(model: torch.nn.Module, ids: torch.Tensor) -> list[dict]:
    """Per kind of block linear: max |x| per input channel on ``ids``, over all blocks: the
    largest channel, the median channel and their ratio (AWQ and SmoothQuant act on large ratios)."""
    from llmpress.model.modules import block_linears, find_blocks

    prefix, blocks = find_blocks(model)
    amax: dict[str, torch.Tensor] = {}

    def hook(name: str):  # noqa: ANN202
        def f(mod: torch.nn.Module, args: tuple) -> None:
            a = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(0).float()
            amax[name] = torch.maximum(amax[name], a) if name in amax else a

        return f

    handles = [
        m.register_forward_pre_hook(hook(f"{i}.{rel}"))
        for i, b in enumerate(blocks)
        for rel, m in block_linears(b).items()
    ]
    with torch.no_grad():
        for batch in ids.split(8):
            model(input_ids=batch)
    for h in handles:
        h.remove()
    rows = []
    for kind in dict.fromkeys(k.split(".", 1)[1] for k in amax):
        per = [amax[k] for k in amax if k.split(".", 1)[1] == kind]
        top = max(float(a.max()) for a in per)
        med = float(torch.stack([a.median() for a in per]).median())
        ratio = max(float(a.max() / a.median()) for a in per)
        rows.append({"name": kind, "max": top, "median": med, "ratio": ratio})
    return rows


def print_outliers(a: argparse.Namespace, tok: object) -> None:
    from llmpress.engine.calibration import build_calibration

    model, _ = load_model(a.model, dtype=torch.float32, device=a.device)
    ids = build_calibration(tok, a.calib, a.nsamples, a.seqlen).to(a.device)
    print(f"\nmax |x| per input channel on {a.nsamples} x {a.seqlen} calibration tokens (dense model)\n")
    cols = [("name", "linear", ""), ("max", "largest channel", ".3g"), ("median", "median channel", ".3g")]
    print_table(activation_outliers(model, ids), [*cols, ("ratio", "max/median (worst block)", ".1f")])


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
    ap.add_argument("--rows", choices=sorted(ROWS), default="base", help="which set of rows (see above)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--outliers", action="store_true", help="also print max |x| per input channel")
    ap.add_argument("--skip-dense", action="store_true", help="leave out the dense row")
    ap.add_argument(
        "--plant-outliers",
        type=float,
        default=None,
        metavar="FACTOR",
        help="run every row on a copy of the model with 4 planted outlier channels (inputs of q/k/v, gate/up "
        "and down_proj scaled by FACTOR, the weights by 1/FACTOR: the same function)",
    )
    a = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.plant_outliers:
        from _act_rows import planted_copy

        a.model = str(planted_copy(a.model, a.plant_outliers))
    configs, prepare = ROWS[a.rows]

    _, tok = load_model(a.model)
    windows = text_windows(tok, Path(a.eval).read_text(encoding="utf-8"), 256, a.max_tokens)
    out_root = Path(tempfile.mkdtemp(prefix="llmpress-qq-"))
    dense, _ = load_model(a.model, dtype=torch.float32, device=a.device)
    prepare(dense)
    dense_dir = out_root / "dense"
    llmpress.save_compressed(dense, dense_dir, dtype=torch.float16)
    rows = [
        {
            "name": "dense fp16",
            "ppl": float("nan") if a.skip_dense else perplexity_of_windows(dense, windows, 32)["perplexity"],
            "ref": 5.831 if a.rows == "base" else None,
            "mb": dir_size(dense_dir) / 1e6,
            "time": 0.0,
        }
    ]
    del dense
    if a.outliers:
        print_outliers(a, tok)
    for name, stages, ref in configs:
        if a.only and not any(s.strip() in name for s in a.only.split(",")):
            continue
        model, _ = load_model(a.model, dtype=torch.float32, device=a.device)
        prepare(model)
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
        print(f"{name}: perplexity {ppl:.3f}, {row.get('mb', 0):.2f} MB, {dt:.0f} s", flush=True)
        del model
    if a.rows == "activations":
        from _act_rows import activation_rows
        from _act_rows import outlier_table as channel_table

        rows += activation_rows(a, tok, windows, out_root)
        channel_table(a, tok)
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
            ("mb", "safetensors MB", ".2f"),
            ("bits", "layer bits/weight", ".3f"),
            ("time", "compress s", ".1f"),
        ],
    )
    if a.rows in ("rotate", "outliers"):
        outlier_table(a.model, prepare, windows[:16], a.device)


if __name__ == "__main__":
    main()
