"""GPTAQ and asymmetric SparseGPT: the engine's dense-model inputs (statistic ``dense_cross``),
equality with GPTQ / SparseGPT when the two input streams agree, the correction's effect on
one layer, act-order, the command line, and bad options."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _quant_models import calib_ids, logits, quantized, tiny_llama, weight_of
from test_format import _cli_compress, _cli_eval, cli_env  # noqa: F401 - the fixture
from transformers import AutoModelForCausalLM

import llmpress
from llmpress.engine.capture import DenseStream
from llmpress.engine.stats import LayerStats
from llmpress.errors import ModelError, RecipeError
from llmpress.kernels.gptq_sweep import gptq_quantize
from llmpress.math.linalg import inverse_cholesky_upper
from llmpress.math.obs import asymmetric_correction
from llmpress.plugins.gptaq import GPTAQConfig
from llmpress.plugins.sparsegpt import SparseGPTConfig, sparsegpt_prune
from llmpress.quant.grid import dequantize_weight

W4 = {"bits": 4, "group_size": 32}


def _block_weights(model: torch.nn.Module, block: int) -> dict[str, torch.Tensor]:
    prefix = f"model.layers.{block}."
    return {
        n: weight_of(m) for n, m in model.named_modules() if n.startswith(prefix) and hasattr(m, "weight")
    }


def _compress(stage: dict, ids: torch.Tensor | None = None) -> tuple[torch.nn.Module, object]:
    ids = calib_ids() if ids is None else ids
    return llmpress.compress(tiny_llama(), {"stages": [stage]}, ids, progress=False)


# ------------------------------------------------------------------------------ the statistic


def test_dense_cross_is_the_paired_product() -> None:
    g = torch.Generator().manual_seed(0)
    x, xd = torch.randn(2, 10, 8, generator=g), torch.randn(2, 10, 8, generator=g)
    st = LayerStats(8, torch.device("cpu"), {"hessian", "dense_cross"})
    st.add(x[0], xd[0])
    st.add(x[1], xd[1])
    X, Xd = x.reshape(-1, 8), xd.reshape(-1, 8)
    torch.testing.assert_close(st.dense_cross, (Xd - X).t() @ X / 20)
    torch.testing.assert_close(st.hessian, X.t() @ X / 20)
    with pytest.raises(ModelError, match="dense"):
        st.add(x[0], xd[0, :5])  # tokens must pair up


def test_dense_stream_carries_the_dense_models_hidden_states(monkeypatch: pytest.MonkeyPatch) -> None:
    """The dense stream's block inputs are the uncompressed model's, block after block."""
    ids = calib_ids(4, 16)
    seen: list[torch.Tensor] = []
    advance = DenseStream.advance

    def spy(self: DenseStream, block: torch.nn.Module) -> None:
        advance(self, block)
        seen.append(torch.cat(self.hidden))

    monkeypatch.setattr(DenseStream, "advance", spy)
    dense = tiny_llama()
    with torch.no_grad():
        want = dense(input_ids=ids, output_hidden_states=True).hidden_states
    _compress({"method": "gptaq", "bits": 3, "group_size": 32, "true_sequential": True}, ids)
    assert len(seen) == 1  # two blocks: the stream advances once
    torch.testing.assert_close(seen[0], want[1], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------ equal to GPTQ


@pytest.mark.parametrize("act_order", [False, True])
def test_first_block_equals_gptq_and_later_blocks_differ(act_order: bool) -> None:
    """In block 0 the dense and compressed inputs are equal (dXX^T = 0), so GPTAQ is GPTQ;
    in block 1 they are not, and the correction changes the result."""
    base = {**W4, "act_order": act_order}
    m_aq, _ = _compress({"method": "gptaq", **base})
    m_q, _ = _compress({"method": "gptq", **base})
    for (n, a), b in zip(_block_weights(m_aq, 0).items(), _block_weights(m_q, 0).values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=n)
    later = zip(_block_weights(m_aq, 1).values(), _block_weights(m_q, 1).values())
    assert any(not torch.allclose(a, b) for a, b in later)


def test_alpha_zero_is_gptq_everywhere() -> None:
    m_aq, _ = _compress({"method": "gptaq", **W4, "alpha": 0.0, "true_sequential": True})
    m_q, _ = _compress({"method": "gptq", **W4, "true_sequential": True})
    for n in (0, 1):
        for a, b in zip(_block_weights(m_aq, n).values(), _block_weights(m_q, n).values()):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_zero_correction_leaves_the_sweep_unchanged() -> None:
    g = torch.Generator().manual_seed(1)
    X = torch.randn(512, 64, generator=g)
    W = torch.randn(16, 64, generator=g)
    U = inverse_cholesky_upper(X.t() @ X)
    cfg = GPTAQConfig(**W4)
    a, _, _ = gptq_quantize(W, U, cfg, use_triton=False, P=torch.zeros(64, 64))
    b, _, _ = gptq_quantize(W, U, cfg, use_triton=False)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------ one layer


def _asymmetric_layer(seed: int = 0) -> dict[str, torch.Tensor]:
    """Dense inputs X and compressed-model inputs X~ = X + a correlated error."""
    g = torch.Generator().manual_seed(seed)
    Z = torch.randn(2048, 24, generator=g)
    X = Z @ torch.randn(24, 128, generator=g) + 0.1 * torch.randn(2048, 128, generator=g)
    Xt = X + 0.3 * (Z @ torch.randn(24, 128, generator=g)) + 0.05 * torch.randn(2048, 128, generator=g)
    W = torch.randn(32, 128, generator=g) * 0.05
    U = inverse_cholesky_upper(Xt.t() @ Xt)
    return {"X": X, "Xt": Xt, "W": W, "U": U, "dxxt": (X - Xt).t() @ Xt}


def _target_error(d: dict[str, torch.Tensor], Wc: torch.Tensor) -> float:
    """||W X - W' X~||: the compressed layer on its inputs against the dense layer's output."""
    return float(torch.linalg.norm(d["X"] @ d["W"].t() - d["Xt"] @ Wc.t()))


def test_correction_moves_a_layer_toward_the_dense_output() -> None:
    d = _asymmetric_layer()
    cfg = GPTAQConfig(bits=4, group_size=32)
    q, _, _ = gptq_quantize(d["W"], d["U"], cfg, use_triton=False)
    errs = {}
    for alpha in (0.25, 1.0):
        P = asymmetric_correction(d["dxxt"], d["U"], alpha)
        assert torch.equal(P, P.triu(1))
        errs[alpha] = _target_error(d, gptq_quantize(d["W"], d["U"], cfg, use_triton=False, P=P)[0])
    assert errs[1.0] < errs[0.25] < _target_error(d, q), errs
    sp = sparsegpt_prune(d["W"], d["U"], 0.5)[0]
    P = asymmetric_correction(d["dxxt"], d["U"], 1.0)
    sp_asym, keep, _ = sparsegpt_prune(d["W"], d["U"], 0.5, P=P)
    assert int((~keep).sum()) == d["W"].numel() // 2 and torch.equal(sp_asym == 0, ~keep)
    assert _target_error(d, sp_asym) < _target_error(d, sp)


def test_correction_does_not_depend_on_the_token_count_scale() -> None:
    """H and dXX^T summed or averaged over the same tokens give the same P."""
    d = _asymmetric_layer(1)
    n = d["X"].shape[0]
    P_sum = asymmetric_correction(d["dxxt"], d["U"], 0.25)
    U_mean = inverse_cholesky_upper(d["Xt"].t() @ d["Xt"] / n)
    torch.testing.assert_close(
        asymmetric_correction(d["dxxt"] / n, U_mean, 0.25), P_sum, rtol=1e-3, atol=1e-5
    )


# ------------------------------------------------------------------------------ whole model


def test_act_order_static_groups_and_closer_than_gptq() -> None:
    ids = calib_ids(16, 32)
    dense = logits(tiny_llama(), ids)
    errs = {}
    for method in ("gptaq", "gptq"):
        stage = {"method": method, "bits": 3, "group_size": 32, "act_order": True, "true_sequential": True}
        model, rep = _compress(stage, ids)
        errs[method] = float((logits(model, ids) - dense).pow(2).mean())
        for name, q in quantized(rep).items():
            assert torch.equal(
                weight_of(model.get_submodule(name)), dequantize_weight(q.codes, q.scales, q.zeros, 32)
            )
            assert rep.modules[name].methods == [method]
    assert errs["gptaq"] < errs["gptq"], errs


def test_gptaq_after_sparsegpt_keeps_the_mask() -> None:
    stages = [{"method": "sparsegpt", "sparsity": 0.5}, {"method": "gptaq", **W4}]
    model, rep = llmpress.compress(tiny_llama(), {"stages": stages}, calib_ids(), progress=False)
    for name in rep.modules:
        w = weight_of(model.get_submodule(name))
        assert float((w == 0).float().mean()) >= 0.5, name


def test_asymmetric_sparsegpt() -> None:
    ids = calib_ids(16, 32)
    dense = logits(tiny_llama(), ids)
    errs = {}
    for asym in (False, True):
        stage = {"method": "sparsegpt", "sparsity": 0.5, "asymmetric": asym}
        model, rep = _compress(stage, ids)
        errs[asym] = float((logits(model, ids) - dense).pow(2).mean())
        for name in rep.modules:
            w = weight_of(model.get_submodule(name))
            assert int((w == 0).sum()) == w.numel() // 2, name
    assert errs[True] < errs[False], errs
    zero, _ = _compress({"method": "sparsegpt", "sparsity": 0.5, "asymmetric": True, "alpha": 0.0})
    plain, _ = _compress({"method": "sparsegpt", "sparsity": 0.5})
    for a, b in zip(_block_weights(zero, 1).values(), _block_weights(plain, 1).values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------ options


@pytest.mark.parametrize("alpha", [-0.1, 1.5, float("nan")])
def test_bad_alpha_is_refused(alpha: float) -> None:
    with pytest.raises(RecipeError, match="alpha"):
        GPTAQConfig(alpha=alpha)
    with pytest.raises(RecipeError, match="alpha"):
        SparseGPTConfig(sparsity=0.5, asymmetric=True, alpha=alpha)
    with pytest.raises(RecipeError, match="alpha"):
        llmpress.compress(tiny_llama(), {"method": "gptaq", "alpha": alpha}, calib_ids(), progress=False)


def test_statistics_asked_for() -> None:
    assert GPTAQConfig().statistics() == {"hessian", "dense_cross"}
    assert "dense_cross" not in SparseGPTConfig(sparsity=0.5).statistics()
    assert "dense_cross" in SparseGPTConfig(sparsity=0.5, asymmetric=True).statistics()


# ------------------------------------------------------------------------------ command line


def test_cli_gptaq_saves_and_reloads(cli_env: dict, capsys: pytest.CaptureFixture) -> None:  # noqa: F811
    recipe = "stages:\n  - method: gptaq\n    bits: 4\n    group_size: 128\n    act_order: true\n"
    out = _cli_compress(cli_env, recipe, "gptaq")
    assert "compressed 14 layers" in capsys.readouterr().out
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert {m["format"] for m in cfg["modules"].values()} == {"int"}
    report = json.loads((Path(out) / "llmpress_report.json").read_text())
    assert {tuple(m["methods"]) for m in report["modules"].values()} == {("gptaq",)}
    res = _cli_eval(cli_env, out, capsys)
    assert res["windows"] >= 1
    model = AutoModelForCausalLM.from_pretrained(out)
    for name in cfg["modules"]:
        w = weight_of(model.get_submodule(name)).reshape(-1, 128)
        assert int(max(len(torch.unique(row)) for row in w)) <= 16, name


def test_routed_experts_are_refused_before_any_block_changes() -> None:
    from models import tiny_mixtral

    model = tiny_mixtral()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ModelError, match="experts"):
        llmpress.compress(model, {"method": "gptaq", **W4}, calib_ids(4, 16), progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    stage = {"method": "gptaq", **W4, "ignore": [".*experts.*"]}
    llmpress.compress(tiny_mixtral(), {"stages": [stage]}, calib_ids(4, 16), progress=False)
