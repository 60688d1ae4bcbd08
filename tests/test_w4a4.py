"""W4A8, W4A4 and the integer KV cache: the rounding against the math, save/reload, warnings, errors."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from _quant_models import calib_ids, logits, tiny_llama
from transformers import AutoModelForCausalLM

import llmpress
from llmpress.errors import LlmpressError, ModelError, RecipeError
from llmpress.format import kv_cache
from llmpress.format.runtime import LlmpressLinear, select_kernels
from llmpress.quant.activations import fake_quantize, fake_quantize_groups, quantize
from llmpress.recipe.config import MethodConfig
from llmpress.recipe.plan import Plan, make_plan, unrotated_4bit
from llmpress.recipe.recipes import Recipe, ResolvedStage, Stage

W4A4 = {"method": "rtn", "bits": 4, "group_size": 32, "symmetric": True, "activations": "int4"}
W4A8 = {**W4A4, "activations": "int8"}
COLLAPSE = "expect perplexity to collapse without rotate"


def _reference_rows(x: torch.Tensor, top: float, divisor: float | None = None) -> torch.Tensor:
    """Per row, written out: s = max|row| / top, q = clamp(round(x / s), -top - 1, top), x ~ q * s
    (``divisor``: another s = max|row| / divisor, as compressed-tensors' reader takes)."""
    out = torch.empty_like(x)
    for i, row in enumerate(x.float()):
        s = row.abs().max().clamp_min(1e-12) / (divisor or top)  # float32, as a GEMM's scale is
        out[i] = torch.round(row / s).clamp(-top - 1, top) * s
    return out


def test_per_token_int4_matches_hand_reference() -> None:
    x = torch.tensor([[7.0, -3.5, 1.2, 0.4], [0.7, -0.8, 0.05, 0.0]])
    q, s = quantize(x, "int4-dynamic")
    assert torch.allclose(s.flatten(), torch.tensor([1.0, 0.8 / 7]))
    assert torch.equal(q[0], torch.tensor([7, -4, 1, 0], dtype=torch.int8))  # round half to even: -3.5 -> -4
    assert torch.equal(q[1], torch.tensor([6, -7, 0, 0], dtype=torch.int8))
    r = torch.randn(16, 48) * torch.linspace(0.1, 30, 48)
    assert torch.allclose(fake_quantize(r, "int4-dynamic"), _reference_rows(r, 7.0), atol=1e-5)
    assert int(quantize(r, "int4-dynamic")[0].abs().max()) <= 8  # codes in [-8, 7]
    assert fake_quantize(r.bfloat16(), "int4-dynamic").dtype == torch.bfloat16


@pytest.mark.parametrize(("bits", "group"), [(4, None), (4, 8), (8, 4)])
def test_kv_group_rounding_matches_reference(bits: int, group: int | None) -> None:
    x = torch.randn(2, 3, 5, 16) * 4  # [batch, heads, tokens, head_dim]
    got = fake_quantize_groups(x, bits, group)
    g = 16 if group is None else group
    ref = _reference_rows(x.reshape(-1, g), 2.0 ** (bits - 1) - 1).reshape(x.shape)
    assert torch.allclose(got, ref, atol=1e-5)
    assert torch.allclose(fake_quantize_groups(got, bits, group), got, atol=1e-6)  # rounding twice: the same
    with pytest.raises(ValueError, match="does not divide"):
        fake_quantize_groups(x, bits, 5)


def test_kv4_attention_rounds_keys_and_values_like_the_reference() -> None:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    model = tiny_llama()
    kv_cache.enable_int(model, "int4", 8)
    attn = next(iter(kv_cache.attention_modules(model).values()))
    q, k, v = (torch.randn(1, h, 6, 16) for h in (4, 2, 2))
    got, _ = kv_cache.fp8kv_attention(attn, q, k, v, None, scaling=0.25, dropout=0.0)
    ref_k, ref_v = (_reference_rows(t.reshape(-1, 8), 7.0).reshape(t.shape) for t in (k, v))
    want, _ = ALL_ATTENTION_FUNCTIONS["sdpa"](attn, q, ref_k, ref_v, None, scaling=0.25, dropout=0.0)
    assert torch.allclose(got, want, atol=1e-5)
    plain, _ = ALL_ATTENTION_FUNCTIONS["sdpa"](attn, q, k, v, None, scaling=0.25, dropout=0.0)
    assert not torch.allclose(got, plain, atol=1e-3)  # the rounding is applied


def _input_rounding_hooks(
    model: torch.nn.Module, names: list[str], top: float, divisor: float | None = None
) -> None:
    """The pure-math simulation: each quantized linear's input rounded per token by hand."""

    def hook(m: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor]:
        x = args[0]
        return (_reference_rows(x.reshape(-1, x.shape[-1]), top, divisor).reshape(x.shape),)

    for n in names:
        model.get_submodule(n).register_forward_pre_hook(hook)


@pytest.mark.parametrize(("recipe", "top"), [(W4A4, 7.0), (W4A8, 127.0)], ids=["W4A4", "W4A8"])
def test_w4_activations_save_and_reload_with_identical_logits(
    recipe: dict, top: float, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    full = {"stages": [recipe], "kv_cache": {"type": "int4", "group_size": 8}}
    model, rep = llmpress.compress(tiny_llama(), full, calib_ids(), progress=False)
    names = sorted(rep.state.quantized)
    assert all(rep.modules[n].activations == recipe["activations"] + "-dynamic" for n in names)
    assert rep.kv_cache is not None and rep.kv_cache["dtype"] == "int4" and rep.kv_cache["group_size"] == 8
    llmpress.save_quantized(model, tmp_path / "out", report=rep, dtype=torch.float32)
    saved = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert saved["kv_cache"] == {"dtype": "int4", "group_size": 8}
    assert json.loads((tmp_path / "out" / "llmpress_report.json").read_text())["kv_cache"]["dtype"] == "int4"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    again, _ = llmpress.load_model(tmp_path / "out", dtype=torch.float32)
    packed = [m for m in loaded.modules() if isinstance(m, LlmpressLinear)]
    assert packed and all(m.fmt.activations == recipe["activations"] + "-dynamic" for m in packed)
    assert all(m.fmt.bits == 4 and m.fmt.group_size == 32 for m in packed)
    select_kernels(loaded, "dense")
    select_kernels(again, "dense")
    assert torch.equal(logits(loaded), logits(again))
    llmpress.save_quantized(
        loaded, tmp_path / "resaved", dtype=torch.float32
    )  # the KV cache survives a re-save
    resaved = json.loads((tmp_path / "resaved" / "config.json").read_text())["quantization_config"]
    assert resaved["kv_cache"] == saved["kv_cache"]
    # the runtime equals the pure math: dequantized weights, inputs and KV rounded by hand
    ref = model  # in memory: the dequantized weights, the integer KV cache switched on
    _input_rounding_hooks(ref, names, top)
    assert torch.allclose(logits(loaded), logits(ref), atol=1e-4)


def test_rtn_w4a4_kv4_needs_no_calibration() -> None:
    plan = make_plan({"stages": [W4A4], "kv_cache": "int4"})
    assert not plan.needs_calibration()
    assert make_plan({"stages": [W4A4], "kv_cache": "fp8"}).needs_calibration()
    model, rep = llmpress.compress(tiny_llama(), plan, progress=False)
    assert rep.kv_cache is not None and rep.kv_cache["group_size"] is None
    assert model.config._attn_implementation == kv_cache.ATTN_IMPL


def test_w4a4_without_rotate_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="llmpress.recipe.plan"):
        make_plan({"stages": [W4A4, {**W4A4, "method": "gptq"}], "kv_cache": "int4"})
    hits = [r for r in caplog.records if COLLAPSE in r.getMessage()]
    assert len(hits) == 1 and "activation outliers" in hits[0].getMessage()
    assert "stage 0 (rtn)" in hits[0].getMessage() and "kv_cache: int4" in hits[0].getMessage()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="llmpress.recipe.plan"):
        make_plan({"stages": [W4A8], "kv_cache": "int8"})
    assert not [r for r in caplog.records if COLLAPSE in r.getMessage()]


