"""EoRA: the low-rank math, the stage after quantization / 2:4 + int4 / pruning, the saved format
(reload with identical logits), the PEFT adapter (loaded by the real peft) and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from models import DATA_DIR, calib_ids, tiny_llama
from transformers import AutoModelForCausalLM

import llmpress
from llmpress.cli.main import main
from llmpress.errors import ModelError, RecipeError
from llmpress.format.lowrank import (
    PEFT_SUBFOLDER,
    LowRankLinear,
    load_peft_adapter,
    lowrank_paths,
    strip_lowrank,
    write_peft_adapter,
)
from llmpress.format.runtime import LlmpressLinear, select_kernels
from llmpress.format.save import save_compressed, save_quantized, to_runtime
from llmpress.hub import build_card
from llmpress.plugins.eora import eora_factors

IDS = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
GPTQ3 = {"method": "gptq", "bits": 3, "group_size": 32}
GPTQ4 = {"method": "gptq", "bits": 4, "group_size": 32}
SPARSE24 = {"method": "sparsegpt", "pattern": "2:4"}


def _logits(model: torch.nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


def _inputs(n: int = 400, d: int = 32, seed: int = 0) -> torch.Tensor:
    """Anisotropic inputs (column scales over two orders of magnitude), as LLM activations are."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64) * torch.logspace(-1, 1, d, dtype=torch.float64)


# ------------------------------------------------------------------------------ the math


@pytest.mark.parametrize("basis", ["activations", "identity"])
def test_rank_r_eora_of_an_exactly_rank_r_error_is_exact(basis: str) -> None:
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(24, 3, generator=g, dtype=torch.float64) @ torch.randn(
        3, 32, generator=g, dtype=torch.float64
    )
    x = _inputs()
    xtx = x.t() @ x / x.shape[0] if basis == "activations" else None
    a, b = eora_factors(delta, 3, xtx)
    assert a.shape == (3, 32) and b.shape == (24, 3)
    assert torch.allclose((b.double() @ a.double()), delta, atol=1e-4 * float(delta.abs().max()))
    a2, b2 = eora_factors(delta, 2, xtx)  # one rank short: not exact
    assert (b2.double() @ a2.double() - delta).abs().max() > 1e-2 * float(delta.abs().max())


def test_eora_beats_plain_svd_on_the_activation_weighted_error() -> None:
    g = torch.Generator().manual_seed(2)
    delta = torch.randn(24, 32, generator=g, dtype=torch.float64)
    x = _inputs()

    def out_err(a: torch.Tensor, b: torch.Tensor) -> float:
        return float(((delta - b.double() @ a.double()) @ x.t()).norm())

    for r in (1, 4, 8):
        eora = out_err(*eora_factors(delta, r, x.t() @ x))
        svd = out_err(*eora_factors(delta, r, None))
        assert eora < 0.9 * svd, (r, eora, svd)
        # the minimum over rank-r B A: the tail singular values of delta X^T
        tail = torch.linalg.svdvals(delta @ x.t())[r:]
        assert eora == pytest.approx(float(tail.norm()), rel=1e-4)


def test_directions_below_the_eigenvalue_cutoff_are_dropped() -> None:
    g = torch.Generator().manual_seed(3)
    delta = torch.randn(16, 32, generator=g, dtype=torch.float64)
    x = _inputs()
    x[:, :8] = 0  # the inputs never reach 8 directions: no finite L^-1/2 there
    a, _ = eora_factors(delta, 4, x.t() @ x)
    assert torch.isfinite(a).all() and a[:, :8].abs().max() < 1e-6
    a, b = eora_factors(delta[:, 8:12], 8, torch.eye(4, dtype=torch.float64))  # rank > directions left
    assert a.shape == (8, 4) and b.shape == (16, 8) and (a[4:] == 0).all() and (b[:, 4:] == 0).all()


# ------------------------------------------------------------------------------ the stage


