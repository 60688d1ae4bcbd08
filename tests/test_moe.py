"""Mixture-of-experts models: fused experts unfused into per-expert linears, every expert
compressed and calibrated, saved and reloaded with identical logits."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from models import calib_ids, tiny_mixtral, tiny_qwen2_moe, tiny_qwen3_moe
from torch import nn
from transformers import AutoModelForCausalLM

import llmpress
from llmpress.engine import moe_stats
from llmpress.errors import LlmpressError, RecipeError
from llmpress.format.runtime import LlmpressLinear
from llmpress.format.save import save_compressed, save_quantized, to_runtime
from llmpress.model.modules import select_targets
from llmpress.model.moe import (
    ExpertsLayout,
    UnfusedExperts,
    detect_layout,
    fused_tensors,
    refuse_experts,
    unfuse_experts,
)
from llmpress.model.moe_model import unfuse_model, unfused_experts
from llmpress.recipe.recipes import Recipe

PROBE = calib_ids(2, 16, seed=7)
CALIB = calib_ids(8, 32)
FUSED = [("mixtral", tiny_mixtral), ("qwen2_moe", tiny_qwen2_moe), ("qwen3_moe", tiny_qwen3_moe)]
COMPRESSED = [("mixtral", tiny_mixtral), ("qwen2_moe", tiny_qwen2_moe)]
GPTQ = {"method": "gptq", "bits": 4, "group_size": 32}
SPARSEGPT = {"method": "sparsegpt", "sparsity": 0.5}
EXPERTS = "model.layers.{i}.mlp.experts"
PROJ = ("gate_proj", "up_proj", "down_proj")


def logits(model: nn.Module, ids: torch.Tensor = PROBE) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def expert_names(layers: int = 2, experts: int = 4) -> set[str]:
    return {f"{EXPERTS.format(i=i)}.{e}.{p}" for i in range(layers) for e in range(experts) for p in PROJ}


# ------------------------------------------------------------------------------ unfuse / refuse


@pytest.mark.parametrize("name,factory", FUSED, ids=[n for n, _ in FUSED])
def test_unfuse_refuse_round_trip_is_exact(name: str, factory: Any) -> None:
    model = factory()
    model.set_experts_implementation("eager")  # the reference loop (grouped_mm may round differently)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ref = logits(model)
    fused_cls = type(model.get_submodule(EXPERTS.format(i=0)))
    assert unfuse_model(model) == [EXPERTS.format(i=0), EXPERTS.format(i=1)]
    unf = model.get_submodule(EXPERTS.format(i=0))
    assert isinstance(unf, UnfusedExperts) and unf.layout.name == "gate_up" and len(unf) == 4
    assert all(isinstance(unf[e].get_submodule(p), nn.Linear) for e in range(4) for p in PROJ)
    assert torch.equal(logits(model), ref)  # same routing, same routing weights, same sums
    # the module alone, on arbitrary routing
    x, idx, w = torch.randn(40, 64), torch.randint(0, 4, (40, 2)), torch.rand(40, 2)
    fused = refuse_experts(unf)
    assert type(fused) is fused_cls
    with torch.no_grad():
        assert torch.equal(unf(x, idx, w), fused(x, idx, w))
    for i in range(2):  # back to the fused module: the very same tensors
        model.model.layers[i].mlp.experts = refuse_experts(model.model.layers[i].mlp.experts)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert torch.equal(logits(model), ref)


class _Experts(nn.Module):
    """A transposed, interleaved, biased fused layout (like gpt-oss without its custom gate)."""

    is_transposed = True
    is_concatenated = False

    def __init__(self, e: int = 3, h: int = 16, i: int = 8) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.gate_up_proj = nn.Parameter(torch.randn(e, h, 2 * i, generator=g))
        self.gate_up_proj_bias = nn.Parameter(torch.randn(e, 2 * i, generator=g))
        self.down_proj = nn.Parameter(torch.randn(e, i, h, generator=g))
        self.down_proj_bias = nn.Parameter(torch.randn(e, h, generator=g))
        self.act_fn = nn.SiLU()

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        x, idx, w = hidden_states, top_k_index, top_k_weights
        out = torch.zeros_like(x)
        for t in range(x.shape[0]):
            for k in range(idx.shape[1]):
                e = int(idx[t, k])
                gu = x[t] @ self.gate_up_proj[e] + self.gate_up_proj_bias[e]
                h = self.act_fn(gu[0::2]) * gu[1::2]
                out[t] += (h @ self.down_proj[e] + self.down_proj_bias[e]) * w[t, k]
        return out


def test_layout_discovered_from_parameters_and_flags() -> None:
    mod = _Experts()
    lay = detect_layout(mod)
    assert lay == ExpertsLayout(
        "gate_up_interleaved_t_bias", "gate_up_proj", concatenated=False, transposed=True, bias=True
    )
    unf = unfuse_experts(mod)
    x, idx, w = torch.randn(10, 16), torch.randint(0, 3, (10, 2)), torch.rand(10, 2)
    with torch.no_grad():
        torch.testing.assert_close(unf(x, idx, w), mod(x, idx, w), rtol=1e-5, atol=1e-5)
    back = fused_tensors(unf)
    assert all(torch.equal(back[n], p) for n, p in mod.named_parameters())
    mod.down_proj = nn.Parameter(torch.randn(3, 8, 15))  # shapes that do not fit together
    assert detect_layout(mod) is None


class _OddExperts(_Experts):
    """Parameters of a known layout, but a forward with other semantics (routing weights
    applied twice): caught by the check made when unfusing; the module stays fused."""

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        return super().forward(hidden_states, top_k_index, top_k_weights * top_k_weights)


def test_a_layout_with_other_semantics_stays_fused(caplog: pytest.LogCaptureFixture) -> None:
    from llmpress.errors import ModelError

    holder = nn.Module()
    holder.experts = _OddExperts()
    with pytest.raises(ModelError, match="do not reproduce its forward"):
        unfuse_experts(holder.experts)
    with caplog.at_level(logging.WARNING, logger="llmpress.model.moe_model"):
        assert unfuse_model(holder) == []
    assert isinstance(holder.experts, _OddExperts) and "stay fused" in caplog.text


# ------------------------------------------------------------------------------ targets


def test_default_targets_reach_every_expert_but_not_routers() -> None:
    model = tiny_qwen2_moe()
    unfuse_model(model)
    names = set(select_targets(model, None))
    assert expert_names() <= names
    assert {f"model.layers.{i}.mlp.shared_expert.{p}" for i in range(2) for p in PROJ} <= names
    assert not any(n.endswith(("mlp.gate", "shared_expert_gate")) for n in names)
    assert set(select_targets(model, [r".*experts.*"])) == expert_names()
    # a router that is an nn.Linear stays reachable by an explicit regex
    assert select_targets(model, [r"shared_expert_gate$"]) == [
        f"model.layers.{i}.mlp.shared_expert_gate" for i in range(2)
    ]


def test_targeting_only_a_router_is_a_clear_error() -> None:
    model = tiny_mixtral()
    before = logits(model)
    with pytest.raises(
        RecipeError, match=r"only mixture-of-experts routers .*mlp\.gate.*MixtralTopKRouter.*experts"
    ):
        llmpress.compress(model, {**GPTQ, "targets": [r"mlp\.gate$"]}, CALIB, progress=False)
    assert type(model.model.layers[0].mlp.experts).__name__ == "MixtralExperts"  # fused again
    assert torch.equal(logits(model), before)


def test_moe_min_tokens_in_the_recipe() -> None:
    rec = Recipe.from_dict({"stages": [SPARSEGPT], "moe_min_tokens": 16})
    assert rec.moe_min_tokens == 16 and rec.to_dict()["moe_min_tokens"] == 16
    for bad in (-1, 1.5, "many", True):
        with pytest.raises(RecipeError, match="moe_min_tokens must be an integer >= 0"):
            Recipe.from_dict({"stages": [SPARSEGPT], "moe_min_tokens": bad})


# ------------------------------------------------------------------------------ compress, save, load


@pytest.fixture(scope="module")
def compressed(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], dict[str, Any]]:
    """Each MoE model compressed with GPTQ 4-bit and SparseGPT 50 %, saved and reloaded."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    base = tmp_path_factory.mktemp("moe")
    for name, factory in COMPRESSED:
        for method, stage in (("gptq", GPTQ), ("sparsegpt", SPARSEGPT)):
            model = factory()
            before = {k: v.clone() for k, v in model.state_dict().items()}
            model, report = llmpress.compress(model, stage, CALIB, progress=False)
            item: dict[str, Any] = {"model": model, "report": report, "before": before}
            item["state"] = {k: v.clone() for k, v in model.state_dict().items()}
            item["class"] = type(model.get_submodule(EXPERTS.format(i=0))).__name__
            item["quantized"] = set(report.state.quantized)
            if method == "gptq":
                d = save_quantized(model, base / f"{name}-{method}", report=report)
                to_runtime(model, result=report)  # what loading gives
            else:
                d = save_compressed(model, base / f"{name}-{method}", report=report)
            item["dir"], item["logits"] = d, logits(model)
            out[(name, method)] = item
    return out


