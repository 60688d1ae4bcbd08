"""AWQ (``method: awq``): scale search, clip search, the exact fold, placement checks and the
CLI round trip, on tiny random models."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import transformers as tf
from _quant_models import calib_ids, logits
from models import DATA_DIR, _build, save_model_dir, tiny_llama
from torch import nn

import llmpress
from llmpress.errors import RecipeError
from llmpress.format.runtime import LlmpressLinear
from llmpress.model.modules import norm_weight_offset
from llmpress.quant.grid import QuantSpec

Q = {"bits": 3, "group_size": 16}
_SMALL = dict(
    vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=4, head_dim=8, max_position_embeddings=256, tie_word_embeddings=False,
)  # fmt: skip


def tiny_gemma(seed: int = 0) -> nn.Module:
    return _build(tf.GemmaForCausalLM, tf.GemmaConfig, _SMALL, {}, seed)


def tiny_qwen3(seed: int = 0) -> nn.Module:
    return _build(tf.Qwen3ForCausalLM, tf.Qwen3Config, _SMALL, {}, seed)


def tiny_mha_llama(seed: int = 0, **kw: Any) -> nn.Module:
    """Llama without grouped-query attention (so ``v_proj -> o_proj`` is scaled too)."""
    return tiny_llama(seed, num_key_value_heads=4, **kw)


def _randomize_norms(model: nn.Module) -> nn.Module:
    """Random norm weights (HF initialises them to 1 or 0), so a wrong fold shows."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and p.dim() == 1:
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
    return model


def _awq(**kw: Any) -> dict[str, Any]:
    return {"method": "awq", **Q, **kw}


def _same_state(a: nn.Module, b: nn.Module) -> bool:
    return all(
        torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )


def test_alpha_zero_without_clip_equals_rtn() -> None:
    rtn, _ = llmpress.compress(tiny_llama(), [{"method": "rtn", **Q}], calib_ids(), progress=False)
    awq, _ = llmpress.compress(
        tiny_llama(), [_awq(n_grid=1, clip=False), {"method": "rtn", **Q}], calib_ids(), progress=False
    )
    assert _same_state(awq, rtn)
    searched, _ = llmpress.compress(
        tiny_mha_llama(), [_awq(), {"method": "rtn", **Q}], calib_ids(), progress=False
    )
    plain, _ = llmpress.compress(tiny_mha_llama(), [{"method": "rtn", **Q}], calib_ids(), progress=False)
    assert not _same_state(searched, plain)  # with the full grid and the clip, AWQ does change something


@pytest.mark.parametrize("build", [tiny_mha_llama, tiny_gemma, tiny_qwen3], ids=lambda f: f.__name__)
def test_scales_keep_the_dense_function(build, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    """With the quantizer after AWQ made a no-op, the model computes what it did before."""
    import llmpress.plugins.rtn as rtn

    real = rtn.rtn_quantize
    monkeypatch.setattr(rtn, "rtn_quantize", lambda w, c, keep=None: (w.float(), real(w, c, keep)[1]))
    ref = logits(_randomize_norms(build()))
    model, _ = llmpress.compress(
        _randomize_norms(build()), [_awq(clip=False), {"method": "rtn", **Q}], calib_ids(), progress=False
    )
    assert torch.allclose(logits(model), ref, atol=1e-4, rtol=1e-4)
    before = _randomize_norms(build())
    moved = {
        n
        for n, p in model.named_parameters()
        if "layernorm" in n and not torch.equal(p, before.get_parameter(n))
    }
    assert any(".post_attention_layernorm." in n for n in moved)
    # Qwen3's q/k norms: the input norm -> q/k/v pair is skipped; the others are scaled
    assert any(".input_layernorm." in n for n in moved) == (build is not tiny_qwen3)


def test_norm_offset_is_probed() -> None:
    assert norm_weight_offset(tiny_gemma().model.layers[0].input_layernorm) == 1.0
    assert norm_weight_offset(tiny_llama().model.layers[0].input_layernorm) == 0.0
    assert norm_weight_offset(nn.LayerNorm(8)) == 0.0
    norm = tiny_gemma().model.layers[0].input_layernorm
    w = norm.weight.detach().clone()
    norm_weight_offset(norm)
    assert torch.equal(norm.weight, w)  # the probe puts the weight back


def test_qk_norm_detection() -> None:
    from llmpress.quant.smoothing import qk_norms

    qkv = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    assert qk_norms(tiny_qwen3().model.layers[0], qkv) == ["self_attn.q_norm", "self_attn.k_norm"]
    assert qk_norms(tiny_llama().model.layers[0], qkv) == []
    assert qk_norms(tiny_qwen3().model.layers[0], ("mlp.gate_proj", "mlp.up_proj")) == []


def test_clip_search_never_worse_than_no_clip() -> None:
    from llmpress.plugins.awq import apply_clip, clip_search, fake_quantize

    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 64, generator=g)
    w[:, 5] *= 8  # a few large weights: clipping them pays
    x = torch.randn(256, 64, generator=g)
    spec = QuantSpec(bits=3, group_size=16)
    mv = clip_search(w, x, spec)
    org = w.abs().reshape(32, 4, 16).amax(-1)
    assert mv.shape == (32, 4) and bool((mv <= org).all()) and bool((mv >= 0.55 * org - 1e-6).all())
    assert bool((mv < org).any())

    def err(wq: torch.Tensor) -> torch.Tensor:  # per (row, group) output error
        return ((x.reshape(256, 4, 16) * (wq - w).reshape(32, 1, 4, 16)).sum(-1)).pow(2).mean(1)

    clipped, plain = err(fake_quantize(apply_clip(w, mv), spec)), err(fake_quantize(w, spec))
    assert bool((clipped <= plain + 1e-6).all()) and float(clipped.sum()) < float(plain.sum())


