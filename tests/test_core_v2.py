"""Core v2: third-party scoring in a few lines, block-level changes (structured shapes that save
and reload), per-layer losses, and the statistics registry."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from models import DATA_DIR, calib_ids, tiny_llama, weight_of
from transformers import AutoModelForCausalLM

import llmpress
from llmpress import hookimpl
from llmpress.cli.main import main
from llmpress.engine.gradients import collect_gradients
from llmpress.engine.stats import LayerStats, StatsCollector
from llmpress.format.save import save_compressed
from llmpress.math.linalg import inverse_cholesky_upper
from llmpress.plugin_manager import get_plugin_manager, make_plugin_manager
from llmpress.plugins.gptq import GPTQConfig, gptq_quantize
from llmpress.plugins.sparsegpt import sparsegpt_prune
from llmpress.recipe.config import PruningConfig
from llmpress.structure.block_stage import BlockMethodConfig
from llmpress.structure.blocks import ChannelGroup, DroppedModule, DropSubBlocks, PruneChannels, ScaleChannels

PROBE = calib_ids(2, 16, seed=7)


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=PROBE).logits


# ------------------------------------------------------------------ a scoring method in 30 lines


@dataclasses.dataclass(frozen=True)
class RIAConfig(PruningConfig):
    """Relative importance and activations (Zhang et al., 2024): |W| relative to its row and
    column sums, times the input channel norm."""

    method: ClassVar[str] = "ria"
    stats: ClassVar[frozenset[str]] = frozenset({"sq_norms"})
    power: float = 0.5


class RIAPlugin:
    @hookimpl
    def llmpress_register_methods(self, register) -> None:  # noqa: ANN001
        register("ria", RIAConfig)

    @hookimpl
    def llmpress_score_importance(self, module, stats, config) -> torch.Tensor:  # noqa: ANN001
        w = weight_of(module).abs()  # [out, in]
        rel = w / w.sum(1, keepdim=True) + w / w.sum(0, keepdim=True)
        return rel * stats.col_norms.pow(config.power).unsqueeze(0)


def test_a_scoring_plugin_from_a_test_file_runs_from_a_yaml_recipe_through_the_cli(
    tiny_model_dir: Path, tmp_path: Path, fresh_plugin_manager: None
) -> None:
    get_plugin_manager().register(RIAPlugin(), name="ria-test")
    recipe = tmp_path / "ria.yaml"
    recipe.write_text("stages:\n  - method: ria\n    sparsity: 0.5\n    power: 0.5\n")
    out = tmp_path / "out"
    rc = main(
        ["compress", str(tiny_model_dir), "--recipe", str(recipe), "--calib", str(DATA_DIR / "calib.txt")]
        + ["--out", str(out), "--nsamples", "4", "--seqlen", "32"]
    )
    assert rc == 0
    report = json.loads((out / "llmpress_report.json").read_text())
    assert report["recipe"]["stages"] == [{"method": "ria", "sparsity": 0.5, "power": 0.5}]
    assert report["modules"] and all(m["methods"] == ["ria"] for m in report["modules"].values())
    assert all(abs(m["sparsity"] - 0.5) < 1e-9 for m in report["modules"].values())
    loaded = AutoModelForCausalLM.from_pretrained(out)
    w = weight_of(loaded.get_submodule("model.layers.0.mlp.up_proj"))
    assert int((w == 0).sum()) == w.numel() // 2


# ------------------------------------------------------------------ block-level changes


@dataclasses.dataclass(frozen=True)
class DropNeuronsConfig(BlockMethodConfig):
    """Remove ``i + 1`` MLP neurons from block ``i`` (the smallest gate/up row norms)."""

    method: ClassVar[str] = "drop_neurons_test"
    needs_calibration: ClassVar[bool] = False
    stats: ClassVar[frozenset[str]] = frozenset()


class DropNeuronsPlugin:
    @hookimpl
    def llmpress_register_methods(self, register) -> None:  # noqa: ANN001
        register("drop_neurons_test", DropNeuronsConfig)

    @hookimpl
    def llmpress_change_block(self, block, config) -> PruneChannels:  # noqa: ANN001
        gate, up = weight_of(block.linear("mlp.gate_proj")), weight_of(block.linear("mlp.up_proj"))
        score = gate.norm(dim=1) * up.norm(dim=1)  # [intermediate]
        keep = torch.sort(score, descending=True).indices[: score.numel() - (block.index + 1)]
        return PruneChannels((ChannelGroup(("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",), keep),))


def test_block_hook_removes_i_plus_1_neurons_and_the_model_reloads(tmp_path: Path) -> None:
    pm = make_plugin_manager([DropNeuronsPlugin()])
    model = tiny_llama(layers=3)
    before = _logits(model)
    model, report = llmpress.compress(model, {"method": "drop_neurons_test"}, pm=pm, progress=False)
    inter = model.config.intermediate_size
    for i, block in enumerate(model.model.layers):
        assert block.mlp.gate_proj.weight.shape == (inter - i - 1, model.config.hidden_size)
        assert block.mlp.up_proj.weight.shape == (inter - i - 1, model.config.hidden_size)
        assert block.mlp.down_proj.weight.shape == (model.config.hidden_size, inter - i - 1)
        res = report.state.layers[f"model.layers.{i}.mlp.down_proj"]
        assert res.removed_cols is not None and res.removed_cols.numel() == i + 1
    assert report.modules["model.layers.2.mlp.up_proj"].shape == (inter - 3, model.config.hidden_size)
    after = _logits(model)
    assert not torch.equal(after, before)

    save_compressed(model, tmp_path / "m", report=report)
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    entries = cfg["quantization_config"]["modules"]
    assert {e["format"] for e in entries.values()} == {"dense"} and len(entries) == 9
    assert entries["model.layers.1.mlp.down_proj"]["in_features"] == inter - 2
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    for i, block in enumerate(loaded.model.layers):
        assert block.mlp.up_proj.weight.shape == (inter - i - 1, model.config.hidden_size)
    assert torch.equal(_logits(loaded), after)
    save_compressed(loaded, tmp_path / "again")  # a loaded model has no results: shapes come from the config
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "again")
    assert torch.equal(_logits(again), after)
    gen = loaded.generate(PROBE[:1, :4], max_new_tokens=5, do_sample=False, use_cache=True)
    ref = model.generate(PROBE[:1, :4], max_new_tokens=5, do_sample=False, use_cache=True)
    assert torch.equal(gen, ref)


@dataclasses.dataclass(frozen=True)
class BlockTransformConfig(BlockMethodConfig):
    method: ClassVar[str] = "block_transform_test"
    stats: ClassVar[frozenset[str]] = frozenset({"absmax"})
    drop_mlp_of: int = -1


class BlockTransformPlugin:
    """SmoothQuant-shaped scales from the norm into q/k/v, and optionally one dropped MLP."""

    @hookimpl
    def llmpress_register_methods(self, register) -> None:  # noqa: ANN001
        register("block_transform_test", BlockTransformConfig)

    @hookimpl
    def llmpress_change_block(self, block, config) -> list:  # noqa: ANN001
        s = block.stats["self_attn.q_proj"].absmax.clamp_min(1e-5).sqrt()  # [hidden]
        qkv = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
        changes: list = [ScaleChannels("input_layernorm", qkv, s)]
        if block.index == config.drop_mlp_of:
            changes.append(DropSubBlocks(("mlp",)))
        return changes


def test_scaling_between_modules_keeps_the_function() -> None:
    pm = make_plugin_manager([BlockTransformPlugin()])
    model = tiny_llama()
    before, q0 = _logits(model), weight_of(model.model.layers[0].self_attn.q_proj).clone()
    model, _ = llmpress.compress(
        model, {"method": "block_transform_test"}, calib_ids(), pm=pm, progress=False
    )
    assert not torch.allclose(weight_of(model.model.layers[0].self_attn.q_proj), q0)
    assert torch.allclose(_logits(model), before, atol=1e-5)


def test_dropped_sub_block_saves_and_reloads(tmp_path: Path) -> None:
    pm = make_plugin_manager([BlockTransformPlugin()])
    model, report = llmpress.compress(
        tiny_llama(), {"method": "block_transform_test", "drop_mlp_of": 1}, calib_ids(), pm=pm, progress=False
    )
    assert isinstance(model.model.layers[1].mlp, DroppedModule)
    save_compressed(model, tmp_path / "m", report=report)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert isinstance(loaded.model.layers[1].mlp, DroppedModule)
    assert torch.equal(_logits(loaded), _logits(model))


# ------------------------------------------------------------------ per-layer losses


def _layer(seed: int = 0, out_f: int = 24, in_f: int = 64, n: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=g) @ torch.randn(16, in_f, generator=g) + 0.1 * torch.randn(
        n, in_f, generator=g
    )
    return torch.randn(out_f, in_f, generator=g), x


@pytest.mark.parametrize("method", ["sparsegpt", "gptq"])
def test_reported_loss_is_the_damped_quadratic_error(method: str) -> None:
    """The OBS losses add up to ``tr(dW H dW^T) / 2`` with the damped ``H = X^T X + l I``."""
    W, X = _layer()
    H = X.t() @ X
    U = inverse_cholesky_upper(H, 0.01)
    if method == "sparsegpt":
        Wc, _, loss = sparsegpt_prune(W, U, 0.5)
    else:
        Wc, _, loss = gptq_quantize(W, U, GPTQConfig(bits=3, group_size=32), use_triton=False)
    Hd = H + 0.01 * torch.diagonal(H).mean() * torch.eye(H.shape[0])
    dW = (W - Wc).double()
    expect = 0.5 * float(torch.trace(dW @ Hd.double() @ dW.t()))
    assert loss > 0 and abs(loss - expect) / expect < 1e-3


def test_losses_reach_the_report_and_the_model_card(tmp_path: Path) -> None:
    from llmpress.hub import build_card

    recipe = {
        "stages": [{"method": "sparsegpt", "sparsity": 0.5}, {"method": "gptq", "bits": 4, "group_size": 32}]
    }
    model, report = llmpress.compress(tiny_llama(), recipe, calib_ids(), progress=False)
    d = report.to_dict()["modules"]["model.layers.0.mlp.up_proj"]
    assert set(d["loss"]) == {"sparsegpt", "gptq"} and all(v > 0 for v in d["loss"].values())
    save_compressed(model, tmp_path / "m", report=report, sparse="auto")
    text = build_card(tmp_path / "m").text
    assert "reconstruction loss |" in text
    row = next(line for line in text.splitlines() if "`model.layers.0.mlp.up_proj`" in line)
    assert f"sparsegpt {d['loss']['sparsegpt']:.4g}, gptq {d['loss']['gptq']:.4g}" in row


# ------------------------------------------------------------------ statistics


def test_input_statistics_match_direct_computation_and_merge() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 40, 16, generator=g) * torch.linspace(0.1, 3, 16)
    needs = {"hessian", "mean_var", "absmax", "token_norms"}
    whole, a, b = (LayerStats(16, torch.device("cpu"), needs) for _ in range(3))
    whole.add(x)
    a.add(x[:1])
    b.add(x[1:])
    a.merge(b)
    flat = x.reshape(-1, 16)
    for s in (whole, a):
        assert torch.allclose(s.hessian, flat.t() @ flat / flat.shape[0], atol=1e-5)
        assert torch.allclose(s.mean, flat.mean(0), atol=1e-5)
        assert torch.allclose(s.variance, flat.var(0, unbiased=False), atol=1e-4)
        assert torch.equal(s.absmax, flat.abs().amax(0))
        norms = flat.norm(dim=1)
        assert abs(s.token_norms["max"] - float(norms.max())) < 1e-5
        assert abs(s.token_norms["mean"] - float(norms.mean())) < 1e-4
        assert torch.allclose(s.sq_norms, flat.square().sum(0), rtol=1e-5)


def test_layers_fed_one_input_share_statistics() -> None:
    model = tiny_llama()
    block = model.model.layers[0]
    mods = {n: block.get_submodule(n) for n in ("self_attn.q_proj", "self_attn.k_proj", "mlp.down_proj")}
    with StatsCollector(mods, {"absmax"}) as col:
        col.new_batch()
        model(input_ids=PROBE)
    assert col.stats["self_attn.q_proj"] is col.stats["self_attn.k_proj"]
    assert col.stats["mlp.down_proj"] is not col.stats["self_attn.q_proj"]


def test_gradient_statistic_is_the_summed_loss_gradient() -> None:
    model = tiny_llama()
    ids = calib_ids(4, 16)
    names = ["model.layers.0.mlp.up_proj", "model.layers.1.self_attn.o_proj"]
    grads = collect_gradients(model, ids, names, batch_size=2, device=torch.device("cpu"))
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())
    ref = tiny_llama()
    loss = sum(ref(input_ids=b, labels=b).loss * b.shape[0] * (b.shape[1] - 1) for b in ids.split(2))
    loss.backward()
    for n in names:
        assert torch.allclose(grads[n], ref.get_submodule(n).weight.grad, rtol=1e-4, atol=1e-6)


@dataclasses.dataclass(frozen=True)
class TaylorConfig(PruningConfig):
    """First-order Taylor importance |W * dL/dW| (LLM-Pruner's element-wise score)."""

    method: ClassVar[str] = "taylor_test"
    stats: ClassVar[frozenset[str]] = frozenset({"grad"})


class TaylorPlugin:
    @hookimpl
    def llmpress_register_methods(self, register) -> None:  # noqa: ANN001
        register("taylor_test", TaylorConfig)

    @hookimpl
    def llmpress_score_importance(self, module, stats, config) -> torch.Tensor:  # noqa: ANN001
        return (weight_of(module) * stats.grad.to(weight_of(module).device)).abs()


def test_a_gradient_based_method_gets_each_layers_own_gradient() -> None:
    pm = make_plugin_manager([TaylorPlugin()])
    ids = calib_ids(4, 16)
    ref = tiny_llama()
    grads = collect_gradients(ref, ids, ["model.layers.0.self_attn.k_proj"], 8, torch.device("cpu"))
    model, report = llmpress.compress(
        tiny_llama(), {"method": "taylor_test", "sparsity": 0.5}, ids, pm=pm, progress=False
    )
    w0 = weight_of(tiny_llama().model.layers[0].self_attn.k_proj)
    score = (w0 * grads["model.layers.0.self_attn.k_proj"]).abs()
    expect = llmpress.math.masks.select_mask(score, TaylorConfig(sparsity=0.5).sparsity_target())
    assert torch.equal(weight_of(model.model.layers[0].self_attn.k_proj) != 0, expect)
    assert abs(report.overall_sparsity - 0.5) < 1e-9


def test_statistics_reduce_across_processes_with_their_merge_rule(tmp_path: Path) -> None:
    """Two gloo processes each see half the batch; after all_reduce both hold the whole's stats."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(
        f"""
        import sys, torch, torch.distributed as dist
        from llmpress.engine.stats import LayerStats
        rank = int(sys.argv[1])
        dist.init_process_group("gloo", init_method="file://{tmp_path}/pg", rank=rank, world_size=2)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(2, 40, 16, generator=g) * torch.linspace(0.1, 3, 16)
        s = LayerStats(16, torch.device("cpu"), {{"hessian", "mean_var", "absmax", "token_norms"}})
        s.add(x[rank])
        s.all_reduce()
        whole = LayerStats(16, torch.device("cpu"), {{"hessian", "mean_var", "absmax", "token_norms"}})
        whole.add(x)
        assert s.nsamples == whole.nsamples == 80
        for k in whole.acc:
            assert torch.allclose(s.acc[k], whole.acc[k], rtol=1e-5, atol=1e-4), k
        dist.destroy_process_group()
        """
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", script, str(r)], stderr=subprocess.PIPE, text=True)
        for r in (0, 1)
    ]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read() if p.stderr else ""