CASES = [(n, m) for n, _ in COMPRESSED for m in ("gptq", "sparsegpt")]


@pytest.mark.parametrize("case", CASES, ids=[f"{n}-{m}" for n, m in CASES])
def test_every_expert_is_compressed(compressed: dict, case: tuple[str, str]) -> None:
    item = compressed[case]
    assert item["class"] != "UnfusedExperts"  # the model keeps its own architecture
    assert expert_names() <= set(item["report"].modules)
    before, after = item["before"], item["state"]
    for i in range(2):
        for p in ("gate_up_proj", "down_proj"):
            key = f"{EXPERTS.format(i=i)}.{p}"
            for e in range(4):
                assert not torch.equal(before[key][e], after[key][e]), f"{key}[{e}] unchanged"
                if case[1] == "sparsegpt":
                    assert abs(float((after[key][e] == 0).float().mean()) - 0.5) < 0.02
    if case[1] == "gptq":
        assert expert_names() <= item["quantized"]
    for i in range(2):
        if case[0] == "mixtral":
            w = before[f"model.layers.{i}.mlp.gate.weight"]
            assert torch.equal(after[f"model.layers.{i}.mlp.gate.weight"], w)  # routers untouched
        else:
            w = before[f"model.layers.{i}.mlp.shared_expert_gate.weight"]
            assert torch.equal(after[f"model.layers.{i}.mlp.shared_expert_gate.weight"], w)


