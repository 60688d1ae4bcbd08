"""Structured neuron pruning of mixture-of-experts blocks: every expert (and a shared expert) is
a structure of its own, the ratio counts over the whole block, the report lists every expert and
the saved folder reloads with the same per-expert widths and logits."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from models import calib_ids, tiny_mixtral, tiny_qwen2_moe, tiny_qwen3_moe
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM

import llmpress
from llmpress.format.save import save_compressed
from llmpress.math.structured_math import Units, allocate_uniform
from llmpress.model.moe_model import unfused_experts

PROBE = calib_ids(2, 16, seed=7)
CALIB = calib_ids(8, 32)
FACTORIES = {"mixtral": tiny_mixtral, "qwen2_moe": tiny_qwen2_moe, "qwen3_moe": tiny_qwen3_moe}
WIDTH = 64  # every tiny expert's (and the shared expert's) intermediate size
RATIO = 0.2  # one expert's share of a block is ~0.2: the old code refused this ratio
#: (model, method, allocation): every method and both allocations, every model
CASES = [
    ("mixtral", "magnitude_structured", "uniform"),
    ("qwen2_moe", "magnitude_structured", "uniform"),
    ("qwen3_moe", "magnitude_structured", "uniform"),
    ("mixtral", "minitron", "global"),
    ("qwen2_moe", "flap", "global"),
    ("qwen3_moe", "llm_pruner", "uniform"),
    ("mixtral", "llm_pruner", "global"),
]


def mlp_widths(model: nn.Module) -> dict[str, int]:
    """Neurons of every expert (``...experts.3``) and shared expert of ``model``."""
    out = {}
    for name, unf in unfused_experts(model).items():
        out.update({f"{name}.{e}": unf[e].down_proj.in_features for e in range(len(unf))})
    for name, mod in model.named_modules():
        if name.endswith("mlp.shared_expert"):
            out[name] = mod.down_proj.in_features
    return out


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=PROBE).logits


@pytest.fixture(scope="module")
def pruned() -> Callable[[tuple[str, str, str]], tuple[nn.Module, Any]]:
    """``case -> (model, report)``, each case compressed once per module."""
    cache: dict[tuple[str, str, str], tuple[nn.Module, Any]] = {}

    def get(case: tuple[str, str, str]) -> tuple[nn.Module, Any]:
        if case not in cache:
            arch, method, allocation = case
            recipe = {"method": method, "ratio": RATIO, "structures": ["neurons"], "allocation": allocation}
            cache[case] = llmpress.compress(FACTORIES[arch](), recipe, CALIB, progress=False)
        return cache[case]

    return get


@pytest.mark.parametrize("case", CASES, ids=["-".join(c) for c in CASES])
def test_every_expert_is_pruned_and_the_ratio_counts_over_the_block(
    pruned: Callable, case: tuple[str, str, str]
) -> None:
    arch, _, allocation = case
    model, report = pruned(case)
    widths = mlp_widths(model)
    experts = 2 * (5 if arch == "qwen2_moe" else 4)  # two blocks; Qwen2-MoE: and its shared expert
    assert len(widths) == experts
    assert all(0 < w < WIDTH for w in widths.values()), widths  # every expert lost neurons
    if allocation == "uniform":  # the same fraction of each expert (the remainder spread by one)
        assert max(widths.values()) - min(widths.values()) <= 1, widths
    assert abs(report.structure["removed_fraction"] - RATIO) < 0.01
    per_block = report.structure["layers"][0]
    assert per_block["neurons"][0] == WIDTH * experts // 2
    assert {k for k in per_block if k.startswith("neurons:")} == {
        f"neurons:{k.removeprefix('model.layers.0.')}" for k in widths if k.startswith("model.layers.0.")
    }
    for mlp, width in widths.items():  # the report lists every expert's layers with their shapes
        assert report.modules[f"{mlp}.down_proj"].shape == (64, width)
        assert report.modules[f"{mlp}.gate_proj"].shape == (width, 64)
    if arch == "qwen2_moe":  # the shared expert's gate reads the hidden stream: not an MLP
        assert model.model.layers[0].mlp.shared_expert_gate.weight.shape == (1, 64)


@pytest.mark.parametrize("case", CASES[:3] + CASES[4:5], ids=["-".join(c) for c in CASES[:3] + CASES[4:5]])
def test_pruned_experts_reload_with_their_widths_and_logits(
    pruned: Callable, tmp_path: Path, case: tuple[str, str, str]
) -> None:
    model, report = pruned(case)
    d = save_compressed(model, tmp_path / "out", report=report)
    loaded = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    assert mlp_widths(loaded) == mlp_widths(model)
    torch.testing.assert_close(logits(loaded), logits(model), rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer: Any) -> Path:
    from models import save_model_dir

    return save_model_dir(
        tmp_path_factory.mktemp("models") / "tiny-mixtral", tiny_mixtral(vocab_size=256), tokenizer
    )


@pytest.mark.parametrize("method,ratio", [("minitron", 0.1), ("magnitude_structured", 0.2)])
def test_cli_prunes_every_expert(mixtral_dir: Path, tmp_path: Path, method: str, ratio: float) -> None:
    """The issue's command: every expert on disk loses the same share, the report lists them all
    (before: only ``experts.3`` at 0.1, and 0.2 refused as one expert's share of the block)."""
    from models import DATA_DIR

    from llmpress.cli.main import main

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"stages:\n  - method: {method}\n    ratio: {ratio}\n    structures: [neurons]\n")
    out = tmp_path / "out"
    args = ["compress", str(mixtral_dir), "--recipe", str(recipe), "--calib", str(DATA_DIR / "calib.txt"),
            "--out", str(out), "--nsamples", "8", "--seqlen", "32"]  # fmt: skip
    assert main(args) == 0
    saved = load_file(out / "model.safetensors")
    widths = {k: t.shape[1] for k, t in saved.items() if k.endswith("down_proj.weight") and "experts" in k}
    assert len(widths) == 8 and len(set(widths.values())) == 1, widths  # 2 blocks x 4 experts, one width
    report = json.loads((out / "llmpress_report.json").read_text())
    assert {k.removesuffix(".weight") for k in widths} <= set(report["modules"])
    assert abs(report["structure"]["removed_fraction"] - ratio) < 0.01


