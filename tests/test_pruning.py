"""Pruning end to end on tiny models of several architectures, SparseGPT's reconstruction
quality on one layer and through the pipeline, and the sequential (compressed-input) property."""

from __future__ import annotations

import json

import pytest
import torch
from models import ARCHS, LLAMA, Arch, calib_ids, is_nm_sparse, snapshot, tiny_llama, weight_of
from torch import nn

import llmpress
from llmpress.engine.stats import LayerStats
from llmpress.math.masks import nm_mask, unstructured_mask
from llmpress.model.results import LayerResult
from llmpress.plugin_manager import make_plugin_manager
from llmpress.plugins.sparsegpt import SparseGPTConfig
from llmpress.plugins.wanda import wanda_scores

METHODS = [
    ("magnitude", {}),  # one threshold per layer (the default)
    ("magnitude-row", {"group": "row"}),
    ("wanda", {}),
    ("sparsegpt", {}),
]
PATTERNS = ["unstructured", "2:4"]


def _compress(arch: Arch, method: str, options: dict, pattern: str):
    model = arch()
    before = snapshot(model)
    recipe = {"stages": [{"method": method.split("-")[0], "sparsity": 0.5, "pattern": pattern, **options}]}
    model, report = llmpress.compress(model, recipe, calib_ids(8, 32), nsamples=8, seqlen=32, progress=False)
    return model, report, before


# the comparison group only matters for unstructured sparsity: no magnitude-row with 2:4
GRID = [
    pytest.param(arch, method, options, pattern, id=f"{name}-{method}-{pattern}")
    for name, arch in ARCHS
    for method, options in METHODS
    for pattern in PATTERNS
    if not (method == "magnitude-row" and pattern != "unstructured")
]