@pytest.mark.parametrize("case", CASES, ids=[f"{n}-{m}" for n, m in CASES])
def test_save_and_reload_gives_identical_logits(compressed: dict, case: tuple[str, str]) -> None:
    item = compressed[case]
    cfg = json.loads((Path(item["dir"]) / "config.json").read_text())
    if case[1] == "gptq":  # packed experts stay unfused on disk, unfused again at load
        q = cfg["quantization_config"]
        assert q["experts"] == {EXPERTS.format(i=i): "gate_up" for i in range(2)}
        assert expert_names() <= set(q["modules"])
        loaded = AutoModelForCausalLM.from_pretrained(item["dir"])
        assert isinstance(loaded.get_submodule(EXPERTS.format(i=1)), UnfusedExperts)
        assert isinstance(loaded.get_submodule(f"{EXPERTS.format(i=1)}.3.down_proj"), LlmpressLinear)
    else:  # dense: the standard fused parameters, a plain transformers checkpoint
        assert "quantization_config" not in cfg
        loaded = AutoModelForCausalLM.from_pretrained(item["dir"], dtype=torch.float32)
        assert type(loaded.get_submodule(EXPERTS.format(i=0))).__name__ == item["class"]
    assert torch.equal(logits(loaded.eval()), item["logits"])


def test_sparse_packed_experts_reload_identically(tmp_path: Path) -> None:
    model, report = llmpress.compress(tiny_qwen3_moe(), SPARSEGPT, CALIB, progress=False)
    d = save_quantized(model, tmp_path / "bitmask", report=report, sparse="bitmask")
    to_runtime(model, sparse="bitmask", result=report)
    loaded = AutoModelForCausalLM.from_pretrained(d)
    assert (
        json.loads((d / "config.json").read_text())["quantization_config"]["modules"][
            f"{EXPERTS.format(i=0)}.2.up_proj"
        ]["format"]
        == "bitmask"
    )
    assert torch.equal(logits(loaded), logits(model))


def test_already_unfused_experts_just_work() -> None:
    """Per-expert nn.Linear layouts need no unfusing: compressed as they are, left as they are."""
    model = tiny_mixtral()
    unfuse_model(model)
    model, report = llmpress.compress(model, SPARSEGPT, CALIB, progress=False)
    assert isinstance(model.get_submodule(EXPERTS.format(i=0)), UnfusedExperts)
    assert expert_names() <= set(report.modules)


