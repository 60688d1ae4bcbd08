"""QuaRot rotations (``method: rotate``): Hadamard constructions, the exact equivalence of the
rotated dense model, the online transform's kernels (torch; Triton under the interpreter in a
subprocess), rotate + GPTQ saved and reloaded, and the errors raised before any work."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from models import calib_ids, tiny_gpt2, tiny_llama, tiny_opt, tiny_qwen2
from transformers import AutoModelForCausalLM

import llmpress
from llmpress.errors import ModelError, RecipeError
from llmpress.format.save import save_quantized, to_runtime
from llmpress.format.transforms import OnlineHadamard, online_transforms
from llmpress.math.hadamard import (
    HadamardPlan,
    HadamardSizeError,
    apply_hadamard,
    fwht,
    hadamard_matrix,
    hadamard_plan,
    paley_orders,
    random_hadamard,
    random_rotation,
)

DOWN = "model.layers.0.mlp.down_proj"


def _scrambled(factory, seed: int = 1, **kw):  # noqa: ANN001, ANN202
    """A tiny model whose norm scales and biases are not trivial (so fusion is exercised)."""
    m = factory(seed=seed, **kw)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, mod in m.named_modules():
            if "RMSNorm" in type(mod).__name__:
                mod.weight.copy_(torch.rand(mod.weight.shape, generator=g) + 0.5)
            bias = getattr(mod, "bias", None)
            if n.endswith(("q_proj", "k_proj", "v_proj")) and isinstance(bias, torch.Tensor):
                bias.copy_(torch.randn(bias.shape, generator=g) * 0.1)
    return m


def _logits(model, ids):  # noqa: ANN001, ANN202
    with torch.no_grad():
        return model(ids).logits.float()


# ------------------------------------------------------------------------------ Hadamard math


@pytest.mark.parametrize("n", [2, 16, 12, 20, 24, 44, 96, 384, 6, 40])
def test_hadamard_is_orthogonal_and_fast_transform_matches(n: int) -> None:
    plan = hadamard_plan(n)
    m = hadamard_matrix(plan)
    assert torch.allclose(m @ m.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    block = m[: plan.block, : plan.block] * plan.block**0.5
    assert torch.equal(block.abs(), torch.ones_like(block))  # entries +-1 before normalisation
    x = torch.randn(3, 5, n, dtype=torch.float64)
    assert torch.allclose(apply_hadamard(x, plan), x @ m, atol=1e-12)


def test_hadamard_sizes_named() -> None:
    assert hadamard_plan(384) == HadamardPlan(384, 384, 12)  # Paley 12 x Sylvester 32
    assert hadamard_plan(1024) == HadamardPlan(1024, 1024, 1)
    assert hadamard_plan(2 * 43 * 128).block == 256  # 86 is no Paley order: block-diagonal
    assert hadamard_plan(256, block_size=64) == HadamardPlan(256, 64, 1)
    assert 12 in paley_orders() and 24 not in paley_orders()  # 24 = 12 * 2
    for bad, block in [(9, None), (1, None), (64, 48 + 1), (30, 15)]:
        with pytest.raises(HadamardSizeError):
            hadamard_plan(bad, block)


def test_fwht_matches_dense_sylvester() -> None:
    x = torch.randn(7, 64, dtype=torch.float64)
    s = hadamard_matrix(HadamardPlan(64, 64)) * 8.0
    assert torch.allclose(fwht(x), x @ s, atol=1e-10)
    with pytest.raises(HadamardSizeError):
        fwht(torch.zeros(3, 12))


def test_random_hadamard_seeded() -> None:
    a, b, c = random_hadamard(32, 0), random_hadamard(32, 0), random_hadamard(32, 1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.allclose(a @ a.T, torch.eye(32, dtype=torch.float64), atol=1e-12)
    rot = random_rotation(384, 2)  # applied to rows without the dense matrix
    x = torch.randn(5, 384, dtype=torch.float64)
    assert torch.allclose(rot.right(x), x @ rot.matrix(), atol=1e-12)
    assert rot.signs is not None and torch.allclose(
        rot.matrix(), rot.signs[:, None] * hadamard_matrix(rot.plan)
    )


TRITON_SCRIPT = textwrap.dedent(
    """
    import torch
    from llmpress.kernels import hadamard as kh
    from llmpress.math.hadamard import HadamardPlan, apply_hadamard, hadamard_matrix, sylvester
    torch.manual_seed(0)
    for n, dtype, tol in ((2, torch.float32, 1e-5), (64, torch.float16, 2e-3), (256, torch.float32, 1e-5)):
        x = torch.randn(3, 5 + n // 4, n).to(dtype)  # row counts that leave a partial tile
        assert kh.triton_usable(x)
        y = kh.fwht_triton(x)
        ref = (x.double() @ sylvester(n)).float()
        err = float((y.float() - ref).abs().max() / ref.abs().max())
        assert y.dtype == dtype and y.shape == x.shape and err < tol, (n, dtype, err)
    plan = HadamardPlan(96, 96, 12)  # Paley 12 x Sylvester 8 through the Triton butterfly
    x = torch.randn(4, 96)
    y = apply_hadamard(x, plan, kh.fwht)
    assert torch.allclose(y.double(), x.double() @ hadamard_matrix(plan), atol=1e-5)
    print("ok")
    """
)


def test_triton_fwht_matches_dense_hadamard_under_interpreter() -> None:
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run(
        [sys.executable, "-c", TRITON_SCRIPT], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]


# ------------------------------------------------------------------------------ the rotated model


@pytest.mark.parametrize("factory", [tiny_llama, tiny_qwen2], ids=["llama", "qwen2"])
def test_rotation_keeps_logits(factory) -> None:  # noqa: ANN001
    model = _scrambled(factory)
    ids = calib_ids(2, 24)
    ref = _logits(model, ids)
    emb_before = model.get_input_embeddings().weight.clone()
    rotated, rep = llmpress.compress(model, {"method": "rotate", "seed": 3}, None, progress=False)
    out = _logits(rotated, ids)
    assert torch.allclose(out, ref, atol=1e-4), float((out - ref).abs().max())
    assert not torch.allclose(rotated.get_input_embeddings().weight, emb_before, atol=1e-3)  # it did rotate
    for n, mod in rotated.named_modules():
        if "RMSNorm" in type(mod).__name__:
            assert torch.equal(mod.weight, torch.ones_like(mod.weight)), n
    assert set(online_transforms(rotated)) == {DOWN, DOWN.replace(".0.", ".1.")}
    assert rep.transforms is not None
    assert (
        rep.transforms["runtime_cost"] == "one Hadamard 64 (Sylvester) per mlp.down_proj call (2 layers, R4)"
    )
    assert rep.state.transforms is not None and rep.state.transforms[0]["role"] == "R4"


def test_rotation_unties_embeddings() -> None:
    model = _scrambled(tiny_llama, tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = calib_ids(2, 16)
    ref = _logits(model, ids)
    rotated, _ = llmpress.compress(model, {"method": "rotate"}, None, progress=False)
    assert rotated.lm_head.weight is not rotated.model.embed_tokens.weight
    assert not rotated.config.tie_word_embeddings
    assert torch.allclose(_logits(rotated, ids), ref, atol=1e-4)


def test_rotation_flattens_planted_outlier_channel() -> None:
    """A residual channel 50x larger than the rest (the outliers rotations are for) spreads out."""
    model = tiny_llama(seed=2)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 5] *= 50.0
    ids = calib_ids(2, 16)
    seen: dict[str, torch.Tensor] = {}
    norm = model.model.layers[1].input_layernorm  # the residual stream entering block 1
    h = norm.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0].detach().abs().amax((0, 1))))
    _logits(model, ids)
    before = seen["x"].max() / seen["x"].median()
    llmpress.compress(model, {"method": "rotate"}, None, progress=False)
    _logits(model, ids)
    h.remove()
    after = seen["x"].max() / seen["x"].median()
    assert before > 10 and after < before / 4


# ------------------------------------------------------------------------------ rotate + GPTQ, saved


def test_rotate_gptq_saves_and_reloads(tmp_path) -> None:  # noqa: ANN001
    model = _scrambled(tiny_llama)
    recipe = [{"method": "rotate"}, {"method": "gptq", "bits": 4, "group_size": 32}]
    model, rep = llmpress.compress(model, recipe, calib_ids(8, 32), progress=False)
    ids = calib_ids(2, 16, seed=5)
    d = save_quantized(model, tmp_path / "rot-gptq", report=rep, dtype=torch.float32)
    to_runtime(model, result=rep, dtype=torch.float32)  # what loading gives
    assert isinstance(getattr(model.get_submodule(DOWN), "online_transform", None), OnlineHadamard)
    expected = _logits(model, ids)
    loaded = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    assert set(online_transforms(loaded)) == set(online_transforms(model))
    got = _logits(loaded, ids)
    assert torch.allclose(got, expected, atol=1e-4), float((got - expected).abs().max())
    qc = loaded.config.quantization_config
    assert qc.transforms[0]["size"] == 64 and qc.transforms[0]["location"] == "input"
    from llmpress.hub.card import build_card

    card = build_card(d).text
    assert "## Transforms" in card and "QuaRot" in card
    assert "Run-time cost: one Hadamard 64 (Sylvester) per mlp.down_proj call (2 layers, R4)" in card
    report = json.loads((d / "llmpress_report.json").read_text())
    assert report["transforms"]["online"][0].startswith("R4 online Hadamard 64")
    # without the online transform the reloaded model computes something else: it is needed
    down = loaded.get_submodule(DOWN)
    down._forward_pre_hooks.clear()
    assert not torch.allclose(_logits(loaded, ids), expected, atol=1e-3)


# ------------------------------------------------------------------------------ errors, before any work


@pytest.mark.parametrize("factory", [tiny_opt, tiny_gpt2], ids=["opt", "gpt2"])
def test_unrotatable_architecture_refused_before_work(factory) -> None:  # noqa: ANN001
    model = factory()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ModelError, match="cannot be rotated"):
        llmpress.compress(model, {"method": "rotate"}, None, progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_impossible_hadamard_size_refused_before_work() -> None:
    model = tiny_llama(intermediate=72)  # 72 = Paley 72: fine
    llmpress.compress(model, {"method": "rotate"}, None, progress=False)
    model = tiny_llama(seed=3)
    before = model.model.embed_tokens.weight.clone()
    with pytest.raises(ModelError, match="block size 24 does not divide"):
        llmpress.compress(model, {"method": "rotate", "online_block_size": 24}, None, progress=False)
    assert torch.equal(model.model.embed_tokens.weight, before)


def test_bad_options_refused() -> None:
    with pytest.raises(RecipeError, match="r3"):
        llmpress.compress(tiny_llama(), {"method": "rotate", "r3": True}, None, progress=False)
    with pytest.raises(RecipeError, match="first stage"):
        llmpress.compress(
            tiny_llama(),
            [{"method": "rtn", "bits": 4, "group_size": 32}, {"method": "rotate"}],
            None,
            progress=False,
        )


# ------------------------------------------------------------------------------ compressed-tensors


def test_compressed_tensors_export_applies_r4_through_its_own_transforms(tmp_path) -> None:  # noqa: ANN001
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.transform import TransformConfig, apply_transform_config
    from safetensors import safe_open

    from llmpress.format.compressed_tensors import save_compressed_tensors

    recipe = [{"method": "rotate"}, {"method": "gptq", "bits": 4, "group_size": 32, "symmetric": True}]
    model, rep = llmpress.compress(_scrambled(tiny_llama), recipe, calib_ids(8, 32), progress=False)
    d = save_compressed_tensors(model, tmp_path / "ct", report=rep, dtype=torch.float32)
    ids = calib_ids(2, 16, seed=4)
    expected = _logits(model, ids)  # the compressed model in memory (the CPU int kernel would round to bf16)
    cfg = json.loads((d / "config.json").read_text())["quantization_config"]
    scheme = cfg["transform_config"]["config_groups"]["R4"]
    assert scheme["type"] == "hadamard" and scheme["head_dim"] is None
    assert scheme["apply"][0]["location"] == "input" and DOWN in scheme["apply"][0]["targets"]
    with safe_open(str(d / "model.safetensors"), framework="pt") as f:
        assert f.get_tensor(f"{DOWN}.R4_input.weight").abs().eq(1).all()
    loaded = AutoModelForCausalLM.from_pretrained(
        d, dtype=torch.float32
    ).eval()  # compressed-tensors decompresses
    without = _logits(loaded, ids)
    assert not torch.allclose(without, expected, atol=1e-3)  # the online transform is needed...
    apply_transform_config(
        loaded, TransformConfig.model_validate(cfg["transform_config"])
    )  # ...and its own applies it
    got = _logits(loaded, ids)
    assert torch.allclose(got, expected, atol=1e-4), float((got - expected).abs().max())


def test_compressed_tensors_refuses_paley_transform_before_work(tmp_path) -> None:  # noqa: ANN001
    from llmpress.cli.export_checks import check_model_exportable
    from llmpress.errors import LlmpressError
    from llmpress.format.compressed_tensors import save_compressed_tensors
    from llmpress.recipe.recipes import as_recipe

    model = tiny_llama(intermediate=96)  # 96 = Paley 12 x Sylvester 8: compressed-tensors has no Paley
    recipe = [{"method": "rotate"}, {"method": "rtn", "bits": 4, "group_size": 32, "symmetric": True}]
    with pytest.raises(
        LlmpressError, match="Paley"
    ):  # what `llmpress compress --format compressed-tensors` checks first
        check_model_exportable(model, as_recipe(recipe).resolve())
    model, rep = llmpress.compress(model, recipe, None, progress=False)
    with pytest.raises(LlmpressError, match="online_block_size"):
        save_compressed_tensors(model, tmp_path / "ct", report=rep)
    assert not (tmp_path / "ct").exists()
    ok = tiny_llama(intermediate=96)
    recipe[0] = {"method": "rotate", "online_block_size": 32}
    ok, rep = llmpress.compress(ok, recipe, None, progress=False)
    save_compressed_tensors(ok, tmp_path / "ct2", report=rep)


def test_rotate_only_checkpoint_reloads_and_bad_transform_entry_refused(tmp_path) -> None:  # noqa: ANN001
    from llmpress.errors import CheckpointError
    from llmpress.format.save import save_result

    model, rep = llmpress.compress(_scrambled(tiny_qwen2), {"method": "rotate"}, None, progress=False)
    ids = calib_ids(2, 16, seed=6)
    expected = _logits(model, ids)
    d = save_result(model, tmp_path / "rot", report=rep, dtype=torch.float32)  # no quantized layer
    loaded = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    assert torch.allclose(_logits(loaded, ids), expected, atol=1e-5)
    cfg_file = d / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["quantization_config"]["transforms"][0]["block_size"] = 48  # does not divide 64
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="transforms.*block size 48 does not divide 64"):
        AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
