"""Structured pruning on the reference model: perplexity, parameters and speed per method.

    python examples/benchmarks/structured_quality.py [--ratios 0.2,0.5] [--device cuda]

Removes heads and neurons (``--structures heads,neurons,hidden`` adds the hidden width) of
../shared/ref-lm/pycoder-19m (``ratio`` = fraction of the
blocks' parameters) with each structured method, calibrated on windows of calib.txt, and
scores perplexity on the first ``--max-tokens`` tokens of eval.txt in windows of
``--seqlen`` (128, as in the FLAP paper's tables), next to the dense model measured in the
same run. Speed: prefill (one ``--prefill`` token forward, batch 1) and greedy decode with
a KV cache (``--decode`` new tokens) against the dense model, the two timed in alternation.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from _common import REF_LM, print_table

import llmpress
from llmpress.cli.evaluate import perplexity_of_windows, text_windows
from llmpress.format.loading import load_model
from llmpress.model.modules import find_blocks

#: a search sized for a CPU: 20 generations of 8 offspring, selection on 256/1024/4096 tokens
EVOPRESS = {
    "method": "evopress",
    "generations": 20,
    "offspring": 8,
    "tokens": [256, 1024, 4096],
    "survivors": [2, 1],
}

#: rows: label -> stage options (``ratio`` is added per column)
VARIANTS = {
    "magnitude_structured": {"method": "magnitude_structured"},
    "minitron": {"method": "minitron"},
    "llm_pruner": {"method": "llm_pruner"},
    "flap": {"method": "flap"},
    "flap uniform": {"method": "flap", "allocation": "uniform"},
    "flap no-comp": {"method": "flap", "bias_compensation": False},
    "flap +ls": {"method": "flap", "reconstruct": True},
    "minitron +ls": {"method": "minitron", "reconstruct": True},
    # per-block widths chosen by EvoPress (levels: the method's uniform pruning of each block)
    "minitron evopress": {"method": "minitron", "allocation": EVOPRESS},
    "llm_pruner evopress": {"method": "llm_pruner", "allocation": EVOPRESS},
    "flap evopress": {"method": "flap", "allocation": EVOPRESS},
}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _time(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


@torch.no_grad()
def speedup(
    dense: torch.nn.Module, model: torch.nn.Module, device: str, prefill: int, decode: int, repeats: int
) -> tuple[float, float]:
    """(prefill, decode) speed of ``model`` relative to ``dense``: the two are timed in
    alternation and each keeps its best run, so a busy machine slows both alike."""
    ids = torch.randint(1, 1000, (1, prefill), generator=torch.Generator().manual_seed(0)).to(device)
    best: dict[str, list[float]] = {"dense": [1e9, 1e9], "model": [1e9, 1e9]}
    for _ in range(repeats + 1):  # the first round warms up (and counts: best-of)
        for key, m in (("dense", dense), ("model", model)):
            prefill_run = partial(m, input_ids=ids, use_cache=False)
            decode_run = partial(
                m.generate,
                ids[:, :16],
                max_new_tokens=decode,
                min_new_tokens=decode,
                do_sample=False,
                use_cache=True,
            )
            for k, run in enumerate((prefill_run, decode_run)):
                _sync(device)
                best[key][k] = min(best[key][k], _time(run))
                _sync(device)
    return best["dense"][0] / best["model"][0], best["dense"][1] / best["model"][1]


def block_params(model: torch.nn.Module) -> int:
    _, blocks = find_blocks(model)
    return sum(p.numel() for b in blocks for p in b.parameters())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(REF_LM / "pycoder-19m"))
    ap.add_argument("--eval", default=str(REF_LM / "eval.txt"))
    ap.add_argument("--calib", default=str(REF_LM / "calib.txt"))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--ratios", default="0.2,0.5")
    ap.add_argument(
        "--variants", default="magnitude_structured,minitron,llm_pruner,flap", help=",".join(VARIANTS)
    )
    ap.add_argument("--structures", default="heads,neurons")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=16_384, help="score the first N eval tokens")
    ap.add_argument("--prefill", type=int, default=256)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False

    _, tok = load_model(a.model)
    windows = text_windows(tok, Path(a.eval).read_text(encoding="utf-8"), a.seqlen, a.max_tokens)

    def fresh() -> torch.nn.Module:
        m, _ = load_model(a.model, dtype=torch.float32, device=a.device)
        return m

    dense = fresh()
    n_dense, n_dense_blocks = sum(p.numel() for p in dense.parameters()), block_params(dense)
    ppl = perplexity_of_windows(dense, windows, batch_size=32)["perplexity"]
    rows = [
        {"method": "dense", "ratio": 0.0, "ppl": ppl, "params": n_dense / 1e6, "prefill": 1.0, "decode": 1.0}
    ]
    for ratio in [float(r) for r in a.ratios.split(",")]:
        for label in a.variants.split(","):
            stage = {**VARIANTS[label], "ratio": ratio, "structures": a.structures.split(",")}
            model = fresh()
            t = time.perf_counter()
            llmpress.compress(
                model,
                {"stages": [stage]},
                a.calib,
                tokenizer=tok,
                nsamples=a.nsamples,
                seqlen=a.seqlen,
                seed=a.seed,
                device=a.device,
                progress=False,
            )
            dt = time.perf_counter() - t
            ppl = perplexity_of_windows(model, windows, batch_size=32)["perplexity"]
            pre, dec = speedup(dense, model, a.device, a.prefill, a.decode, a.repeats)
            heads = [b.self_attn.q_proj.out_features // b.self_attn.head_dim for b in model.model.layers]
            widths = [b.mlp.down_proj.in_features for b in model.model.layers]
            rows.append(
                {
                    "method": label,
                    "ratio": ratio,
                    "removed": 1 - block_params(model) / n_dense_blocks,
                    "ppl": ppl,
                    "params": sum(p.numel() for p in model.parameters()) / 1e6,
                    "prefill": pre,
                    "decode": dec,
                    "hidden": model.config.hidden_size,
                    "heads": " ".join(map(str, heads)),
                    "widths": " ".join(map(str, widths)),
                    "time": dt,
                }
            )
            del model
            print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in rows[-1].items()}, flush=True)
    print(
        f"\nperplexity on the first {windows.numel()} tokens of {a.eval} in windows of {a.seqlen}; "
        f"calibration {a.nsamples} x {a.seqlen}; structures {a.structures}; device {a.device}; "
        f"speed: prefill of {a.prefill} tokens and decode of {a.decode} tokens against the dense model, "
        f"timed in alternation (best of {a.repeats + 1})\n"
    )
    print_table(
        rows,
        [
            ("method", "method", ""),
            ("ratio", "ratio", ".2f"),
            ("removed", "block params removed", ".4f"),
            ("ppl", "perplexity", ".3f"),
            ("params", "params (M)", ".2f"),
            ("prefill", "prefill speed x", ".2f"),
            ("decode", "decode speed x", ".2f"),
            ("hidden", "hidden", ""),
            ("heads", "heads per layer", ""),
            ("widths", "MLP width per layer", ""),
            ("time", "compress s", ".1f"),
        ],
    )


if __name__ == "__main__":
    main()
