"""Hidden (embedding) channel pruning: the residual width removed across the whole model,
exact shapes, tied heads, the scores, and smaller models that plain transformers reloads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from models import calib_ids, run_without_llmpress, tiny_llama, tiny_opt, tiny_qwen2
from transformers import AutoModelForCausalLM

import llmpress
from llmpress.errors import ModelError
from llmpress.format.save import save_compressed
from llmpress.model.modules import find_blocks
from llmpress.structure.hidden import PruneHidden, hidden_coupling, prune_hidden

PROBE = calib_ids(2, 16, seed=7)
METHODS = ["magnitude_structured", "flap", "minitron", "llm_pruner"]


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=PROBE).logits


def _block_params(model: torch.nn.Module) -> int:
    _, blocks = find_blocks(model)
    return sum(p.numel() for b in blocks for p in b.parameters())


def _compress(model: torch.nn.Module, **stage: object) -> tuple[torch.nn.Module, object]:
    return llmpress.compress(model, dict(stage), calib_ids(), progress=False)


def test_the_coupling_is_found_from_the_module_graph() -> None:
    c = hidden_coupling(tiny_llama())
    assert c.size == 32 and c.embeddings == ("model.embed_tokens",)
    assert "lm_head" in c.columns and "model.layers.1.mlp.up_proj" in c.columns
    assert "model.layers.0.self_attn.o_proj" in c.rows and "model.layers.0.mlp.down_proj" in c.rows
    assert {"model.norm", "model.layers.0.input_layernorm", "model.layers.0.post_attention_layernorm"} <= set(
        c.vectors
    )


def test_pruning_slices_every_coupled_tensor_and_sets_the_config() -> None:
    model = tiny_qwen2()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    keep = torch.tensor([0, 3, 4, 9, 10, 11, 20, 31])
    prune_hidden(model, PruneHidden(keep))
    sd = model.state_dict()
    assert model.config.hidden_size == 8 and model.config.head_dim == 8
    assert torch.equal(sd["model.embed_tokens.weight"], before["model.embed_tokens.weight"][:, keep])
    assert torch.equal(sd["lm_head.weight"], before["lm_head.weight"][:, keep])
    assert torch.allclose(sd["model.norm.weight"], before["model.norm.weight"][keep] * 2)  # sqrt(32 / 8)
    q = "model.layers.1.self_attn.q_proj"
    assert torch.equal(sd[f"{q}.weight"], before[f"{q}.weight"][:, keep])
    assert torch.equal(sd[f"{q}.bias"], before[f"{q}.bias"])  # head rows untouched
    o = "model.layers.1.self_attn.o_proj.weight"
    assert torch.equal(sd[o], before[o][keep])
    assert model.model.layers[0].mlp.down_proj.out_features == 8
    assert _logits(model).shape[-1] == model.config.vocab_size  # still runs; the vocabulary is unchanged


def test_keeping_every_channel_leaves_the_output_unchanged() -> None:
    model = tiny_llama()
    ref = _logits(model)
    prune_hidden(model, PruneHidden(torch.arange(32)))
    assert torch.equal(_logits(model), ref)
    model, report = _compress(tiny_llama(), method="minitron", ratio=0.0, structures=["hidden"])
    assert model.config.hidden_size == 32 and torch.equal(_logits(model), ref)


def test_a_tied_lm_head_follows_its_embedding() -> None:
    model = tiny_llama(tie_word_embeddings=True)
    model.tie_weights()
    prune_hidden(model, PruneHidden(torch.arange(0, 32, 2)))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.lm_head.weight.shape == (model.config.vocab_size, 16)
    assert _logits(model).shape == (2, 16, model.config.vocab_size)


@pytest.mark.parametrize("method", METHODS)
def test_hidden_alone_meets_the_ratio_with_exact_shapes(method: str) -> None:
    dense = _block_params(tiny_llama())
    model, report = _compress(tiny_llama(), method=method, ratio=0.25, structures=["hidden"])
    h = model.config.hidden_size
    assert report.structure["hidden"] == [32, h]  # type: ignore[attr-defined]
    assert h == 24  # all of a block's parameters are hidden-proportional here; Llama keeps h % heads == 0
    assert model.model.embed_tokens.weight.shape[1] == h and model.lm_head.weight.shape[1] == h
    for b in model.model.layers:
        assert b.self_attn.q_proj.weight.shape == (32, h) and b.mlp.down_proj.weight.shape == (64, h)[::-1]
        assert b.input_layernorm.weight.shape == (h,)
    assert 1 - _block_params(model) / dense == pytest.approx(0.25, abs=0.02)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_all_structures_together_meet_the_ratio(method: str, allocation: str) -> None:
    dense = _block_params(tiny_qwen2())
    model, report = _compress(
        tiny_qwen2(),
        method=method,
        ratio=0.4,
        structures=["heads", "neurons", "hidden"],
        allocation=allocation,
    )
    assert model.config.hidden_size < 32
    assert 1 - _block_params(model) / dense == pytest.approx(0.4, abs=0.04)
    assert report.structure["removed_fraction"] == pytest.approx(1 - _block_params(model) / dense, abs=1e-5)  # type: ignore[attr-defined]


def test_minitron_removes_the_channel_the_norms_silence() -> None:
    model = tiny_qwen2()  # its config accepts any hidden size
    with torch.no_grad():
        for b in model.model.layers:
            b.input_layernorm.weight[5] = 1e-4
            b.post_attention_layernorm.weight[5] = 1e-4
    model, _ = llmpress.compress(
        model, {"method": "minitron", "ratio": 0.03, "structures": ["hidden"]}, calib_ids(), progress=False
    )
    assert model.config.hidden_size == 31
    assert model.model.layers[0].input_layernorm.weight.min() > 1e-3  # channel 5 is the one gone


def test_opt_is_refused_naming_the_module() -> None:
    with pytest.raises(ModelError, match=r"self_attn\.\w_proj: with hidden_size .* would not reload"):
        _compress(tiny_opt(), method="flap", ratio=0.2, structures=["hidden"])


def test_uniform_hidden_saves_a_standard_config_that_plain_transformers_loads(tmp_path: Path) -> None:
    model, report = _compress(
        tiny_llama(), method="minitron", ratio=0.3, structures=["heads", "neurons", "hidden"]
    )
    save_compressed(model, tmp_path / "m", report=report)
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert "quantization_config" not in cfg
    assert cfg["hidden_size"] == model.config.hidden_size < 32 and cfg["head_dim"] == 8
    assert cfg["hidden_size"] % 4 == 0  # LlamaConfig wants a multiple of its 4 heads
    logits, gen = run_without_llmpress(tmp_path / "m", PROBE, tmp_path)
    assert torch.allclose(logits, _logits(model), atol=1e-5)
    assert torch.equal(gen, model.generate(PROBE[:1, :4], max_new_tokens=6, do_sample=False, use_cache=True))


def test_global_hidden_with_non_uniform_blocks_reloads_and_generates(tmp_path: Path) -> None:
    model, report = _compress(
        tiny_qwen2(), method="flap", ratio=0.4, structures=["heads", "neurons", "hidden"]
    )
    widths = {b.mlp.down_proj.weight.shape[1] for b in model.model.layers}
    assert model.config.hidden_size < 32 and len(widths) > 1
    save_compressed(model, tmp_path / "m", report=report)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert loaded.config.hidden_size == model.config.hidden_size
    assert torch.allclose(_logits(loaded), _logits(model), atol=1e-6)
    gen = loaded.generate(PROBE[:1, :4], max_new_tokens=6, do_sample=False, use_cache=True)
    assert torch.equal(gen, model.generate(PROBE[:1, :4], max_new_tokens=6, do_sample=False, use_cache=True))


def test_hidden_then_gptq_keeps_group_multiples_and_reloads(tmp_path: Path) -> None:
    recipe = {
        "stages": [
            {"method": "minitron", "ratio": 0.3, "structures": ["neurons", "hidden"], "neuron_multiple": 8},
            {"method": "gptq", "bits": 4, "group_size": 8},
        ]
    }
    model, report = llmpress.compress(tiny_llama(), recipe, calib_ids(), progress=False)
    assert model.config.hidden_size % 8 == 0 and model.config.hidden_size < 32
    llmpress.save_result(model, tmp_path / "m", report=report)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    expect = _logits(llmpress.format.save.to_runtime(model, result=report))
    assert torch.allclose(_logits(loaded).float(), expect.float(), atol=1e-3)


def test_the_model_card_states_the_hidden_width(tmp_path: Path) -> None:
    from llmpress.hub import build_card

    model, report = _compress(
        tiny_llama(), method="magnitude_structured", ratio=0.3, structures=["neurons", "hidden"]
    )
    save_compressed(model, tmp_path / "m", report=report)
    text = build_card(tmp_path / "m").text
    assert f"hidden (residual) width went from 32 to {model.config.hidden_size} channels" in text


def test_a_width_the_config_refuses_is_named_with_the_fix() -> None:
    with pytest.raises(ModelError, match="refuses hidden_size 27; keep a multiple of 4 channels"):
        prune_hidden(tiny_llama(), PruneHidden(torch.arange(27)))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_removing_channels_equals_zeroing_them_in_the_residual_stream(arch: str) -> None:
    build = {"llama": tiny_llama, "qwen2": tiny_qwen2}[arch]
    keep = torch.tensor([i for i in range(32) if i % 4 != 1])  # 24 kept: Llama wants a multiple of 4
    gone = torch.tensor([i for i in range(32) if i % 4 == 1])
    zeroed = build(rms_norm_eps=1e-12)  # exact up to eps
    with torch.no_grad():
        zeroed.model.embed_tokens.weight[:, gone] = 0
        for b in zeroed.model.layers:
            b.self_attn.o_proj.weight[gone] = 0
            b.mlp.down_proj.weight[gone] = 0
    pruned = build(rms_norm_eps=1e-12)
    prune_hidden(pruned, PruneHidden(keep))
    assert torch.allclose(_logits(pruned), _logits(zeroed), atol=1e-5)


def test_reconstruction_fits_the_readers_that_lose_hidden_inputs() -> None:
    """``reconstruct``: q/k/v and gate/up get least-squares weights for the kept inputs, so
    their outputs (whose width hidden pruning leaves alone) stay closer to the dense model's."""

    def correlated() -> torch.nn.Module:  # a residual stream of rank 8: dropped channels are predictable
        m = tiny_qwen2()
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            emb = torch.randn(m.config.vocab_size, 8, generator=g) @ torch.randn(8, 32, generator=g)
            m.model.embed_tokens.weight.copy_(emb)
        return m

    def reader_outputs(model: torch.nn.Module) -> list[torch.Tensor]:
        out: list[torch.Tensor] = []
        block = model.model.layers[0]
        hooks = [
            m.register_forward_hook(lambda _m, _a, y: out.append(y))
            for m in (block.self_attn.q_proj, block.mlp.gate_proj)
        ]
        with torch.no_grad():
            model(input_ids=ids)
        for h in hooks:
            h.remove()
        return out

    ids = calib_ids()
    dense = reader_outputs(correlated())
    err = {}
    for rec in (False, True):
        stage = {"method": "minitron", "ratio": 0.25, "structures": ["hidden"], "reconstruct": rec}
        model, _ = llmpress.compress(correlated(), stage, ids, progress=False)
        assert model.config.hidden_size == 24
        err[rec] = sum(float((a - b).square().mean()) for a, b in zip(reader_outputs(model), dense))
    assert err[True] < 0.5 * err[False]