@pytest.mark.parametrize("compression", [[GPTQ3], [SPARSE24, GPTQ4]], ids=["int3", "2:4+int4"])
def test_eora_brings_the_compressed_model_closer_and_svd_less(compression: list[dict]) -> None:
    dense = tiny_llama()
    want = _logits(dense)
    errs = {}
    for label, extra in (("none", []), ("svd", [{"method": "eora", "rank": 8, "basis": "identity"}]),
                         ("eora", [{"method": "eora", "rank": 8}])):  # fmt: skip
        model, rep = llmpress.compress(
            tiny_llama(), {"stages": compression + extra}, calib_ids(), progress=False
        )
        errs[label] = float((_logits(model) - want).norm())
        if extra:
            info = rep.modules["model.layers.0.mlp.down_proj"].info
            assert info["eora_rank"] == 8 and info["eora_params"] == 8 * (64 + 32)
            assert rep.modules["model.layers.0.mlp.down_proj"].methods[-1] == "eora"
    assert errs["eora"] < errs["svd"] < errs["none"], errs


# ------------------------------------------------------------------------------ save and reload


@pytest.mark.parametrize(
    ("compression", "fmt"), [([GPTQ4], "int"), ([SPARSE24, GPTQ4], "int-2:4")], ids=["int4", "2:4+int4"]
)
def test_saved_eora_reloads_with_identical_logits(compression: list[dict], fmt: str, tmp_path: Path) -> None:
    model, rep = llmpress.compress(
        tiny_llama(), {"stages": [*compression, {"method": "eora", "rank": 4}]}, calib_ids(), progress=False
    )
    in_memory = _logits(model)
    save_quantized(model, tmp_path / "m", report=rep)
    entries = json.loads((tmp_path / "m" / "config.json").read_text())["quantization_config"]["modules"]
    entry = entries["model.layers.1.self_attn.o_proj"]
    assert entry["format"] == fmt and entry["lowrank"] == 4
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    mod = loaded.get_submodule("model.layers.1.self_attn.o_proj")
    assert (
        isinstance(mod, LlmpressLinear)
        and mod.weight_lora_a.shape == (4, 32)
        and mod.weight_lora_b.shape == (32, 4)
    )
    to_runtime(model, "auto", result=rep)  # what loading gives: packed layers, fp16 tensors
    assert torch.allclose(_logits(loaded), _logits(model), atol=1e-5, rtol=0)
    assert torch.allclose(_logits(loaded), in_memory, atol=5e-3, rtol=0)  # fp16 storage only
    strip_lowrank(loaded)
    assert (_logits(loaded) - in_memory).abs().max() > 1e-3  # the path does something
    card = str(build_card(tmp_path / "m"))  # ranks and parameter overhead
    assert "EoRA low-rank compensation of rank 4 in the input activations' eigenspace" in card
    extra = 2 * 4 * (64 + 48 + 48 + 64 + 96 + 96 + 96)  # 2 blocks, rank 4, in + out of q k v o gate up down
    assert (
        f"14 layers carry a low-rank compensation path (EoRA) of rank 4: {extra:,} extra parameters" in card
    )


def test_eora_after_pruning_saves_a_dense_layer_with_its_path(tmp_path: Path) -> None:
    recipe = {"stages": [{"method": "sparsegpt", "sparsity": 0.5}, {"method": "eora", "rank": 4}]}
    model, rep = llmpress.compress(tiny_llama(), recipe, calib_ids(), progress=False)
    in_memory = _logits(model)
    save_compressed(model, tmp_path / "m", report=rep)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert isinstance(loaded.get_submodule("model.layers.0.mlp.up_proj"), LowRankLinear)
    assert torch.allclose(_logits(loaded), in_memory, atol=1e-4, rtol=0)