@dataclasses.dataclass(frozen=True)
class _FakeRotate(MethodConfig):
    """Stands for the ``rotate`` plugin: only its ``rotates`` capability matters here."""

    method: ClassVar[str] = "rotate"
    rotates: ClassVar[bool] = True


def test_a_rotation_stage_before_w4a4_silences_the_warning() -> None:
    w4a4 = make_plan([W4A4]).stages[0]
    rot = ResolvedStage(0, Stage("rotate"), _FakeRotate())
    quant = dataclasses.replace(w4a4, index=1)
    assert unrotated_4bit(Plan(Recipe([]), (rot, quant))) == []
    assert unrotated_4bit(
        Plan(Recipe([]), (dataclasses.replace(w4a4, index=0), dataclasses.replace(rot, index=1)))
    ) == ["stage 0 (rtn)"]  # a rotation after the quantization does not help it
    assert unrotated_4bit(Plan(Recipe([], kv_cache="int4"), (rot, quant))) == []


def test_bad_combinations_get_one_clear_error() -> None:
    with pytest.raises(RecipeError, match=r"activations 'int4' \(W4A4\) needs bits: 4, got bits 3"):
        make_plan([{**W4A4, "bits": 3}])
    with pytest.raises(RecipeError, match="W4A8.*got bits 3"):
        make_plan([{**W4A8, "bits": 3}])
    with pytest.raises(RecipeError, match="int8-static.*W4A8 takes activations: int8"):
        make_plan([{**W4A8, "activations": "int8-static"}])
    with pytest.raises(RecipeError, match="kv_cache group_size must be a positive integer"):
        make_plan({"stages": [W4A4], "kv_cache": {"type": "int4", "group_size": 0}})
    with pytest.raises(RecipeError, match="fp8 has one scale per layer"):
        make_plan({"stages": [W4A4], "kv_cache": {"type": "fp8", "group_size": 8}})
    with pytest.raises(RecipeError, match="kv_cache must be 'fp8'.*'int8' or 'int4'"):
        make_plan({"stages": [W4A4], "kv_cache": "int2"})
    model = tiny_llama()
    before = logits(model)
    with pytest.raises(ModelError, match="group_size 5 does not divide the head dimension 16"):
        llmpress.compress(
            model,
            {"stages": [W4A4], "kv_cache": {"type": "int4", "group_size": 5}},
            calib_ids(),
            progress=False,
        )
    assert torch.equal(logits(model), before)  # refused before any work


