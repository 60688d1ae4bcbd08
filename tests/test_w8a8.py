"""W8A8: SmoothQuant, INT8 and FP8 weights with quantized activations, save/load, export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _quant_models import calib_ids, logits, tiny_llama, tiny_opt, tiny_qwen2
from transformers import AutoModelForCausalLM

import llmpress
from llmpress.errors import RecipeError
from llmpress.format.compressed_tensors import save_compressed_tensors
from llmpress.format.runtime import LlmpressLinear, select_kernels
from llmpress.quant.activations import FP8_MAX, fake_quantize, fp8_weight, quantize

INT8_DYNAMIC = {"method": "rtn", "bits": 8, "group_size": -1, "symmetric": True, "activations": "int8"}
RECIPES = {
    "int8-dynamic": [INT8_DYNAMIC],
    "int8-static": [{**INT8_DYNAMIC, "activations": "int8-static"}],
    "sq-gptq-int8": [{"method": "smoothquant", "alpha": 0.5}, {**INT8_DYNAMIC, "method": "gptq"}],
    "fp8-dynamic": [{"method": "fp8"}],
    "fp8-static": [{"method": "fp8", "activations": "static"}],
}


@pytest.mark.parametrize("build", [tiny_llama, tiny_qwen2, tiny_opt], ids=lambda f: f.__name__)
def test_smoothing_alone_keeps_the_function(build) -> None:  # noqa: ANN001
    ref = logits(build())
    model, _ = llmpress.compress(
        build(), [{"method": "smoothquant", "alpha": 0.8}], calib_ids(), progress=False
    )
    assert torch.allclose(logits(model), ref, atol=1e-4, rtol=1e-4)
    changed = build()
    assert any(
        not torch.equal(a, b) for a, b in zip(model.state_dict().values(), changed.state_dict().values())
    )


def test_smoothing_moves_outliers_into_weights() -> None:
    """A channel with a huge input range: after smoothing its max |x| shrinks by the expected factor."""
    from llmpress.quant.smoothing import smooth_scales

    act = torch.tensor([100.0, 1.0, 1.0, 1.0])
    w = torch.ones(3, 4)
    s = smooth_scales(act, [w], 0.5)
    assert torch.allclose(s, torch.tensor([10.0, 1.0, 1.0, 1.0]))
    assert float((act / s).max()) == pytest.approx(10.0)


def test_per_token_int8_matches_hand_reference() -> None:
    x = torch.tensor([[1.0, -2.0, 0.5, 127.0], [0.01, 0.03, -0.04, 0.0]])
    q, s = quantize(x, "int8-dynamic")
    assert torch.equal(s.flatten(), torch.tensor([1.0, 0.04 / 127]))
    assert torch.equal(q[0], torch.tensor([1, -2, 0, 127], dtype=torch.int8))  # round half to even: 0.5 -> 0
    assert torch.equal(q[1], torch.tensor([32, 95, -127, 0], dtype=torch.int8))
    assert torch.allclose(
        fake_quantize(x, "int8-dynamic")[1], torch.tensor([32.0, 95, -127, 0]) * (0.04 / 127)
    )
    # static: one scale, values beyond the grid saturate
    qs, _ = quantize(x, "int8-static", torch.tensor([0.5]))
    assert torch.equal(qs[0], torch.tensor([2, -4, 1, 127], dtype=torch.int8))


def test_fp8_grids() -> None:
    x = torch.tensor([[448.0, -1.0, 3.0], [1.0, 2.0, -4.0]])
    q, s = quantize(x, "fp8-dynamic")
    assert torch.equal(s.flatten(), torch.tensor([1.0, 4.0 / FP8_MAX]))
    assert torch.equal(q[0].float(), torch.tensor([448.0, -1.0, 3.0]))
    w = torch.randn(8, 16)
    w8, scale = fp8_weight(w)
    assert scale.shape == (8, 1) and float((w8.float().abs().amax(1) - FP8_MAX).abs().max()) == 0
    assert torch.allclose(w8.float() * scale, w, rtol=0.07, atol=1e-6)  # E4M3: 3 mantissa bits


@pytest.mark.parametrize("name", list(RECIPES))
def test_w8a8_saves_and_reloads(name: str, tmp_path: Path) -> None:
    model, rep = llmpress.compress(tiny_llama(), RECIPES[name], calib_ids(), progress=False)
    llmpress.save_quantized(model, tmp_path / "out", report=rep, dtype=torch.float32)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    packed = [m for m in loaded.modules() if isinstance(m, LlmpressLinear)]
    scheme = "int8-dynamic" if name == "sq-gptq-int8" else name
    assert packed and all(m.fmt.activations == scheme for m in packed)
    if "static" in name:
        assert all(float(m.input_scale) > 0 for m in packed)
    select_kernels(loaded, "torch")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    select_kernels(again, "dense")
    assert torch.equal(logits(loaded), logits(again))  # every load computes the same
    # activation quantization is applied: the loaded model differs from weight-only simulation
    assert not torch.allclose(logits(loaded), logits(model), atol=1e-6)
    assert torch.allclose(logits(loaded), logits(model), atol=0.05)


@pytest.mark.parametrize("name", ["int8-dynamic", "int8-static", "fp8-dynamic", "fp8-static"])
def test_compressed_tensors_export_loads_in_transformers(name: str, tmp_path: Path) -> None:
    pytest.importorskip("compressed_tensors")
    model, rep = llmpress.compress(tiny_llama(), RECIPES[name], calib_ids(), progress=False)
    llmpress.save_quantized(model, tmp_path / "ll", report=rep, dtype=torch.float32)
    save_compressed_tensors(model, tmp_path / "ct", report=rep, dtype=torch.float32)
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "ll", dtype=torch.float32)
    select_kernels(ours, "torch")
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32)
    # dynamic int8: compressed-tensors' simulation takes s = max|x| / 127.5, vLLM's kernels and
    # ours max|x| / 127 (a run-time choice of the reader; the checkpoint holds no such scale)
    atol = 2e-2 if name == "int8-dynamic" else 1e-5  # two grids: differences at the rounding-noise level
    assert torch.allclose(logits(theirs), logits(ours), atol=atol)


def test_bad_w8a8_options() -> None:
    with pytest.raises(RecipeError, match="group_size: -1"):
        llmpress.compress(tiny_llama(), [{**INT8_DYNAMIC, "group_size": 32}], calib_ids(), progress=False)
    with pytest.raises(RecipeError, match="activations must be"):
        llmpress.compress(
            tiny_llama(), [{**INT8_DYNAMIC, "activations": "int2"}], calib_ids(), progress=False
        )
    with pytest.raises(RecipeError, match=r"'int4' \(W4A4\) needs bits: 4"):
        llmpress.compress(
            tiny_llama(), [{**INT8_DYNAMIC, "activations": "int4"}], calib_ids(), progress=False
        )
    with pytest.raises(RecipeError, match="alpha"):
        llmpress.compress(tiny_llama(), [{"method": "smoothquant", "alpha": 2}], calib_ids(), progress=False)
    with pytest.raises(RecipeError, match=r"'fp8': activations must be 'dynamic' or 'static', got 'token'"):
        llmpress.compress(
            tiny_llama(), [{"method": "fp8", "activations": "token"}], calib_ids(), progress=False
        )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ["int8-dynamic", "int8-static", "fp8-dynamic", "fp8-static"])
def test_gpu_w8a8_kernels_match_simulation(name: str, tmp_path: Path) -> None:  # pragma: no cover - GPU
    model, rep = llmpress.compress(tiny_llama(), RECIPES[name], calib_ids(), progress=False)
    llmpress.save_quantized(model, tmp_path / "out", report=rep, dtype=torch.bfloat16)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.bfloat16, device_map="cuda")
    kernels = {m.kernel.name for m in loaded.modules() if isinstance(m, LlmpressLinear)}
    ids = calib_ids(2, 32, seed=5).cuda()
    fast = loaded(ids).logits.float()
    select_kernels(loaded, "torch")
    ref = loaded(ids).logits.float()
    assert kernels <= {"cuda-fp8", "cuda-int8"} and kernels
    assert torch.allclose(fast, ref, atol=0.05 * float(ref.abs().max()))


def test_model_card_names_the_w8a8_format(tmp_path: Path) -> None:
    pytest.importorskip("jinja2")
    from llmpress.hub.card import build_card

    stages = RECIPES["sq-gptq-int8"]
    model, rep = llmpress.compress(tiny_llama(), stages, calib_ids(), progress=False)
    llmpress.save_quantized(model, tmp_path / "out", report=rep)
    text = str(build_card(tmp_path / "out"))
    assert "activations quantized to INT8 per token at run time (dynamic)" in text
    assert "SmoothQuant (alpha 0.5)" in text and "Give Me BF16" in text


# ----------------------------------------------------------------------------- FP8 KV cache


def _fp8_kv_model(tmp_path: Path):  # noqa: ANN202
    recipe = {"stages": [{"method": "fp8"}], "kv_cache": "fp8"}
    model, rep = llmpress.compress(tiny_llama(), recipe, calib_ids(), progress=False)
    llmpress.save_quantized(model, tmp_path / "kv", report=rep, dtype=torch.float32)
    return model, rep


def test_fp8_kv_cache_scales_saved_and_used(tmp_path: Path) -> None:
    from llmpress.format import kv_cache

    model, rep = _fp8_kv_model(tmp_path)
    attns = kv_cache.attention_modules(model)
    assert attns and all(float(m.k_scale) > 0 and float(m.v_scale) > 0 for m in attns.values())
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "kv", dtype=torch.float32)
    assert loaded.config._attn_implementation == kv_cache.ATTN_IMPL
    for name, m in kv_cache.attention_modules(loaded).items():
        assert torch.equal(m.k_scale, attns[name].k_scale) and torch.equal(m.v_scale, attns[name].v_scale)
    # the in-memory model turned into runtime modules computes exactly what loading gives
    llmpress.to_runtime(model, dtype=torch.float32, result=rep)
    select_kernels(model, "dense")
    select_kernels(loaded, "dense")
    with_kv = logits(loaded)
    assert torch.equal(logits(model), with_kv)
    # the rounding is applied: without it the logits move (a little)
    for c in (loaded.config,):
        c._attn_implementation = "sdpa"
    without = logits(loaded)
    assert not torch.equal(without, with_kv) and torch.allclose(without, with_kv, atol=0.05)


def test_a_loaded_model_keeps_its_kv_scales_on_its_quantization_config_for_a_resave(tmp_path: Path) -> None:
    from llmpress.format.hf_quantizer import LlmpressConfig
    from llmpress.format.save import saved_state

    _fp8_kv_model(tmp_path)
    saved = json.loads((tmp_path / "kv" / "config.json").read_text())["quantization_config"]["kv_cache"]
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "kv", dtype=torch.float32)
    qc = loaded.config.quantization_config
    assert isinstance(qc, LlmpressConfig) and qc.state is not None
    assert "_llmpress_state" not in loaded.__dict__ and "state" not in qc.to_dict()
    assert saved_state(loaded).kv_cache == qc.state.kv_cache
    llmpress.save_quantized(loaded, tmp_path / "again", dtype=torch.float32)
    again = json.loads((tmp_path / "again" / "config.json").read_text())["quantization_config"]["kv_cache"]
    assert again == saved


def test_fp8_kv_cache_generation_matches_full_forward(tmp_path: Path) -> None:
    _fp8_kv_model(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "kv", dtype=torch.float32)
    ids = calib_ids(1, 12, seed=9)
    out = loaded.generate(
        ids, max_new_tokens=6, do_sample=False, output_scores=True, return_dict_in_generate=True
    )
    full = loaded(out.sequences).logits[0, ids.shape[1] - 1 : -1]
    step = torch.stack(out.scores, 1)[0]
    assert torch.allclose(step, full, atol=1e-4)  # cached keys/values round exactly like fresh ones


def test_fp8_kv_cache_exports_to_compressed_tensors(tmp_path: Path) -> None:
    pytest.importorskip("compressed_tensors")
    import json

    model, rep = _fp8_kv_model(tmp_path)
    save_compressed_tensors(model, tmp_path / "ct", report=rep, dtype=torch.float32)
    q = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert q["kv_cache_scheme"]["type"] == "float" and q["kv_cache_scheme"]["strategy"] == "tensor"
    from safetensors import safe_open

    with safe_open(str(tmp_path / "ct" / "model.safetensors"), "pt") as f:
        assert "model.layers.0.self_attn.k_scale" in f.keys()  # noqa: SIM118 - safe_open has no __contains__
    AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32)  # transformers reads it
    pytest.importorskip("jinja2")
    from llmpress.hub.card import build_card

    text = str(build_card(tmp_path / "kv"))
    assert "KV cache is stored in FP8 (E4M3)" in text and "Give Me BF16" in text  # W8A8 (FP8) layers
    assert "Give Me BF16" in str(build_card(tmp_path / "ct"))  # compressed-tensors' input_activations


def test_bad_kv_cache_option() -> None:
    with pytest.raises(RecipeError, match="kv_cache must be 'fp8'"):
        llmpress.compress(
            tiny_llama(), {"stages": [{"method": "fp8"}], "kv_cache": "int2"}, calib_ids(), progress=False
        )