def _units(n: int, cost: int, kind: str = "neurons") -> Units:
    return Units(kind, torch.arange(n, dtype=torch.float32), cost, tuple((i,) for i in range(n)))


def test_uniform_allocation_takes_the_same_fraction_of_every_mlp() -> None:
    experts = [_units(63, 10) for _ in range(4)]
    counts = allocate_uniform(experts, 4 * 6.5 * 10)  # 6.5 neurons of each expert
    assert sorted(counts) == [6, 6, 7, 7] and sum(counts) == 26
    shared = _units(127, 10)  # a wider shared expert loses the same fraction
    counts = allocate_uniform([*experts, shared], 0.25 * 10 * (4 * 63 + 127))
    assert all(abs(k / len(u) - 0.25) < 1.5 / len(u) for k, u in zip(counts, [*experts, shared]))
    heads = _units(1, 1000, "heads")  # a coarse structure first, at the block's fraction
    assert allocate_uniform([heads, _units(63, 10)], 0.1 * 10 * 63) == [0, 6]


def test_a_ratio_beyond_every_experts_neurons_is_refused_once() -> None:
    """The limit is all experts' neurons (one kept in each), not one expert's share."""
    from llmpress.errors import ModelError

    recipe = {"method": "magnitude_structured", "ratio": 0.9, "structures": ["neurons"]}
    with pytest.raises(ModelError, match=r"every neurons of this block \(at most 0\.7\d\d of its") as e:
        llmpress.compress(tiny_mixtral(), recipe, CALIB, progress=False)
    assert str(e.value).count("neurons") == 1
