"""Structured pruning: structures found from the module graph, exact shapes and ratios, GQA
groups kept consistent, FLAP's compensation, and smaller models that save and load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from models import DATA_DIR, calib_ids, run_without_llmpress, tiny_llama, tiny_mistral, tiny_opt, tiny_qwen2
from transformers import AutoModelForCausalLM

import llmpress
from llmpress.cli.main import main
from llmpress.errors import ModelError, RecipeError
from llmpress.format.save import save_compressed
from llmpress.math.structured_math import compensation_bias, reconstruct
from llmpress.model.modules import find_blocks
from llmpress.model.structures import discover
from llmpress.plugins.flap import FlapConfig

PROBE = calib_ids(2, 16, seed=7)
FACTORIES = {"llama": tiny_llama, "qwen2": tiny_qwen2, "mistral": tiny_mistral, "opt": tiny_opt}
METHODS = ["magnitude_structured", "flap", "minitron", "llm_pruner"]


def _logits(model: torch.nn.Module, ids: torch.Tensor = PROBE) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def _block_params(model: torch.nn.Module) -> int:
    _, blocks = find_blocks(model)
    return sum(p.numel() for b in blocks for p in b.parameters())


def _compress(model: torch.nn.Module, **stage: object) -> tuple[torch.nn.Module, object]:
    return llmpress.compress(model, dict(stage), calib_ids(), progress=False)


# ------------------------------------------------------------------ structures


@pytest.mark.parametrize("arch", list(FACTORIES))
def test_structures_are_found_from_the_module_graph(arch: str) -> None:
    model = FACTORIES[arch]()
    _, blocks = find_blocks(model)
    s = discover(blocks[0], model.config, model.config.hidden_size)
    assert s.heads is not None and len(s.neurons) == 1
    assert s.heads.head_dim == 8 and s.heads.n_heads == 4
    assert s.heads.n_kv == (4 if arch == "opt" else 2)
    assert s.neurons[0].width == 64 and len(s.neurons[0].producers) == (1 if arch == "opt" else 2)
    if arch != "opt":
        assert s.heads.q == ("self_attn.q_proj",) and s.heads.o == "self_attn.o_proj"
        assert set(s.heads.kv) == {"self_attn.k_proj", "self_attn.v_proj"}
        assert s.neurons[0].consumer == "mlp.down_proj"


def test_a_fused_projection_is_refused_naming_the_block() -> None:
    class Fused(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.qkv_proj = torch.nn.Linear(32, 96)
            self.o_proj = torch.nn.Linear(32, 32)

    block = torch.nn.Module()
    block.self_attn = Fused()
    with pytest.raises(ModelError, match="model.layers.0: no attention heads or MLP neurons"):
        discover(block, None, 32, "model.layers.0")


# ------------------------------------------------------------------ shapes, ratios, equivalence


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", ["llama", "qwen2", "opt"])
def test_ratio_is_met_up_to_one_structure(arch: str, method: str) -> None:
    model = FACTORIES[arch]()
    dense = _block_params(model)
    model, _ = _compress(model, method=method, ratio=0.4, structures=["heads", "neurons"])
    achieved = 1 - _block_params(model) / dense
    bias_extra = 2 * 32 * 2 / dense  # compensation may add an o_proj and a down_proj bias per block
    assert abs(achieved - 0.4) <= 96 / dense + bias_extra, achieved
    assert torch.isfinite(_logits(model)).all()


def test_uniform_shapes_are_exact_on_gqa() -> None:
    """Tiny Llama block: 9280 parameters; 40 % = 3712 = one head per key/value group (1024)
    and 28 neurons (28 x 96)."""
    model, report = _compress(tiny_llama(), method="magnitude_structured", ratio=0.4)
    for block in model.model.layers:
        attn = block.self_attn
        assert attn.q_proj.weight.shape == (16, 32) and attn.o_proj.weight.shape == (32, 16)
        assert attn.k_proj.weight.shape == (16, 32) and attn.v_proj.weight.shape == (16, 32)
        assert attn.num_key_value_groups == 1
        assert block.mlp.up_proj.weight.shape == (36, 32) and block.mlp.down_proj.weight.shape == (32, 36)
    assert report.modules["model.layers.0.mlp.down_proj"].shape == (32, 36)


@pytest.mark.parametrize(
    "arch,head_mode", [("llama", "query"), ("llama", "group"), ("qwen2", "query"), ("opt", "auto")]
)
def test_removal_equals_masking_the_consumer_columns(arch: str, head_mode: str) -> None:
    """Removing heads/neurons computes exactly what the dense model computes with the removed
    o_proj/down_proj input columns zeroed: GQA groups and head counts stay consistent."""
    dense = FACTORIES[arch]()
    model, result = _compress(FACTORIES[arch](), method="llm_pruner", ratio=0.45, head_mode=head_mode)
    state = result.state
    touched = 0
    for name, res in state.layers.items():
        if res.removed_cols is not None:
            w = dense.get_submodule(name).weight
            with torch.no_grad():
                w[:, res.removed_cols] = 0
            touched += 1
    _, blocks = find_blocks(model)
    assert touched == 2 * len(blocks)
    if head_mode == "group":  # a whole key/value head went
        assert model.model.layers[0].self_attn.k_proj.weight.shape[0] == 8
    assert torch.allclose(_logits(model), _logits(dense), atol=1e-5)


@pytest.mark.parametrize("structures,ratio", [(["neurons"], 10 * 96 / 9280), (["heads"], 1024 / 9280)])
def test_pruning_zero_importance_structures_leaves_the_function_unchanged(
    structures: list[str], ratio: float
) -> None:
    model = tiny_llama()
    with torch.no_grad():
        for block in model.model.layers:
            block.mlp.gate_proj.weight[:10] = 0
            block.mlp.up_proj.weight[:10] = 0
            block.mlp.down_proj.weight[:, :10] = 0
            for h in (1, 3):  # one query head in each key/value group
                block.self_attn.q_proj.weight[8 * h : 8 * h + 8] = 0
                block.self_attn.o_proj.weight[:, 8 * h : 8 * h + 8] = 0
    before = _logits(model)
    model, _ = _compress(model, method="magnitude_structured", ratio=ratio, structures=structures)
    if structures == ["neurons"]:
        assert model.model.layers[0].mlp.down_proj.weight.shape == (32, 54)
    else:
        assert model.model.layers[0].self_attn.q_proj.weight.shape == (16, 32)
    assert torch.allclose(_logits(model), before, atol=1e-5)


def test_nothing_pruned_leaves_the_output_unchanged() -> None:
    before = _logits(tiny_qwen2())
    model, _ = _compress(tiny_qwen2(), method="flap", ratio=0.0)
    assert torch.equal(_logits(model), before)


# ------------------------------------------------------------------ compensation


def test_bias_compensation_preserves_the_mean_output() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 24, generator=g) + torch.linspace(-2, 2, 24)  # [n, in], non-zero means
    w = torch.randn(16, 24, generator=g)
    gone = torch.tensor([1, 5, 7, 20])
    keep = torch.tensor([i for i in range(24) if i not in gone.tolist()])
    b = compensation_bias(w, x.mean(0), gone)
    y_dense = x @ w.t()
    y_pruned = x[:, keep] @ w[:, keep].t() + b
    assert torch.allclose(y_pruned.mean(0), y_dense.mean(0), atol=1e-4)
    assert (y_pruned - y_dense).square().mean() < (x[:, keep] @ w[:, keep].t() - y_dense).square().mean()
    # least squares (with a fitted bias) does better still
    w2, b2 = reconstruct(w, x.t() @ x / len(x), keep, x.mean(0), damp=1e-6)
    assert b2 is not None
    y_ls = x[:, keep] @ w2.t() + b2
    assert (y_ls - y_dense).square().mean() < (y_pruned - y_dense).square().mean()


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_flap_compensation_lowers_the_output_error_on_calibration_data(arch: str) -> None:
    ids = calib_ids()
    ref = _logits(FACTORIES[arch](), ids)
    err = {}
    for comp, rec in [(False, False), (True, False), (True, True)]:
        model, _ = _compress(
            FACTORIES[arch](), method="flap", ratio=0.3, bias_compensation=comp, reconstruct=rec
        )
        err[(comp, rec)] = float((_logits(model, ids) - ref).square().mean())
    assert err[(True, False)] < err[(False, False)]
    assert err[(True, True)] < err[(True, False)]


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    "stage,match",
    [
        ({"ratio": 1.0}, "ratio 1.0 is outside"),
        ({"ratio": -0.1}, "outside"),
        ({"structures": ["rows"]}, "unknown structure"),
        ({"allocation": "evo"}, "allocation"),
        ({"neuron_multiple": 0}, "neuron_multiple"),
    ],
)
def test_bad_options_are_refused(stage: dict, match: str) -> None:
    with pytest.raises(RecipeError, match=match):
        llmpress.compress(tiny_llama(), {"method": "flap", **stage}, calib_ids(), progress=False)


def test_a_ratio_that_would_remove_every_head_names_the_block() -> None:
    with pytest.raises(ModelError, match="model.layers.0: ratio 0.2 would remove every heads"):
        _compress(tiny_llama(), method="magnitude_structured", ratio=0.2, structures=["heads"])


# ------------------------------------------------------------------ export


def test_uniform_shapes_save_a_standard_config_that_plain_transformers_loads(tmp_path: Path) -> None:
    model, report = _compress(tiny_llama(), method="flap", ratio=0.4, allocation="uniform")
    save_compressed(model, tmp_path / "m", report=report)
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert "quantization_config" not in cfg
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (2, 2, 8)
    assert cfg["intermediate_size"] == 36 and cfg["attention_bias"] and cfg["mlp_bias"]
    expect = _logits(model)
    logits, gen = run_without_llmpress(tmp_path / "m", PROBE, tmp_path)
    assert torch.allclose(logits, expect, atol=1e-5)
    assert torch.equal(gen, model.generate(PROBE[:1, :4], max_new_tokens=6, do_sample=False, use_cache=True))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_non_uniform_shapes_reload_and_generate(tmp_path: Path, arch: str) -> None:
    model, report = _compress(FACTORIES[arch](), method="flap", ratio=0.35)  # global: widths differ
    widths = [b.mlp.down_proj.weight.shape[1] for b in model.model.layers]
    heads = [b.self_attn.q_proj.weight.shape[0] for b in model.model.layers]
    assert len(set(widths)) > 1 or len(set(heads)) > 1
    save_compressed(model, tmp_path / "m", report=report)
    qc = json.loads((tmp_path / "m" / "config.json").read_text())["quantization_config"]
    assert any(e.get("bias") for e in qc["modules"].values())
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    for a, b in zip(loaded.model.layers, model.model.layers):
        assert a.self_attn.num_key_value_groups == b.self_attn.num_key_value_groups
        assert a.mlp.down_proj.weight.shape == b.mlp.down_proj.weight.shape
    assert torch.allclose(_logits(loaded), _logits(model), atol=1e-6)
    gen = loaded.generate(PROBE[:1, :4], max_new_tokens=6, do_sample=False, use_cache=True)
    ref = model.generate(PROBE[:1, :4], max_new_tokens=6, do_sample=False, use_cache=True)
    assert torch.equal(gen, ref)


def test_structured_then_gptq_saves_packed_and_reloads(tmp_path: Path) -> None:
    recipe = {
        "stages": [
            {"method": "flap", "ratio": 0.3, "neuron_multiple": 8},
            {"method": "gptq", "bits": 4, "group_size": 8},
        ]
    }
    model, report = llmpress.compress(tiny_llama(), recipe, calib_ids(), progress=False)
    assert all(b.mlp.down_proj.weight.shape[1] % 8 == 0 for b in model.model.layers)
    assert report.state.quantized
    llmpress.save_result(model, tmp_path / "m", report=report)
    qc = json.loads((tmp_path / "m" / "config.json").read_text())["quantization_config"]
    assert {e["format"] for e in qc["modules"].values()} == {"int"}
    assert (
        qc["modules"]["model.layers.0.mlp.down_proj"]["in_features"]
        == model.model.layers[0].mlp.down_proj.weight.shape[1]
    )
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    expect = _logits(llmpress.format.save.to_runtime(model, result=report))
    assert torch.allclose(_logits(loaded).float(), expect.float(), atol=1e-3)
    gen = loaded.generate(PROBE[:1, :4], max_new_tokens=4, do_sample=False, use_cache=True)
    assert gen.shape == (1, 8)


def test_the_issue_recipe_runs_from_the_cli(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = tmp_path / "flap.yaml"
    recipe.write_text(
        "stages:\n  - method: flap\n    ratio: 0.2             # fraction of the blocks' parameters removed\n"
        "    structures: [heads, neurons]\n"
    )
    out = tmp_path / "out"
    rc = main(
        ["compress", str(tiny_model_dir), "--recipe", str(recipe), "--calib", str(DATA_DIR / "calib.txt")]
        + ["--out", str(out), "--nsamples", "4", "--seqlen", "32"]
    )
    assert rc == 0
    assert "block parameters removed 0.1" in capsys.readouterr().out
    report = json.loads((out / "llmpress_report.json").read_text())
    assert report["recipe"]["stages"][0]["method"] == "flap"
    assert report["structure"]["removed_fraction"] == pytest.approx(0.2, abs=0.02)
    assert report["structure"]["layers"][0]["heads"][0] == 4
    dense = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert 0.15 < 1 - _block_params(loaded) / _block_params(dense) < 0.25
    assert FlapConfig(ratio=0.2).to_dict()["structures"] == ["heads", "neurons"]


def test_the_model_card_shows_widths_before_and_after(tmp_path: Path) -> None:
    from llmpress.hub import build_card

    model, report = _compress(tiny_llama(), method="magnitude_structured", ratio=0.4)
    save_compressed(model, tmp_path / "m", report=report)
    text = build_card(tmp_path / "m").text
    assert "## Structure" in text and "| block | attention heads | key/value heads | MLP neurons |" in text
    assert "| 0 | 4 → 2 | 2 | 64 → 36 |" in text
    assert "![Per-layer widths" in text and (tmp_path / "m" / "llmpress_widths.png").stat().st_size > 1000


# ------------------------------------------------------------------ allocation search over widths

EVO = {"method": "evopress", "generations": 6, "offspring": 6, "tokens": [128, 512], "survivors": [2]}


def test_evopress_moves_width_to_the_block_that_matters(tmp_path: Path) -> None:
    model = tiny_qwen2(num_hidden_layers=3)
    with torch.no_grad():  # block 1's MLP barely writes to the residual stream: its neurons are cheap
        model.model.layers[1].mlp.down_proj.weight.mul_(0.01)
    stage = {
        "method": "minitron",
        "ratio": 0.3,
        "structures": ["neurons"],
        "allocation": {**EVO, "sparsity_step": 0.1},
    }
    dense = _block_params(model)
    model, report = llmpress.compress(model, {"stages": [stage]}, calib_ids(8, 32), progress=False)
    levels = report.allocation["levels"]  # type: ignore[attr-defined]
    assert levels["model.layers.1"] > max(levels["model.layers.0"], levels["model.layers.2"])
    assert sum(levels.values()) == pytest.approx(0.9)  # the budget: 3 blocks at 0.3 on average
    assert 1 - _block_params(model) / dense == pytest.approx(0.3, abs=0.03)
    assert report.structure["layers"][1]["neurons"][1] < report.structure["layers"][0]["neurons"][1]  # type: ignore[attr-defined]
    # the written recipe reproduces the choice without a search; the result reloads
    again, _ = llmpress.compress(
        tiny_qwen2(num_hidden_layers=3), report.recipe, calib_ids(8, 32), progress=False
    )  # type: ignore[attr-defined]
    assert [b.mlp.down_proj.in_features for b in again.model.layers] == [
        b.mlp.down_proj.in_features for b in model.model.layers
    ]
    save_compressed(model, tmp_path / "m", report=report)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert torch.allclose(_logits(loaded), _logits(model), atol=1e-6)


def test_evopress_over_hidden_widths_is_refused() -> None:
    stage = {"method": "flap", "ratio": 0.3, "structures": ["neurons", "hidden"], "allocation": EVO}
    with pytest.raises(RecipeError, match="hidden width is one for the whole model"):
        llmpress.compress(tiny_llama(), {"stages": [stage]}, calib_ids(), progress=False)


def test_a_group_size_that_no_longer_divides_a_resized_layer_is_a_clear_error() -> None:
    """GPTQ g32 after a structured stage that leaves down_proj 35 inputs wide: one clear error
    naming the layer and the group size (not an IndexError from inside the sweep)."""
    import llmpress
    from llmpress.errors import LlmpressError

    ids = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(0))
    recipe = [
        {"method": "magnitude_structured", "ratio": 0.3},
        {"method": "gptq", "bits": 4, "group_size": 32},
    ]
    with pytest.raises(LlmpressError, match=r"down_proj.*not divisible by group_size=32"):
        llmpress.compress(tiny_llama(), recipe, ids, progress=False)
