"""Quantization: GPTQ beats RTN on a layer, grids and codes are well formed, bad options fail
early and clearly, and joint 2:4 sparsity + quantization keeps the exact 2:4 structure."""

from __future__ import annotations

import pytest
import torch
from _quant_models import calib_ids, logits, quantized, tiny_llama, tiny_opt, weight_of
from models import is_nm_sparse
from transformers import AutoModelForCausalLM

import llmpress
from llmpress.errors import ModelError, RecipeError
from llmpress.format.runtime import LlmpressLinear
from llmpress.format.save import save_quantized, to_runtime
from llmpress.math.linalg import inverse_cholesky_upper
from llmpress.model.results import QuantState
from llmpress.plugins.gptq import GPTQConfig, gptq_quantize
from llmpress.plugins.rtn import RTNConfig, rtn_quantize
from llmpress.quant.grid import dequantize_weight

OUT, IN, N = 64, 256, 1024


# ------------------------------------------------------------------------------ one layer


@pytest.fixture(scope="module")
def layer() -> dict[str, torch.Tensor]:
    """A Linear 64x256 and correlated inputs X = Z @ A + noise + sparse outliers."""
    g = torch.Generator().manual_seed(0)
    Z = torch.randn(N, 32, generator=g)
    A = torch.randn(32, IN, generator=g)
    X = Z @ A + 0.1 * torch.randn(N, IN, generator=g)
    outliers = torch.rand(N, IN, generator=g) < 0.01
    X = X + outliers * 20.0 * torch.randn(N, IN, generator=g)
    W = torch.randn(OUT, IN, generator=g) * 0.05
    H = X.t() @ X
    perm = torch.sort(torch.diagonal(H), descending=True, stable=True).indices
    return {
        "X": X,
        "W": W,
        "H": H,
        "U": inverse_cholesky_upper(H, 0.01),
        "perm": perm,
        "U_perm": inverse_cholesky_upper(H[perm][:, perm], 0.01),
    }


def _output_error(W: torch.Tensor, Wq: torch.Tensor, X: torch.Tensor) -> float:
    """||W X - W' X|| (Frobenius) over the calibration inputs."""
    return float(torch.linalg.norm(W @ X.t() - Wq @ X.t()))