def test_eora_after_structured_pruning_compensates_the_stages_after_the_resize(tmp_path: Path) -> None:
    gptq = {"method": "gptq", "bits": 3, "group_size": -1}  # groups of 32 need not divide the new widths
    recipe = {
        "stages": [{"method": "magnitude_structured", "ratio": 0.3}, gptq, {"method": "eora", "rank": 4}]
    }
    model, rep = llmpress.compress(tiny_llama(), recipe, calib_ids(), progress=False)
    name = "model.layers.0.mlp.down_proj"
    assert rep.modules[name].methods[-2:] == ["gptq", "eora"] and rep.modules[name].shape[1] < 64  # resized
    in_memory = _logits(model)
    save_quantized(model, tmp_path / "m", report=rep)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32)
    select_kernels(loaded, "dense")
    assert torch.allclose(_logits(loaded), in_memory, atol=2e-2, rtol=0)


# ------------------------------------------------------------------------------ PEFT adapter


def test_peft_adapter_on_the_compressed_base_gives_our_logits(tmp_path: Path) -> None:
    pytest.importorskip("peft")
    model, rep = llmpress.compress(
        tiny_llama(),
        {"stages": [SPARSE24, GPTQ4, {"method": "eora", "rank": 4}]},
        calib_ids(),
        progress=False,
    )
    save_quantized(model, tmp_path / "m", report=rep)
    adapter = write_peft_adapter(lowrank_paths(model, rep.state), tmp_path / "adapter")
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["r"] == cfg["lora_alpha"] == 4 and len(cfg["target_modules"]) == 14
    ours = _logits(AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32))
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32)
    assert strip_lowrank(base) == 14
    assert (_logits(base) - ours).abs().max() > 1e-3
    peft_model = load_peft_adapter(base, adapter)
    assert torch.allclose(_logits(peft_model), ours, atol=1e-4, rtol=0)


def test_cli_writes_a_peft_adapter_that_peft_loads_on_a_dense_base(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Pruned layers saved dense: the base is an ordinary transformers model and peft's own
    LoRA layers wrap its nn.Linear layers."""
    pytest.importorskip("peft")
    from peft import PeftModel

    recipe = tmp_path / "r.yaml"
    recipe.write_text("stages:\n  - {method: sparsegpt, sparsity: 0.5}\n  - {method: eora, rank: 4}\n")
    out = tmp_path / "out"
    args = ["compress", str(tiny_model_dir), "--recipe", str(recipe), "--out", str(out), "--nsamples", "8"]
    assert main([*args, "--seqlen", "32", "--calib", str(DATA_DIR / "calib.txt"), "--adapter", "peft"]) == 0
    ours = _logits(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32))
    base = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    strip_lowrank(base)
    assert not any(isinstance(m, LowRankLinear) for m in base.modules())
    peft_model = PeftModel.from_pretrained(base, str(out / PEFT_SUBFOLDER))
    assert torch.allclose(_logits(peft_model), ours, atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("stages", "error", "words"),
    [
        ([GPTQ4, {"method": "eora", "rank": 0}], RecipeError, "rank must be an integer >= 1"),
        ([GPTQ4, {"method": "eora", "rank": 33}], ModelError, "rank 33 exceeds min(in, out) = 32"),
        ([{"method": "eora", "rank": 4}], RecipeError, "there is none; put eora after"),
        ([{"method": "eora", "rank": 4}, GPTQ4], RecipeError, "there is none; put eora after"),
        (
            [GPTQ4, {"method": "eora", "rank": 4}, SPARSE24],
            RecipeError,
            "put eora after the last compression",
        ),
        (
            [GPTQ4, {"method": "eora", "basis": "eigen"}],
            RecipeError,
            "basis must be 'activations' or 'identity'",
        ),
    ],
)
def test_bad_input_is_one_clear_error_before_any_work(stages: list[dict], error: type, words: str) -> None:
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=words.replace("(", r"\(").replace(")", r"\)")):
        llmpress.compress(model, {"stages": stages}, calib_ids(), progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_adapter_without_an_eora_stage_is_refused(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("stages:\n  - {method: rtn, bits: 4, group_size: 32}\n")
    args = ["compress", str(tiny_model_dir), "--recipe", str(recipe), "--out", str(tmp_path / "o")]
    assert main([*args, "--adapter", "peft"]) != 0
    assert "--adapter peft writes the low-rank paths of an 'eora' stage" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # refused before loading the model