def test_awq_helps_on_planted_outliers() -> None:
    """Channels of large activations (planted in the input norms, function unchanged): AWQ's
    output error is below RTN's at 3 bits."""

    def build() -> nn.Module:
        model = tiny_mha_llama()
        with torch.no_grad():
            for layer in model.model.layers:
                for norm, lins in (
                    (
                        layer.input_layernorm,
                        [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj],
                    ),
                    (layer.post_attention_layernorm, [layer.mlp.gate_proj, layer.mlp.up_proj]),
                ):
                    norm.weight[:4] *= 30.0
                    for lin in lins:
                        lin.weight[:, :4] /= 30.0
        return model

    ids, probe = calib_ids(16, 32), calib_ids(4, 32, seed=9)
    ref = logits(build(), probe)
    err = {}
    for name, stages in (("rtn", []), ("awq", [_awq()])):
        model, _ = llmpress.compress(build(), [*stages, {"method": "rtn", **Q}], ids, progress=False)
        err[name] = float((logits(model, probe) - ref).pow(2).mean())
    assert err["awq"] < 0.8 * err["rtn"], err


@pytest.mark.parametrize(
    ("stages", "match"),
    [
        ([_awq()], "awq must be followed by the weight quantization"),
        (
            [_awq(), {"method": "magnitude", "sparsity": 0.5}],
            "awq must be followed by the weight quantization",
        ),
        ([_awq(bits=4), {"method": "rtn", **Q}], "give awq the same bits"),
        ([_awq(symmetric=True), {"method": "gptq", **Q}], "give awq the same bits"),
        ([_awq(), {"method": "rtn", **Q, "targets": ["mlp.*"]}], "leaves unquantized"),
    ],
)
def test_bad_placement_is_one_error_before_work(stages: list[dict[str, Any]], match: str) -> None:
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RecipeError, match=match):
        llmpress.compress(model, stages, calib_ids(), progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("quant", ["rtn", "gptq"])
def test_cli_save_and_reload(quant: str, tokenizer, tmp_path: Path, fresh_plugin_manager: None) -> None:  # noqa: ANN001
    from llmpress.cli.main import main

    src = save_model_dir(tmp_path / "src", _randomize_norms(tiny_mha_llama(vocab=256)), tokenizer)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"stages:\n  - {{method: awq, bits: 4, group_size: 16}}\n  - {{method: {quant}, bits: 4, group_size: 16}}\n"
    )
    out = tmp_path / "out"
    args = ["compress", str(src), "--recipe", str(recipe), "--calib", str(DATA_DIR / "calib.txt")]
    assert main([*args, "--out", str(out), "--nsamples", "8", "--seqlen", "32"]) == 0
    dense = tf.AutoModelForCausalLM.from_pretrained(src)
    loaded = tf.AutoModelForCausalLM.from_pretrained(out)
    packed = [m for m in loaded.modules() if isinstance(m, LlmpressLinear)]
    assert len(packed) == 14 and {(m.fmt.bits, m.fmt.group_size) for m in packed} == {(4, 16)}
    # the scales are in the saved norms, and the model still computes nearly the dense function
    assert not torch.equal(
        loaded.model.layers[0].input_layernorm.weight, dense.model.layers[0].input_layernorm.weight
    )
    probe = calib_ids(2, 16, vocab=256, seed=4)
    ref, got = logits(dense, probe), logits(loaded, probe)
    assert float((got - ref).pow(2).mean()) < 0.05 * float(ref.var())
