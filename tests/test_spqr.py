"""SpQR: with no outliers and plain statistics it is GPTQ; outliers are counted and kept
exactly; the ``spqr`` format reloads with identical logits and its size is the stated bits;
bad options fail before any work."""

from __future__ import annotations

import math

import pytest
import torch
from _quant_models import calib_ids, logits, tiny_llama
from transformers import AutoModelForCausalLM

import llmpress
from llmpress.errors import ModelError, RecipeError
from llmpress.format.formats import ModuleFormat
from llmpress.format.runtime import LlmpressLinear
from llmpress.format.save import save_quantized
from llmpress.math.linalg import inverse_cholesky_upper
from llmpress.plugins.gptq import GPTQConfig, gptq_quantize
from llmpress.plugins.spqr import SpqrOptions, spqr_quantize
from llmpress.quant.spqr import quantize_stat, spqr_bits

OUT, IN, N = 64, 128, 512


@pytest.fixture(scope="module")
def layer() -> dict[str, torch.Tensor]:
    """A 64x128 weight with a few large entries and correlated inputs."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(N, 16, generator=g) @ torch.randn(16, IN, generator=g) + 0.1 * torch.randn(
        N, IN, generator=g
    )
    W = torch.randn(OUT, IN, generator=g) * 0.05
    W[torch.rand(OUT, IN, generator=g) < 0.01] *= 25.0  # outliers
    H = X.t() @ X
    perm = torch.sort(torch.diagonal(H), descending=True, stable=True).indices
    return {
        "X": X,
        "W": W,
        "U": inverse_cholesky_upper(H, 0.01),
        "perm": perm,
        "U_perm": inverse_cholesky_upper(H[perm][:, perm], 0.01),
    }


@pytest.mark.parametrize("act_order", [False, True])
def test_no_outliers_plain_stats_is_gptq(layer: dict, act_order: bool) -> None:
    perm = layer["perm"] if act_order else None
    U = layer["U_perm"] if act_order else layer["U"]
    cfg = GPTQConfig(bits=3, group_size=16, act_order=act_order)
    w_gptq, st, loss_gptq = gptq_quantize(layer["W"], U, cfg, perm, None, 128, use_triton=False)
    opts = SpqrOptions(bits=3, group_size=16, stat_bits=None, tau=math.inf, stat_dtype=torch.float32)
    got = spqr_quantize(layer["W"], U, opts, perm)
    assert torch.equal(got.quant.codes, st.codes)
    torch.testing.assert_close(got.quant.scales, st.scales, rtol=0, atol=0)
    torch.testing.assert_close(got.weight, w_gptq, rtol=1e-6, atol=1e-7)
    assert got.quant.spqr is not None and got.quant.spqr.nnz == 0
    assert got.loss == pytest.approx(loss_gptq, rel=1e-5)


def test_outliers_counted_exact_and_helpful(layer: dict) -> None:
    W, X = layer["W"], layer["X"]
    plain = spqr_quantize(W, layer["U_perm"], SpqrOptions(tau=math.inf), layer["perm"])
    got = spqr_quantize(W, layer["U_perm"], SpqrOptions(tau=0.2), layer["perm"])
    extra = got.quant.spqr
    assert extra is not None and extra.outliers is not None
    o = extra.outliers
    assert 0 < o.nnz < W.numel() // 10
    assert int(o.rowptr[-1]) == o.nnz and o.rowptr.shape == (OUT + 1,)
    # every outlier's weight is its grid value plus its fp16 residual, and nothing else moved
    grid = extra.dequantize(got.quant.codes, got.quant.scales, got.quant.zeros)
    no_out = got.quant.codes.float()  # the grid alone
    g = got.quant.scales.shape[1]
    no_out = (
        (no_out.view(OUT, g, -1) - got.quant.zeros.view(OUT, g, 1)) * got.quant.scales.view(OUT, g, 1)
    ).view(OUT, IN)
    diff = grid - no_out
    assert int((diff != 0).sum()) <= o.nnz
    rows = torch.repeat_interleave(torch.arange(OUT), (o.rowptr[1:] - o.rowptr[:-1]).long())
    torch.testing.assert_close(diff[rows, o.cols.long()], o.values.float(), rtol=1e-3, atol=1e-6)
    assert torch.equal(got.weight, grid)
    # outliers cut the output error
    err = lambda w: float(torch.linalg.norm((W - w) @ X.t()))  # noqa: E731
    assert err(got.weight) < 0.9 * err(plain.weight)
    # quantized statistics: at most 2**3 distinct scales per 16 rows of one group
    sc = got.quant.scales.view(OUT // 16, 16, g)
    assert all(len(torch.unique(sc[r, :, k])) <= 8 for r in range(OUT // 16) for k in range(g))


def test_average_bits_arithmetic() -> None:
    b = spqr_bits(4096, 4096, 3, 16, 3, 16, 0)
    assert b.total == pytest.approx(3 + 6 / 16 + 64 / 256)  # the paper's 3.625 without outliers
    nnz = 4096 * 4096 // 100
    b = spqr_bits(4096, 4096, 3, 16, 3, 16, nnz)
    assert b.outliers == pytest.approx((32 * nnz + 32 * 4097) / 4096**2)
    assert spqr_bits(64, 128, 4, 16, None, 16, 0).total == pytest.approx(4 + 24 / 16)
    # the arithmetic is what the format stores, tensor by tensor
    for stat_bits, nnz in ((3, 0), (3, 17), (None, 5)):
        fmt = ModuleFormat(
            "spqr", IN, OUT, bits=3, group_size=16, stat_bits=stat_bits, stat_group_size=16, nnz=nnz
        )
        stored = sum(math.prod(s) * d.itemsize * 8 for s, d in fmt.tensor_shapes().values())
        assert stored / (OUT * IN) == pytest.approx(spqr_bits(OUT, IN, 3, 16, stat_bits, 16, nnz).total)


def test_stat_quantization_keeps_scales_positive() -> None:
    x = torch.rand(32, 5) * 1e-3 + 1e-9
    q = quantize_stat(x, 3, 16, positive=True)
    dec = q.decode()
    assert (dec > 0).all() and int(q.codes.max()) <= 7
    assert float((dec - x).abs().max()) <= float(q.scale.float().max()) / 2 + 1e-6


@pytest.mark.parametrize(
    "options, message",
    [
        ({"outlier_threshold": 0.0}, "outlier_threshold"),
        ({"outlier_threshold": -1.0}, "outlier_threshold"),
        ({"stat_group_size": 48}, "stat_group_size"),
        ({"group_size": 48}, "group_size"),
    ],
)
def test_bad_options_fail_before_work(options: dict, message: str) -> None:
    with pytest.raises((RecipeError, ModelError), match=message) as e:
        llmpress.compress(tiny_llama(), {"method": "spqr", **options}, calib_ids(4, 16), progress=False)
    assert "\n" not in str(e.value)


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict:
    model, rep = llmpress.compress(tiny_llama(), {"method": "spqr"}, calib_ids(8, 32), progress=False)
    d = save_quantized(model, tmp_path_factory.mktemp("spqr") / "m", report=rep, dtype=torch.float32)
    return {"dir": d, "model": model, "report": rep, "logits": logits(model)}


def test_report_states_bits_and_outliers(saved: dict) -> None:
    mods = saved["report"].modules
    assert mods and all("avg_bits" in m.info and "outliers" in m.info for m in mods.values())
    assert sum(m.info["outliers"] for m in mods.values()) > 0
    for m in mods.values():
        assert m.info["avg_bits"] == pytest.approx(
            m.info["bits_codes"] + m.info["bits_stats"] + m.info["bits_outliers"]
        )
    assert saved["report"].stored_bits == pytest.approx(
        sum(m.info["avg_bits"] * m.shape[0] * m.shape[1] for m in mods.values())
        / sum(m.shape[0] * m.shape[1] for m in mods.values())
    )


def test_reload_identical_logits_and_stated_size(saved: dict) -> None:
    loaded = AutoModelForCausalLM.from_pretrained(saved["dir"], dtype=torch.float32)
    packed = {n: m for n, m in loaded.named_modules() if isinstance(m, LlmpressLinear)}
    assert packed and all(m.fmt.format == "spqr" for m in packed.values())
    assert torch.equal(logits(loaded), saved["logits"])
    assert all(m.kernel is not None and m.kernel.name == "spqr" for m in packed.values())
    # the stored bytes of each layer are its reported average bits
    for name, m in packed.items():
        nbytes = sum(t.numel() * t.element_size() for t in m.packed().values())
        info = saved["report"].modules[name].info
        assert 8 * nbytes / (m.in_features * m.out_features) == pytest.approx(info["avg_bits"])


def test_int_kernel_plus_sparse_outliers(tmp_path) -> None:  # noqa: ANN001
    """β1 = 32 fits the CPU int kernels: the runtime uses them and adds the outliers."""
    from llmpress.kernels import cpu_int

    if not cpu_int.available():
        pytest.skip("this torch has no CPU int kernels")
    model, rep = llmpress.compress(
        tiny_llama(), {"method": "spqr", "bits": 4, "group_size": 32}, calib_ids(8, 32), progress=False
    )
    d = save_quantized(model, tmp_path / "m", report=rep, dtype=torch.float32)
    ref = logits(model)
    loaded = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    ids = torch.randint(0, 128, (1, 8))  # few rows: the packed kernel, not its dense fallback
    got = logits(loaded, ids)
    states = [m._kernel_state for m in loaded.modules() if isinstance(m, LlmpressLinear)]
    assert states and all("int" in s for s in states)
    assert any(s["sparse"] is not None for s in states)
    torch.testing.assert_close(got, logits(model, ids), rtol=0.05, atol=0.05)  # bf16 activations
    assert ref.shape[-1] == got.shape[-1]


def test_card_states_stored_bits(saved: dict) -> None:
    pytest.importorskip("jinja2")
    from llmpress.hub.card import build_card

    text = str(build_card(saved["dir"], write_plot=False))
    assert f"store {saved['report'].stored_bits:.3f} bits per weight" in text
    assert "fp16 outliers" in text


def _edit(src, dst, edit) -> None:  # noqa: ANN001
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    for f in dst.glob("*.safetensors"):
        t = load_file(f)
        if edit(t):
            save_file(t, f, metadata={"format": "pt"})


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: t.pop(next(k for k in t if k.endswith("weight_zero_min")), None) is not None, "missing"),
        (
            lambda t: [v.zero_() for k, v in t.items() if k.endswith("weight_scale_scale")],
            "finite and positive",
        ),
        (lambda t: [v.fill_(30000) for k, v in t.items() if k.endswith("outlier_cols")], "at most"),
    ],
)
def test_checkpoint_validation_checks_spqr_tensors(saved: dict, tmp_path, edit, message: str) -> None:  # noqa: ANN001
    from llmpress.errors import CheckpointError

    d = tmp_path / "bad"
    _edit(saved["dir"], d, edit)
    with pytest.raises(CheckpointError, match=message):
        AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)


def test_compressed_tensors_export_refused(saved: dict, tmp_path) -> None:  # noqa: ANN001
    from llmpress.errors import LlmpressError
    from llmpress.format.compressed_tensors import save_compressed_tensors

    with pytest.raises(LlmpressError, match="cannot store 'spqr' layers"):
        save_compressed_tensors(saved["model"], tmp_path / "ct", report=saved["report"])
    assert not (tmp_path / "ct").exists()