@pytest.mark.parametrize(("arch", "method", "options", "pattern"), GRID)
def test_every_block_linear_pruned_exactly(arch: Arch, method: str, options: dict, pattern: str) -> None:
    model, report, before = _compress(arch, method, options, pattern)
    targets = arch.expected_targets()
    assert set(report.modules) == targets  # every block linear, nothing else
    modules = dict(model.named_modules())
    after = model.state_dict()
    # embeddings, LM head, norms, biases and every layer outside the blocks are untouched
    target_weights = {f"{t}.weight" for t in targets}
    untouched = [k for k in before if k not in target_weights]
    assert any("embed" in k or "wte" in k or "word_embeddings" in k for k in untouched)
    for k in untouched:
        assert torch.equal(after[k], before[k]), f"{k} changed"
    for name in targets:
        w = weight_of(modules[name])
        w0 = weight_of_key(before, name, modules[name])
        out_f, in_f = w.shape
        zeros = w == 0
        rep = report.modules[name]
        assert rep.shape == (out_f, in_f)
        assert rep.methods == [method.split("-")[0]]
        assert rep.sparsity == pytest.approx(float(zeros.float().mean()), abs=1e-7)
        if pattern == "2:4":
            assert is_nm_sparse(w, 2, 4), name
            assert int(zeros.sum()) == w.numel() // 2, name
        elif method in ("wanda", "magnitude-row"):
            assert (zeros.sum(1) == in_f // 2).all(), name
        elif method == "magnitude":
            assert int(zeros.sum()) == w.numel() // 2, name
        else:  # sparsegpt: a layer-wide count, exact up to rounding
            assert abs(int(zeros.sum()) - 0.5 * w.numel()) <= out_f, name
        if method == "sparsegpt":
            assert not torch.equal(w[~zeros], w0[~zeros]), f"{name}: SparseGPT updated no kept weight"
        else:  # mask-only methods keep the surviving weights as they were
            assert torch.equal(w[~zeros], w0[~zeros]), name
        if method.startswith("magnitude") and pattern == "unstructured":
            group = "row" if method == "magnitude-row" else "layer"
            assert torch.equal(~zeros, unstructured_mask(w0.abs().float(), 0.5, group)), name
    assert report.overall_sparsity == pytest.approx(0.5, abs=0.01)
    json.dumps(report.to_dict())  # the report is JSON-ready


def weight_of_key(state: dict[str, torch.Tensor], name: str, module: nn.Module) -> torch.Tensor:
    w = state[f"{name}.weight"]
    return w.t() if type(module).__name__ == "Conv1D" else w


def test_wanda_mask_uses_activations() -> None:
    """Wanda and per-row magnitude differ: the calibration activations change the choice."""
    wanda, _, _ = _compress(LLAMA, "wanda", {}, "unstructured")
    mag, _, _ = _compress(LLAMA, "magnitude-row", {"group": "row"}, "unstructured")
    differ = [
        n
        for n in LLAMA.expected_targets()
        if not torch.equal(weight_of(wanda.get_submodule(n)) == 0, weight_of(mag.get_submodule(n)) == 0)
    ]
    assert differ


def test_report_contents() -> None:
    model, report = llmpress.compress(
        tiny_llama(),
        {"method": "wanda", "sparsity": 0.5},
        calib_ids(8, 32),
        nsamples=6,
        seqlen=16,
        seed=3,
        progress=False,
    )
    d = report.to_dict()
    assert d["recipe"] == {"stages": [{"method": "wanda", "sparsity": 0.5}]}
    assert d["calibration"]["nsamples"] == 6 and d["calibration"]["seqlen"] == 16
    assert d["device"] == "cpu"
    assert d["overall_sparsity"] == 0.5
    assert {"torch", "transformers"} <= set(d["versions"])
    assert set(d["modules"]) == LLAMA.expected_targets()
    assert all(m["sparsity"] == 0.5 and m["methods"] == ["wanda"] for m in d["modules"].values())
    assert d["wall_time_s"] >= 0


# ---------------------------------------------------------------- SparseGPT layer reconstruction


def _correlated_inputs(n: int, in_f: int, seed: int) -> torch.Tensor:
    """X = Z A (+ noise): strongly correlated columns, four of them large-magnitude outliers."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 24, generator=g)
    a = torch.randn(24, in_f, generator=g)
    x = z @ a + 0.1 * torch.randn(n, in_f, generator=g)  # [n, in]
    x[:, torch.randperm(in_f, generator=g)[:4]] *= 20
    return x


def _sparsegpt_via_hook(weight: torch.Tensor, x: torch.Tensor, config: SparseGPTConfig) -> LayerResult:
    """Run the sparsegpt plugin through the hook contract on one Linear layer fed ``x``."""
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        layer.weight.copy_(weight)
    stats = LayerStats(weight.shape[1], torch.device("cpu"), {"hessian"})
    for chunk in x.split(256):
        stats.add(chunk)
    res = make_plugin_manager().hooks_for(config).update(layer, None, stats, config)
    assert isinstance(res, LayerResult)
    assert torch.equal(layer.weight, weight), "the update hook must not write the layer itself"
    return res


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("seed", [0, 1])
def test_sparsegpt_reconstructs_a_layer_better_than_wanda_and_magnitude(pattern: str, seed: int) -> None:
    torch.manual_seed(seed)
    out_f, in_f = 64, 128
    w = torch.randn(out_f, in_f)
    x = _correlated_inputs(1024, in_f, seed)
    nm = None if pattern == "unstructured" else (2, 4)

    def err(w_new: torch.Tensor) -> float:
        return float(torch.linalg.norm((w - w_new) @ x.T))  # ||W X - W' X||_F

    res = _sparsegpt_via_hook(w, x, SparseGPTConfig(sparsity=0.5, pattern=pattern, blocksize=32))
    keep = res.mask
    assert keep is not None and keep.dtype == torch.bool and keep.shape == w.shape
    assert (res.weight[~keep] == 0).all()
    if nm is None:
        assert int((~keep).sum()) == w.numel() // 2
    else:
        assert is_nm_sparse(res.weight, *nm) and int((~keep).sum()) == w.numel() // 2

    norms = x.square().sum(0).sqrt()
    wanda_keep = (
        nm_mask(wanda_scores(w, norms), *nm) if nm else unstructured_mask(wanda_scores(w, norms), 0.5)
    )
    mag_keep = nm_mask(w.abs(), *nm) if nm else unstructured_mask(w.abs(), 0.5, "layer")
    e_sgpt, e_wanda, e_mag = err(res.weight), err(w * wanda_keep), err(w * mag_keep)
    assert e_sgpt < e_wanda, (e_sgpt, e_wanda)
    assert e_sgpt < e_mag, (e_sgpt, e_mag)
    assert e_sgpt < 0.8 * min(e_wanda, e_mag), (e_sgpt, e_wanda, e_mag)  # a clear margin, not a tie
    assert e_wanda < e_mag  # outlier features: activation-aware beats plain magnitude


@pytest.mark.parametrize("pattern", PATTERNS)
def test_sparsegpt_with_isotropic_inputs_is_magnitude_pruning(pattern: str) -> None:
    """X^T X proportional to I: no correlations to exploit, so the OBS update changes no kept
    weight and the saliency w^2 / [H^-1]_jj^2 orders weights like |w| (one block: layer-wide)."""
    torch.manual_seed(0)
    w = torch.randn(16, 64)
    res = _sparsegpt_via_hook(w, 3.0 * torch.eye(64), SparseGPTConfig(sparsity=0.5, pattern=pattern))
    expected = nm_mask(w.abs(), 2, 4) if pattern == "2:4" else unstructured_mask(w.abs(), 0.5, "layer")
    assert torch.equal(res.mask, expected)
    torch.testing.assert_close(res.weight, w * expected, rtol=1e-5, atol=1e-6)


def test_sparsegpt_at_zero_sparsity_changes_nothing() -> None:
    torch.manual_seed(0)
    w = torch.randn(16, 64)
    res = _sparsegpt_via_hook(w, _correlated_inputs(256, 64, 0), SparseGPTConfig(sparsity=0.0))
    assert res.mask.all()
    torch.testing.assert_close(res.weight, w)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_sparsegpt_beats_magnitude_through_the_pipeline(pattern: str) -> None:
    """Tiny Llama: the logits of the SparseGPT model are closer to the dense ones (held-out ids)."""
    held_out = calib_ids(8, 32, seed=1)
    with torch.no_grad():
        dense = tiny_llama()(input_ids=held_out).logits

    def rel_mse(method: str) -> float:
        model, _ = llmpress.compress(
            tiny_llama(),
            {"method": method, "sparsity": 0.5, "pattern": pattern},
            calib_ids(16, 32),
            progress=False,
        )
        with torch.no_grad():
            out = model(input_ids=held_out).logits
        return float((out - dense).square().mean() / dense.square().mean())

    e_sgpt, e_mag = rel_mse("sparsegpt"), rel_mse("magnitude")
    assert 0 < e_sgpt < 0.85 * e_mag, (e_sgpt, e_mag)


# ------------------------------------------------------------------------------- sequential pass


class StatsRecorder:
    """A wrapper around ``llmpress_score_importance`` that records each layer's input norms."""

    def __init__(self, names: dict[int, str]) -> None:
        self.names = names
        self.sq_norms: dict[str, torch.Tensor] = {}

    @llmpress.hookimpl(wrapper=True)
    def llmpress_score_importance(self, module, stats, config):  # noqa: ANN001, ANN201
        self.sq_norms[self.names[id(module)]] = stats.sq_norms.clone()
        return (yield)


def _input_sq_norms(model: nn.Module, layer: str, ids: torch.Tensor) -> torch.Tensor:
    acc: list[torch.Tensor] = []

    def hook(mod: nn.Module, args: tuple) -> None:
        acc.append(args[0].detach().reshape(-1, args[0].shape[-1]).square().sum(0))

    h = model.get_submodule(layer).register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        h.remove()
    return torch.stack(acc).sum(0)


def test_next_block_statistics_come_from_the_compressed_block() -> None:
    ids = calib_ids(8, 32)
    model = tiny_llama()
    dense = tiny_llama()
    recorder = StatsRecorder({id(m): n for n, m in model.named_modules()})
    pm = make_plugin_manager(extra_plugins=[recorder])
    model, _ = llmpress.compress(model, {"method": "wanda", "sparsity": 0.5}, ids, pm=pm, progress=False)

    q0, q1 = "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"
    # block 0 sees the embeddings: same as the dense model
    torch.testing.assert_close(recorder.sq_norms[q0], _input_sq_norms(dense, q0, ids), rtol=1e-4, atol=1e-6)
    # block 1 saw the outputs of the *compressed* block 0 ...
    seen = recorder.sq_norms[q1]
    torch.testing.assert_close(seen, _input_sq_norms(model, q1, ids), rtol=1e-4, atol=1e-6)
    # ... which differ from the dense model's block-1 inputs
    dense_q1 = _input_sq_norms(dense, q1, ids)
    assert float((seen - dense_q1).abs().max() / dense_q1.abs().max()) > 1e-3
    # one recorded statistic per target layer, q/k/v share one input
    assert set(recorder.sq_norms) == LLAMA.expected_targets()
    assert torch.equal(recorder.sq_norms[q1], recorder.sq_norms["model.layers.1.self_attn.v_proj"])


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_batching_and_offload_do_not_change_the_result(method: str) -> None:
    ids = calib_ids(8, 32)
    recipe = {"method": method, "sparsity": 0.5}
    ref, _ = llmpress.compress(tiny_llama(), recipe, ids, progress=False)
    other, _ = llmpress.compress(
        tiny_llama(), recipe, ids, batch_size=3, offload_activations=True, device="cpu", progress=False
    )
    for (n, a), (_, b) in zip(ref.state_dict().items(), other.state_dict().items()):
        assert torch.equal(a == 0, b == 0), n
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_half_precision_model() -> None:
    model = tiny_llama().to(torch.bfloat16)
    for method in ("wanda", "sparsegpt"):
        m, report = llmpress.compress(
            model, {"method": method, "pattern": "2:4"}, calib_ids(), progress=False
        )
        assert next(m.parameters()).dtype == torch.bfloat16
        for n in report.modules:
            w = weight_of(m.get_submodule(n))
            assert is_nm_sparse(w, 2, 4) and int((w == 0).sum()) == w.numel() // 2
        assert all(torch.isfinite(p.detach().float()).all() for p in m.parameters())
        model = tiny_llama().to(torch.bfloat16)


def test_compression_is_deterministic() -> None:
    a, _ = llmpress.compress(
        tiny_llama(), {"method": "sparsegpt", "sparsity": 0.5}, calib_ids(), progress=False
    )
    b, _ = llmpress.compress(
        tiny_llama(), {"method": "sparsegpt", "sparsity": 0.5}, calib_ids(), progress=False
    )
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cpu_model_compressed_block_by_block_on_cuda() -> None:
    ref, _ = llmpress.compress(
        tiny_llama(), {"method": "sparsegpt", "pattern": "2:4"}, calib_ids(), progress=False
    )
    model, report = llmpress.compress(
        tiny_llama(),
        {"method": "sparsegpt", "pattern": "2:4"},
        calib_ids(),
        device="cuda",
        offload_activations=True,
        progress=False,
    )
    assert report.device.startswith("cuda")
    assert all(p.device.type == "cpu" for p in model.parameters())
    for n in report.modules:
        w = weight_of(model.get_submodule(n))
        assert is_nm_sparse(w, 2, 4)
        torch.testing.assert_close(w, weight_of(ref.get_submodule(n)), rtol=1e-3, atol=1e-4)