def test_compressed_tensors_w4a4_scheme_and_kv_refusal(tmp_path: Path) -> None:
    from llmpress.cli.export_checks import check_recipe_exportable
    from llmpress.format.compressed_tensors import compressed_tensors_config, save_compressed_tensors

    with pytest.raises(LlmpressError, match="kv_cache: int4.*per token and head group"):
        check_recipe_exportable([make_plan([W4A4]).stages[0].config], "int4")
    model, rep = llmpress.compress(tiny_llama(), [W4A4], calib_ids(), progress=False)
    cfg = compressed_tensors_config(rep.state.quantized)
    (group,) = cfg["config_groups"].values()
    assert group["format"] == "pack-quantized" and group["weights"]["num_bits"] == 4
    acts = group["input_activations"]
    assert (acts["num_bits"], acts["type"], acts["strategy"], acts["dynamic"]) == (4, "int", "token", True)
    pytest.importorskip("compressed_tensors")
    save_compressed_tensors(model, tmp_path / "w4a4", report=rep, dtype=torch.float32)
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "w4a4", dtype=torch.float32)
    names = sorted(rep.state.quantized)
    scheme = theirs.get_submodule(names[0]).quantization_scheme  # compressed-tensors' own reader
    assert (scheme.input_activations.num_bits, scheme.input_activations.strategy) == (4, "token")
    # its packed weights are ours, and its reader rounds inputs with s = max|x| / 7.5 (half the int4 range; vLLM and llmpress: / 7)
    _input_rounding_hooks(model, names, 7.0, divisor=7.5)
    assert torch.allclose(logits(theirs), logits(model), atol=1e-4)
    model, rep = llmpress.compress(
        tiny_llama(), {"stages": [W4A4], "kv_cache": "int4"}, calib_ids(), progress=False
    )
    with pytest.raises(LlmpressError, match="kv_cache int4"):
        save_compressed_tensors(model, tmp_path / "ct", report=rep, dtype=torch.float32)


def test_model_card_states_w4a4_and_the_kv_cache(tmp_path: Path) -> None:
    pytest.importorskip("jinja2")
    from llmpress.hub.card import build_card

    model, rep = llmpress.compress(
        tiny_llama(), {"stages": [W4A4], "kv_cache": "int4"}, calib_ids(), progress=False
    )
    llmpress.save_quantized(model, tmp_path / "out", report=rep, dtype=torch.float32)
    text = str(build_card(tmp_path / "out"))
    assert "activations quantized to INT4 per token at run time (dynamic) (W4A4)" in text
    assert "KV cache is rounded to INT4" in text and "one scale per token and per attention head" in text