def test_compressed_tensors_refuses_experts(tmp_path: Path) -> None:
    from llmpress.format.compressed_tensors import save_compressed_tensors

    model, report = llmpress.compress(tiny_mixtral(), {**GPTQ, "symmetric": True}, CALIB, progress=False)
    with pytest.raises(LlmpressError, match=r"mixture-of-experts expert projections.*--format llmpress"):
        save_compressed_tensors(model, tmp_path / "ct", report=report)
    assert not (tmp_path / "ct").exists()


# ------------------------------------------------------------------------------ statistics fallback


class _NeverExpert3(nn.Module):
    """Mixtral's router with expert 3 masked out: it never receives a routed token."""

    def __init__(self, router: nn.Module) -> None:
        super().__init__()
        self.inner = router

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = F.linear(h.reshape(-1, h.shape[-1]), self.inner.weight)
        logits[:, 3] = float("-inf")
        top, idx = torch.topk(torch.softmax(logits.float(), dim=-1), 2, dim=-1)
        return logits, top / top.sum(-1, keepdim=True), idx


def _starved_mixtral() -> nn.Module:
    model = tiny_mixtral()
    for layer in model.model.layers:
        layer.mlp.gate = _NeverExpert3(layer.mlp.gate)
    return model


@pytest.mark.parametrize("stage", [GPTQ, SPARSEGPT], ids=["gptq", "sparsegpt"])
def test_expert_without_tokens_gets_all_token_statistics(
    stage: dict, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    seen: dict[str, int] = {}
    real = moe_stats._all_token_stats

    def spy(*args: Any, **kwargs: Any) -> Any:
        fb = real(*args, **kwargs)
        seen.update({n: s.nsamples for n, s in fb.stats.items()})
        return fb

    monkeypatch.setattr(moe_stats, "_all_token_stats", spy)
    model = _starved_mixtral()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with caplog.at_level(logging.INFO, logger="llmpress.engine.moe_stats"):
        model, report = llmpress.compress(
            model, {"stages": [stage], "moe_min_tokens": 1}, CALIB, progress=False
        )
    info = report.modules[f"{EXPERTS.format(i=0)}.3.up_proj"].info
    assert info["moe_routed_tokens"] == 0 and info["moe_statistics"] == "all tokens"
    info = report.modules[f"{EXPERTS.format(i=0)}.2.up_proj"].info
    assert info["moe_routed_tokens"] > 0 and info["moe_statistics"] == "routed"
    n_tokens = CALIB.numel()
    assert seen == {f"mlp.experts.3.{p}": n_tokens for p in PROJ}  # only the starved expert, all tokens
    assert "model.layers.1.mlp.experts.3: 0 routed tokens < moe_min_tokens=1" in caplog.text
    for key in ("gate_up_proj", "down_proj"):
        k = f"{EXPERTS.format(i=1)}.{key}"
        assert not torch.equal(model.state_dict()[k][3], before[k][3])


def test_fallback_off_still_compresses_an_expert_with_no_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    """``moe_min_tokens: 0``: empty statistics (X^T X = 0), damped to the identity; no failure."""
    called: list[Any] = []
    monkeypatch.setattr(moe_stats, "_all_token_stats", lambda *a, **k: called.append(a))
    model = _starved_mixtral()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model, report = llmpress.compress(model, {"stages": [GPTQ], "moe_min_tokens": 0}, CALIB, progress=False)
    assert not called
    k = f"{EXPERTS.format(i=0)}.down_proj"
    assert not torch.equal(model.state_dict()[k][3], before[k][3])
    assert torch.isfinite(model.state_dict()[k]).all()
    assert f"{EXPERTS.format(i=0)}.3.down_proj" in report.modules


def test_default_threshold_uses_routed_tokens_when_enough(monkeypatch: pytest.MonkeyPatch) -> None:
    called: list[Any] = []
    monkeypatch.setattr(moe_stats, "_all_token_stats", lambda *a, **k: called.append(a))
    big = calib_ids(16, 64)  # ~512 routed tokens per expert
    llmpress.compress(tiny_qwen3_moe(), SPARSEGPT, big, progress=False)
    assert not called


def test_unfused_experts_helper_lists_modules() -> None:
    model = tiny_qwen3_moe()
    unfuse_model(model)
    assert sorted(unfused_experts(model)) == [EXPERTS.format(i=0), EXPERTS.format(i=1)]


def test_allocation_search_covers_a_starved_expert() -> None:
    """The level database (allocation searches) uses the same fallback: no expert lacks statistics."""
    stage = {**SPARSEGPT, "allocation": {"method": "owl"}}
    model, report = llmpress.compress(
        _starved_mixtral(), {"stages": [stage], "moe_min_tokens": 8}, CALIB, progress=False
    )
    assert expert_names() <= set(report.modules)
    assert abs(report.overall_sparsity - 0.5) < 0.01


# ------------------------------------------------------------------------------ command line


@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer: Any) -> Path:
    from models import save_model_dir

    return save_model_dir(
        tmp_path_factory.mktemp("models") / "tiny-mixtral", tiny_mixtral(vocab_size=256), tokenizer
    )