def _distinct_per_group(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """Number of distinct values in each (row, group) of w [out, in] -> [out, n_groups]."""
    gs = w.shape[1] if group_size == -1 else group_size
    s = torch.sort(w.reshape(w.shape[0], -1, gs), dim=-1).values
    return 1 + (s[..., 1:] != s[..., :-1]).sum(-1)


def _check_state(state: QuantState, w_hat: torch.Tensor, bits: int, gs: int, sym: bool) -> None:
    codes, scales, zeros = state.codes, state.scales, state.zeros
    n_groups = 1 if gs == -1 else IN // gs
    assert codes.dtype == torch.uint8 and codes.shape == (OUT, IN)
    assert scales.shape == zeros.shape == (OUT, n_groups)
    assert int(codes.min()) >= 0 and int(codes.max()) <= 2**bits - 1
    assert bool((scales > 0).all())
    assert torch.equal(zeros, zeros.round()) and float(zeros.min()) >= 0 and float(zeros.max()) <= 2**bits - 1
    if sym:
        assert bool((zeros == 2 ** (bits - 1)).all())
    assert (state.bits, state.group_size, state.symmetric) == (bits, gs, sym)
    # the returned weight is exactly the grid decoding of the returned codes
    assert torch.equal(w_hat, dequantize_weight(codes, scales, zeros, gs))
    assert int(_distinct_per_group(w_hat, gs).max()) <= 2**bits


@pytest.mark.parametrize("act_order", [False, True], ids=["natural", "act_order"])
@pytest.mark.parametrize("sym", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("gs", [-1, 64], ids=["per_channel", "g64"])
@pytest.mark.parametrize("bits", [3, 4])
def test_gptq_layer_error_below_rtn(layer: dict, bits: int, gs: int, sym: bool, act_order: bool) -> None:
    W, X = layer["W"], layer["X"]
    cfg = GPTQConfig(bits=bits, group_size=gs, symmetric=sym)
    if act_order:
        w_gptq, st_gptq, _ = gptq_quantize(W, layer["U_perm"], cfg, layer["perm"], None, 128)
    else:
        w_gptq, st_gptq, _ = gptq_quantize(W, layer["U"], cfg, None, None, 128)
    w_rtn, st_rtn = rtn_quantize(W, RTNConfig(bits=bits, group_size=gs, symmetric=sym))

    e_gptq, e_rtn = _output_error(W, w_gptq, X), _output_error(W, w_rtn, X)
    assert e_gptq < e_rtn, f"gptq {e_gptq:.4f} >= rtn {e_rtn:.4f}"
    assert e_gptq < 0.8 * e_rtn  # on correlated inputs the gain is large (about 0.4x here)
    _check_state(st_gptq, w_gptq, bits, gs, sym)
    _check_state(st_rtn, w_rtn, bits, gs, sym)
    assert st_gptq.method == "gptq" and st_rtn.method == "rtn"


def test_act_order_groups_are_static(layer: dict) -> None:
    """With act-order the groups stay contiguous in the original column order (no g_idx):
    decoding with the default group index gives back GPTQ's weight."""
    cfg = GPTQConfig(bits=4, group_size=64, act_order=True)
    w, st, _ = gptq_quantize(layer["W"], layer["U_perm"], cfg, layer["perm"], None, 32)
    assert not torch.equal(layer["perm"], torch.arange(IN))  # the order really changes
    assert torch.equal(w, dequantize_weight(st.codes, st.scales, st.zeros, 64))


def test_blocksize_does_not_change_the_result(layer: dict) -> None:
    cfg = GPTQConfig(bits=4, group_size=64)
    a, _, _ = gptq_quantize(layer["W"], layer["U"], cfg, None, None, 128)
    b, _, _ = gptq_quantize(layer["W"], layer["U"], cfg, None, None, 16)
    assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("sym", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("method", ["gptq", "gptq-act-order", "rtn"])
def test_pruned_weights_stay_exactly_zero(layer: dict, method: str, sym: bool) -> None:
    W = layer["W"]
    keep = torch.rand(W.shape, generator=torch.Generator().manual_seed(1)) < 0.5
    Wp = W * keep
    cfg = GPTQConfig(bits=4, group_size=64, symmetric=sym)
    if method == "gptq":
        w, st, _ = gptq_quantize(Wp, layer["U"], cfg, None, keep, 128)
    elif method == "gptq-act-order":
        w, st, _ = gptq_quantize(Wp, layer["U_perm"], cfg, layer["perm"], keep, 128)
    else:
        w, st = rtn_quantize(Wp, RTNConfig(bits=4, group_size=64, symmetric=sym), keep)
    assert bool((w[~keep] == 0).all())
    zero_codes = st.zeros.repeat_interleave(64, dim=1)
    assert torch.equal(st.codes[~keep].float(), zero_codes[~keep])


def test_dead_inputs_are_handled(layer: dict) -> None:
    """Input columns that are always 0 (diag(H) == 0) get a unit diagonal: the factor exists
    and GPTQ still beats RTN on the live inputs."""
    X = layer["X"].clone()
    X[:, :16] = 0.0
    H = X.t() @ X
    U = inverse_cholesky_upper(H, 0.01)
    assert torch.isfinite(U).all()
    cfg = GPTQConfig(bits=4, group_size=64)
    w, st, _ = gptq_quantize(layer["W"], U, cfg, None, None, 128)
    assert torch.isfinite(w).all() and int(st.codes.max()) <= 15
    w_rtn, _ = rtn_quantize(layer["W"], RTNConfig(bits=4, group_size=64))
    assert _output_error(layer["W"], w, X) < _output_error(layer["W"], w_rtn, X)


# ------------------------------------------------------------------------------ bad options


@pytest.mark.parametrize("bits", [1, 9, "four", 4.0, True])
@pytest.mark.parametrize("cls", [GPTQConfig, RTNConfig], ids=["gptq", "rtn"])
def test_bad_bits_is_a_recipe_error(cls: type, bits: object) -> None:
    with pytest.raises(RecipeError, match=r"bits must be an integer from 2 to 8"):
        cls(bits=bits)


@pytest.mark.parametrize(
    ("gs", "message"),
    [
        (0, r"group_size must be -1"),
        (-2, r"group_size must be -1"),
        ("32", r"'gptq': group_size must be an integer, got '32'"),
        (1.5, r"'gptq': group_size must be an integer, got 1.5"),
    ],
)
def test_bad_group_size_is_a_recipe_error(gs: object, message: str) -> None:
    with pytest.raises(RecipeError, match=message):
        GPTQConfig(group_size=gs)


@pytest.mark.parametrize("bits", [1, 9, "four"])
def test_bad_bits_in_a_recipe_fails_before_any_work(bits: object) -> None:
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RecipeError, match=r"'gptq'.*bits"):
        llmpress.compress(model, {"stages": [{"method": "gptq", "bits": bits}]}, calib_ids(), progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("method", ["gptq", "rtn"])
def test_group_size_not_dividing_in_features_names_the_module(
    method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """group_size 48 on in_features 64: ModelError naming the first such module, raised before
    calibration data is even built and before any weight changes."""
    import llmpress.pipeline.compress

    def boom(*a: object, **k: object) -> None:
        raise AssertionError("calibration was built before the shape check")

    monkeypatch.setattr(llmpress.pipeline.compress, "build_calibration", boom)
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    recipe = {"stages": [{"method": method, "bits": 4, "group_size": 48}]}
    for calib in (calib_ids(), None):
        with pytest.raises(ModelError) as ei:
            llmpress.compress(model, recipe, calib, progress=False)
        msg = str(ei.value)
        assert "model.layers.0.self_attn.q_proj" in msg and "in_features=64" in msg and "48" in msg
        assert "group_size" in msg and "32" in msg  # suggests a group size that divides
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_group_size_must_divide_every_targeted_layer() -> None:
    """group 128 divides down_proj (in 128) but not the attention layers (in 64)."""
    with pytest.raises(ModelError, match=r"model\.layers\.0\.self_attn\.q_proj"):
        llmpress.compress(tiny_llama(), {"method": "rtn", "group_size": 128}, None, progress=False)
    # restricted to the layers it divides, the same grid works
    model, rep = llmpress.compress(
        tiny_llama(),
        {"stages": [{"method": "rtn", "group_size": 128, "targets": ["down_proj"]}]},
        None,
        progress=False,
    )
    assert sorted(quantized(rep)) == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]


def test_unknown_quant_option_is_a_recipe_error() -> None:
    with pytest.raises(RecipeError, match=r"unknown option.*'wbits'"):
        GPTQConfig.from_dict({"method": "gptq", "wbits": 4})


def test_gptq_needs_calibration() -> None:
    with pytest.raises(llmpress.errors.CalibrationError, match="calibration"):
        llmpress.compress(tiny_llama(), {"method": "gptq", "group_size": 32}, None, progress=False)


# ------------------------------------------------------------------------------ whole models


@pytest.mark.parametrize(
    "stage",
    [
        {"method": "gptq", "bits": 4, "group_size": 32},
        {"method": "gptq", "bits": 3, "group_size": -1, "symmetric": True, "act_order": True},
        {"method": "gptq", "bits": 4, "group_size": 64, "act_order": True, "true_sequential": True},
        {"method": "rtn", "bits": 8, "group_size": 32, "symmetric": True},
    ],
    ids=["gptq4g32", "gptq3pc_sym_act", "gptq4g64_act_seq", "rtn8g32_sym"],
)
def test_model_weights_are_the_decoded_quant_state(stage: dict) -> None:
    model, rep = llmpress.compress(tiny_llama(), {"stages": [stage]}, calib_ids(), progress=False)
    assert set(quantized(rep)) == set(rep.modules) and len(rep.modules) == 14
    bits, gs = stage["bits"], stage["group_size"]
    for name, q in quantized(rep).items():
        w = weight_of(model.get_submodule(name))
        assert int(q.codes.max()) <= 2**bits - 1
        assert torch.equal(w, dequantize_weight(q.codes, q.scales, q.zeros, gs)), name
        assert int(_distinct_per_group(w, gs).max()) <= 2**bits
        assert rep.modules[name].methods == [stage["method"]]


def test_gptq_model_output_closer_than_rtn() -> None:
    """Whole model: GPTQ's logits are closer to the dense model's than RTN's (3-bit)."""
    ids = calib_ids(8, 32)
    dense = logits(tiny_llama(), ids)
    errs = {}
    for method in ("gptq", "rtn"):
        model, _ = llmpress.compress(
            tiny_llama(), {"method": method, "bits": 3, "group_size": 32}, ids, progress=False
        )
        errs[method] = float((logits(model, ids) - dense).pow(2).mean())
    assert errs["gptq"] < errs["rtn"], errs


# ------------------------------------------------------------------------------ joint 2:4 + int

JOINT = {
    "sparsegpt+gptq": {
        "stages": [
            {"method": "sparsegpt", "sparsity": 0.5, "pattern": "2:4"},
            {"method": "gptq", "bits": 4, "group_size": 32},
        ]
    },
    "wanda+rtn": {
        "stages": [
            {"method": "wanda", "sparsity": 0.5, "pattern": "2:4"},
            {"method": "rtn", "bits": 4, "group_size": 32},
        ]
    },
}
JOINT_ARCHS = {"llama": tiny_llama, "opt": tiny_opt}
JOINT_CASES = [(a, r) for a in JOINT_ARCHS for r in JOINT]


@pytest.fixture(scope="module")
def joint(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Each (arch, recipe): the compressed weights, then the folder saved by save_quantized."""
    out = {}
    for arch, rec in JOINT_CASES:
        model, rep = llmpress.compress(JOINT_ARCHS[arch](), JOINT[rec], calib_ids(), progress=False)
        weights = {n: weight_of(model.get_submodule(n)).clone() for n in rep.modules}
        d = save_quantized(model, tmp_path_factory.mktemp("joint") / f"{arch}-{rec}", report=rep)
        to_runtime(model, result=rep)  # what loading gives
        out[arch, rec] = {"model": model, "report": rep, "weights": weights, "dir": d}
    return out


@pytest.mark.parametrize(("arch", "rec"), JOINT_CASES)
def test_joint_24_quant_keeps_exact_24(joint: dict, arch: str, rec: str) -> None:
    item = joint[arch, rec]
    rep = item["report"]
    assert len(rep.modules) == (12 if arch == "opt" else 14)
    methods = [s["method"] for s in JOINT[rec]["stages"]]
    for name, w in item["weights"].items():
        assert rep.modules[name].methods == methods
        assert is_nm_sparse(w, 2, 4), name
        zeros = float((w == 0).float().mean())
        assert zeros >= 0.5, (name, zeros)
        # quantization may round a few kept weights to 0, never revive a pruned one
        assert zeros < 0.52, (name, zeros)
        q = quantized(item["report"])[name]
        assert torch.equal(w, dequantize_weight(q.codes, q.scales, q.zeros, 32))


def test_joint_24_reports_exactly_half_pruned(joint: dict) -> None:
    """The mask is exact: every layer reports exactly 50 % *pruned* (its keep mask), even
    though quantization may round a few kept weights to the zero point (which decodes to 0,
    as in the reference GPTQ/SparseGPT code); after reload every zero is still zero."""
    for (_arch, _rec), item in joint.items():
        loaded = AutoModelForCausalLM.from_pretrained(item["dir"])
        for name, w in item["weights"].items():
            assert item["report"].modules[name].sparsity == 0.5, name
            back = weight_of(loaded.get_submodule(name)).float()
            assert bool((back[w == 0] == 0).all()), name  # nothing pruned comes back
            assert is_nm_sparse(back, 2, 4), name


@pytest.mark.parametrize(("arch", "rec"), JOINT_CASES)
def test_joint_24_survives_save_and_reload(joint: dict, arch: str, rec: str) -> None:
    item = joint[arch, rec]
    loaded = AutoModelForCausalLM.from_pretrained(item["dir"])
    assert {m["format"] for m in loaded.config.quantization_config.modules.values()} == {"int-2:4"}
    assert torch.equal(logits(loaded), logits(item["model"]))
    for name, w in item["weights"].items():
        mod = loaded.get_submodule(name)
        assert isinstance(mod, LlmpressLinear) and mod.fmt.format == "int-2:4"
        out_f, in_f = w.shape
        # storage: codes of exactly in/2 slots per row (2 of every 4), 4 bits each
        assert mod.weight.shape == (out_f, in_f // 2 * 4 // 32)
        assert mod.weight_meta.shape == (out_f, in_f // 8)
        wl = weight_of(mod)
        assert is_nm_sparse(wl, 2, 4), name
        assert torch.equal(wl == 0, w == 0), name  # same zeros as before saving
        # scales are stored in fp16: the values agree to fp16 precision
        assert torch.allclose(wl, w, rtol=1e-3, atol=1e-6), name