def _cli_args(model_dir: Path, recipe: Path, out: Path, *extra: str) -> list[str]:
    from models import DATA_DIR

    calib = str(DATA_DIR / "calib.txt")
    return ["compress", str(model_dir), "--recipe", str(recipe), "--calib", calib, "--out", str(out),
            "--nsamples", "8", "--seqlen", "32", *extra]  # fmt: skip


def test_cli_compresses_and_saves_an_moe_model(mixtral_dir: Path, tmp_path: Path) -> None:
    from llmpress.cli.main import main

    recipe = tmp_path / "r.yaml"
    recipe.write_text("stages:\n  - method: gptq\n    bits: 4\n    group_size: 32\nmoe_min_tokens: 32\n")
    assert main(_cli_args(mixtral_dir, recipe, tmp_path / "out")) == 0
    q = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert (
        set(q["experts"]) == {EXPERTS.format(i=i) for i in range(2)} and q["recipe"]["moe_min_tokens"] == 32
    )
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert torch.isfinite(logits(loaded)).all()


def test_cli_refuses_compressed_tensors_experts_before_work(
    mixtral_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from llmpress.cli.main import main

    recipe = tmp_path / "r.yaml"
    recipe.write_text("stages:\n  - method: gptq\n    bits: 4\n    group_size: 32\n    symmetric: true\n")
    assert main([*_cli_args(mixtral_dir, recipe, tmp_path / "out"), "--format", "compressed-tensors"]) == 2
    err = capsys.readouterr().err
    assert "error: " in err and "mixture-of-experts expert projections" in err
    assert not (tmp_path / "out").exists()


def test_structured_pruning_of_experts_saves_unfused(tmp_path: Path) -> None:
    """FLAP removes neurons per expert: the experts cannot be fused back, so they stay per-expert
    layers in memory and on disk (``dense`` entries) and reload identically."""
    model, report = llmpress.compress(tiny_mixtral(), {"method": "flap", "ratio": 0.2}, CALIB, progress=False)
    experts = model.get_submodule(EXPERTS.format(i=0))
    assert isinstance(experts, UnfusedExperts)
    widths = {experts[e].down_proj.in_features for e in range(4)}
    assert min(widths) < 64  # some expert lost neurons
    d = save_compressed(model, tmp_path / "flap", report=report)
    q = json.loads((d / "config.json").read_text())["quantization_config"]
    assert set(q["experts"]) == {EXPERTS.format(i=i) for i in range(2)}
    assert q["modules"][f"{EXPERTS.format(i=0)}.0.down_proj"]["format"] == "dense"
    loaded = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    assert torch.equal(logits(loaded), logits(model))


@pytest.mark.parametrize(
    "edit,message",
    [
        (
            lambda e: e.update({EXPERTS.format(i=0): "up"}),
            r"stores experts of layout 'up', but this .* builds 'gate_up'",
        ),
        (
            lambda e: e.update({"model.layers.0.mlp": "gate_up"}),
            r"names 'model.layers.0.mlp', which is not a fused",
        ),
    ],
    ids=["layout", "module"],
)
def test_load_refuses_experts_that_do_not_match(
    compressed: dict, tmp_path: Path, edit: Any, message: str
) -> None:
    import shutil

    from llmpress.errors import CheckpointError

    d = tmp_path / "copy"
    shutil.copytree(compressed[("mixtral", "gptq")]["dir"], d)
    cfg = json.loads((d / "config.json").read_text())
    edit(cfg["quantization_config"]["experts"])
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=message):
        AutoModelForCausalLM.from_pretrained(d)
