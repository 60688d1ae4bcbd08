"""The packed on-disk format: module pack/unpack, quantize -> save -> load bit for bit on several
architectures and formats (int, int-2:4, 2:4, bitmask), on-disk size, and the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from _quant_models import (
    ARCHS,
    assert_same_state,
    calib_ids,
    logits,
    make_text,
    make_tokenizer,
    quantized,
    safetensors_data_bytes,
    save_model_dir,
    tiny_gpt2,
    tiny_llama,
    tiny_opt,
    weight_of,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from models import is_nm_sparse
from pydantic import ValidationError
from transformers import AutoModelForCausalLM

import llmpress
from llmpress.cli.main import main
from llmpress.errors import CheckpointError
from llmpress.format.formats import (
    FORMAT_VERSION,
    PACKED_FORMATS,
    ModuleFormat,
    choose_format,
    pack_module,
    unpack_module,
)
from llmpress.format.runtime import LlmpressLinear
from llmpress.format.save import save_compressed, save_quantized, to_runtime
from llmpress.model.results import LayerResult, QuantState
from llmpress.quant.activations import fp8_weight
from llmpress.quant.grid import dequantize_weight

# ------------------------------------------------------------------------------ pack / unpack


def _random_24_keep(out_f: int, in_f: int, g: torch.Generator) -> torch.Tensor:
    """At most 2 kept of every 4 (usually exactly 2, sometimes fewer)."""
    scores = torch.rand(out_f, in_f // 4, 4, generator=g)
    idx = torch.sort(scores, dim=-1).indices[..., :2]
    keep = torch.zeros(out_f, in_f // 4, 4, dtype=torch.bool).scatter_(-1, idx, True)
    drop = torch.rand(out_f, in_f // 4, 4, generator=g) < 0.1
    return (keep & ~drop).reshape(out_f, in_f)


@st.composite
def module_cases(draw: st.DrawFn) -> dict:
    # spqr layers come from a SpQR sweep's state: tests/test_spqr.py round-trips them
    fmt = draw(st.sampled_from([f for f in PACKED_FORMATS if f != "spqr"]))
    out_f = draw(st.integers(1, 12))
    in_f = 4 * draw(st.integers(1, 48))
    bits = draw(st.integers(2, 8))
    gs = draw(st.sampled_from([-1] + [g for g in (4, 8, 16, 32, 64, 128) if in_f % g == 0]))
    return {
        "format": fmt,
        "out": out_f,
        "in": in_f,
        "bits": bits,
        "gs": gs,
        "sym": draw(st.booleans()),
        "dtype": draw(st.sampled_from(["float16", "bfloat16", "float32"])),
        "seed": draw(st.integers(0, 2**31 - 1)),
    }


@settings(max_examples=25, deadline=None)
@given(module_cases())
def test_pack_unpack_module_roundtrip(case: dict) -> None:
    g = torch.Generator().manual_seed(case["seed"])
    o, i, bits, gs, sym = case["out"], case["in"], case["bits"], case["gs"], case["sym"]
    kind, dt = case["format"], case["dtype"]
    tdt = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[dt]
    quant, keep = None, None
    if kind.startswith("int"):
        n_groups = 1 if gs == -1 else i // gs
        maxq = 2**bits - 1
        # scales representable in the storage dtype, so decoding is exact
        scales = (torch.rand(o, n_groups, generator=g) + 0.01).to(tdt).float()
        if sym:
            zeros = torch.full((o, n_groups), float(2 ** (bits - 1)))
        else:
            zeros = torch.randint(0, maxq + 1, (o, n_groups), generator=g).float()
        codes = torch.randint(0, maxq + 1, (o, i), generator=g, dtype=torch.uint8)
        if kind == "int-2:4":
            keep = _random_24_keep(o, i, g)
            zero_codes = zeros.repeat_interleave(i if gs == -1 else gs, dim=1).to(torch.uint8)
            codes = torch.where(keep, codes, zero_codes)  # pruned weights hold the zero point
        quant = QuantState(codes, scales, zeros, bits=bits, group_size=gs, symmetric=sym)
        weight = dequantize_weight(codes, scales, zeros, gs)
        fmt = ModuleFormat(kind, i, o, bits=bits, group_size=gs, symmetric=sym, dtype=dt)
    elif kind == "fp8":
        w8, scale = fp8_weight(torch.randn(o, i, generator=g))
        quant = QuantState(
            w8.view(torch.uint8),
            scale,
            torch.zeros_like(scale),
            bits=8,
            group_size=-1,
            symmetric=True,
            kind="fp8",
        )
        weight = quant.dequantize()
        fmt = ModuleFormat(kind, i, o, dtype=dt)
    else:
        values = (torch.randn(o, i, generator=g) + 3.0).to(tdt).float()  # nonzero, exact in tdt
        if kind == "2:4":
            keep = _random_24_keep(o, i, g)
        else:
            keep = torch.rand(o, i, generator=g) < torch.rand(1, generator=g)
        weight = values * keep
        nnz = int(keep.sum()) if kind == "bitmask" else None
        fmt = ModuleFormat(kind, i, o, dtype=dt, nnz=nnz)

    tensors = pack_module(fmt, weight, LayerResult(mask=keep, quant=quant))
    shapes = fmt.tensor_shapes()
    assert set(tensors) == set(shapes)
    for k, t in tensors.items():
        assert (tuple(t.shape), t.dtype) == shapes[k], k
    assert torch.equal(unpack_module(fmt, tensors, torch.float32), weight)
    assert torch.equal(unpack_module(fmt, tensors, tdt), weight.to(tdt))
    # the config entry round-trips and the runtime layer takes exactly these tensors
    fmt2 = ModuleFormat.from_dict(json.loads(json.dumps(fmt.to_dict())))
    assert fmt2 == fmt
    rt = LlmpressLinear(fmt2)
    rt.load_state_dict(tensors, strict=True)
    rt.set_kernel("torch")  # the exact reference (the fast CPU kernel takes bf16 activations)
    x = torch.randn(3, i, generator=g)
    assert torch.allclose(rt(x), x @ weight.t(), rtol=1e-5, atol=1e-4)


def test_int_codes_are_a_little_endian_bitstream() -> None:
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]], dtype=torch.uint8)
    q = QuantState(codes, torch.ones(1, 1), torch.full((1, 1), 8.0), bits=4, group_size=-1, symmetric=True)
    t = pack_module(
        ModuleFormat("int", 8, 1, bits=4, group_size=-1, symmetric=True), codes.float(), LayerResult(quant=q)
    )
    assert t["weight"].item() == 0x87654321 - (1 << 32)
    assert set(t) == {"weight", "weight_scale"}  # symmetric: no zero point stored


def test_choose_format() -> None:
    q = {"codes": None}
    keep24 = _random_24_keep(4, 16, torch.Generator().manual_seed(0))
    half = torch.rand(4, 16, generator=torch.Generator().manual_seed(1)) < 0.5
    assert choose_format(q, None, "auto") == "int"
    assert choose_format(q, keep24, "auto") == "int-2:4"
    assert choose_format(q, keep24, "dense") == "int"
    assert choose_format(q, half, "auto") == "int"
    assert choose_format(None, keep24, "auto") == "2:4"
    assert choose_format(None, keep24, "bitmask") == "bitmask"
    assert choose_format(None, half, "auto") == "bitmask"
    assert choose_format(None, half, "dense") is None
    assert choose_format(None, None, "auto") is None
    assert choose_format(None, torch.ones(4, 16, dtype=torch.bool), "auto") is None  # not worth it
    with pytest.raises(CheckpointError, match="not 2:4"):
        choose_format(None, half, "2:4")


def test_module_format_validation() -> None:
    with pytest.raises(ValidationError, match="unknown format 'int4'"):
        ModuleFormat("int4", 64, 64, bits=4, group_size=32)
    with pytest.raises(ValidationError, match="needs bits and group_size"):
        ModuleFormat("int", 64, 64)
    with pytest.raises(ValidationError, match="dtype"):
        ModuleFormat("2:4", 64, 64, dtype="float8")
    with pytest.raises(ValidationError, match="group_size 48 does not divide in_features 64"):
        ModuleFormat("int", 64, 64, bits=4, group_size=48)  # the schema's rules, also in memory
    with pytest.raises(CheckpointError, match="entry for m.fc: nnz"):
        ModuleFormat.from_dict({"format": "bitmask", "in_features": 4, "out_features": 4, "nnz": -1}, "m.fc")
    with pytest.raises(CheckpointError, match="bad quantization_config entry for m.q_proj"):
        ModuleFormat.from_dict(
            {"format": "int", "in_features": 64, "out_features": 64, "colour": 1}, "m.q_proj"
        )


# ------------------------------------------------------------------------------ save -> load

INT4 = {"stages": [{"method": "gptq", "bits": 4, "group_size": 32}]}


def _roundtrip(model: torch.nn.Module, recipe: dict, out: Path, sparse: str = "auto") -> dict:
    """compress -> save_quantized -> from_pretrained: same logits and tensors, bit for bit."""
    model, rep = llmpress.compress(model, recipe, calib_ids(), progress=False)
    before = {n: weight_of(model.get_submodule(n)).clone() for n in rep.modules}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    save_quantized(model, out, report=rep, sparse=sparse)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items()), "saving changed the model"
    assert set(model.state_dict()) == set(state)
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert type(loaded) is type(model)
    to_runtime(model, sparse, result=rep)  # what loading gives: packed layers, fp16 tensors
    assert torch.equal(logits(loaded), logits(model))
    assert_same_state(model, loaded)
    return {"model": model, "report": rep, "loaded": loaded, "before": before}


def _formats(model: torch.nn.Module) -> set[str]:
    return {m["format"] for m in model.config.quantization_config.modules.values()}


def _check_quantized_layers(r: dict) -> None:
    """Every quantized layer loads as a packed layer decoding to the in-memory codes (fp16 scales)."""
    for name, q in quantized(r["report"]).items():
        mod = r["loaded"].get_submodule(name)
        assert isinstance(mod, LlmpressLinear), name
        expect = dequantize_weight(q.codes, q.scales.half().float(), q.zeros, q.group_size)
        assert torch.equal(weight_of(mod), expect), name
        assert torch.allclose(weight_of(mod), r["before"][name], rtol=2e-3, atol=1e-6), name


@pytest.mark.parametrize("arch", list(ARCHS))
def test_int4_roundtrip_on_architectures(arch: str, tmp_path: Path) -> None:
    r = _roundtrip(ARCHS[arch](), INT4, tmp_path / arch)
    assert _formats(r["loaded"]) == {"int"}
    assert len(quantized(r["report"])) == (12 if arch == "opt" else 8 if arch == "gpt2" else 14)
    _check_quantized_layers(r)
    # only block linears are packed: embeddings and the LM head stay ordinary modules
    assert not isinstance(r["loaded"].get_output_embeddings(), LlmpressLinear)


@pytest.mark.parametrize("sym", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_int_roundtrip_bits_groups(method: str, bits: int, sym: bool, tmp_path: Path) -> None:
    gs = 32 if (bits + sym) % 2 else -1  # both group sizes for every bit width across sym/asym
    recipe = {"stages": [{"method": method, "bits": bits, "group_size": gs, "symmetric": sym}]}
    r = _roundtrip(tiny_llama(), recipe, tmp_path / "m")
    assert _formats(r["loaded"]) == {"int"}
    _check_quantized_layers(r)
    mod = r["loaded"].get_submodule("model.layers.0.mlp.down_proj")  # [64, 128]
    n_groups = 1 if gs == -1 else 128 // gs
    assert mod.weight.shape == (64, math.ceil(128 * bits / 32)) and mod.weight.dtype == torch.int32
    assert mod.weight_scale.shape == (64, n_groups) and mod.weight_scale.dtype == torch.float16
    assert hasattr(mod, "weight_zero") != sym
    assert f"bits={bits}, group_size={gs}, symmetric={sym}" in repr(mod)


SPARSE_CASES = {
    # name: (factory, recipe, sparse, expected format)
    "llama-int-2:4": (
        tiny_llama,
        {"stages": [{"method": "sparsegpt", "pattern": "2:4"}, INT4["stages"][0]]},
        "auto",
        "int-2:4",
    ),
    "gpt2-int-2:4": (
        tiny_gpt2,
        {"stages": [{"method": "wanda", "pattern": "2:4"}, {"method": "rtn", "bits": 4, "group_size": 32}]},
        "auto",
        "int-2:4",
    ),
    "llama-2:4": (tiny_llama, {"method": "wanda", "pattern": "2:4"}, "auto", "2:4"),
    "gpt2-2:4": (tiny_gpt2, {"method": "sparsegpt", "pattern": "2:4"}, "2:4", "2:4"),
    "llama-bitmask": (tiny_llama, {"method": "wanda", "sparsity": 0.5}, "bitmask", "bitmask"),
    "opt-bitmask": (tiny_opt, {"method": "magnitude", "sparsity": 0.5}, "auto", "bitmask"),
    "gpt2-bitmask": (tiny_gpt2, {"method": "wanda", "sparsity": 0.5, "pattern": "2:4"}, "bitmask", "bitmask"),
}


@pytest.mark.parametrize("case", list(SPARSE_CASES))
def test_sparse_formats_roundtrip(case: str, tmp_path: Path) -> None:
    factory, recipe, sparse, expected = SPARSE_CASES[case]
    r = _roundtrip(factory(), recipe, tmp_path / "m", sparse=sparse)
    assert _formats(r["loaded"]) == {expected}
    for name, w in r["before"].items():
        mod = r["loaded"].get_submodule(name)
        assert isinstance(mod, LlmpressLinear) and mod.fmt.format == expected
        wl = weight_of(mod)
        assert torch.equal(wl == 0, w == 0), name
        if expected in ("2:4", "int-2:4"):
            assert is_nm_sparse(wl, 2, 4)
        if not expected.startswith("int"):  # values are stored as fp16
            assert torch.equal(wl, w.half().float()), name
    if expected.startswith("int"):
        _check_quantized_layers(r)


def test_pruned_only_dense_is_an_ordinary_checkpoint(tmp_path: Path) -> None:
    model, rep = llmpress.compress(
        tiny_llama(), {"method": "wanda", "sparsity": 0.5}, calib_ids(), progress=False
    )
    save_quantized(model, tmp_path / "m", report=rep, sparse="dense")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert "quantization_config" not in cfg
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    to_runtime(model, "dense", result=rep)
    assert torch.equal(logits(loaded), logits(model))


@pytest.fixture(scope="module")
def saved_formats(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("formats")
    out = {}
    for fmt, recipe, sparse in [
        ("int", {"method": "rtn", "bits": 4, "group_size": 32}, "auto"),
        (
            "int-2:4",
            {
                "stages": [
                    {"method": "wanda", "pattern": "2:4"},
                    {"method": "rtn", "bits": 3, "group_size": -1},
                ]
            },
            "auto",
        ),
        ("2:4", {"method": "wanda", "pattern": "2:4"}, "auto"),
        ("bitmask", {"method": "wanda", "sparsity": 0.5}, "bitmask"),
    ]:
        model, rep = llmpress.compress(tiny_llama(), recipe, calib_ids(), progress=False)
        out[fmt] = save_quantized(model, base / fmt.replace(":", ""), report=rep, sparse=sparse)
    return out


@pytest.mark.parametrize("fmt", ["int", "int-2:4", "2:4", "bitmask"])
def test_save_pretrained_of_loaded_model_roundtrips(saved_formats: dict, fmt: str, tmp_path: Path) -> None:
    first = AutoModelForCausalLM.from_pretrained(saved_formats[fmt])
    first.save_pretrained(tmp_path / "again")
    cfg = json.loads((tmp_path / "again" / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "llmpress" and {m["format"] for m in cfg["modules"].values()} == {fmt}
    second = AutoModelForCausalLM.from_pretrained(tmp_path / "again")
    assert_same_state(first, second)
    assert torch.equal(logits(first), logits(second))


def test_saved_folder_contents(saved_formats: dict) -> None:
    d = saved_formats["int"]
    names = {p.name for p in d.iterdir()}
    assert {"config.json", "model.safetensors", "llmpress_report.json", "llmpress_recipe.json"} <= names
    cfg = json.loads((d / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "llmpress" and cfg["format_version"] == FORMAT_VERSION
    assert [{k: s.get(k) for k in ("method", "bits", "group_size")} for s in cfg["recipe"]["stages"]] == [
        {"method": "rtn", "bits": 4, "group_size": 32}
    ]
    assert len(cfg["modules"]) == 14
    assert cfg["modules"]["model.layers.1.mlp.down_proj"] == {
        "format": "int",
        "in_features": 128,
        "out_features": 64,
        "bits": 4,
        "group_size": 32,
        "symmetric": False,
        "storage_dtype": "float16",
    }


# ------------------------------------------------------------------------------ on-disk size


def _layer_shapes(model: torch.nn.Module, names: list[str]) -> list[tuple[int, int]]:
    return [tuple(weight_of(model.get_submodule(n)).shape) for n in names]


@pytest.mark.parametrize(
    ("bits", "gs", "sym"), [(4, 32, False), (4, -1, True), (2, 32, True), (8, 64, False)]
)
def test_quantized_file_size(bits: int, gs: int, sym: bool, tmp_path: Path) -> None:
    """Quantized layers take about bits/16 of their fp16 size, plus the scales (and zero points)."""
    tiny_llama().half().save_pretrained(tmp_path / "dense")
    model, rep = llmpress.compress(
        tiny_llama(),
        {"method": "rtn", "bits": bits, "group_size": gs, "symmetric": sym},
        None,
        progress=False,
    )
    shapes = _layer_shapes(model, list(quantized(rep)))
    save_quantized(model, tmp_path / "q", report=rep)
    dense = safetensors_data_bytes(tmp_path / "dense" / "model.safetensors")
    quant = safetensors_data_bytes(tmp_path / "q" / "model.safetensors")
    fp16_layers = sum(2 * o * i for o, i in shapes)
    q_layers = quant - (dense - fp16_layers)  # everything else is stored the same way
    overhead = sum(o * (1 if gs == -1 else i // gs) * (2 if sym else 3) for o, i in shapes)  # scale (+ zero)
    assert q_layers >= fp16_layers * bits / 16
    assert q_layers <= fp16_layers * bits / 16 * 1.05 + overhead * 1.05 + 64 * len(shapes)
    assert (tmp_path / "q" / "model.safetensors").stat().st_size < (
        tmp_path / "dense" / "model.safetensors"
    ).stat().st_size


def test_bitmask_file_is_smaller_than_dense(tmp_path: Path) -> None:
    model, rep = llmpress.compress(
        tiny_llama(), {"method": "wanda", "sparsity": 0.5}, calib_ids(), progress=False
    )
    save_compressed(model, tmp_path / "dense", report=rep, dtype=torch.float16)
    shapes = _layer_shapes(model, list(rep.modules))
    save_quantized(model, tmp_path / "bm", report=rep, sparse="bitmask")
    dense_file = tmp_path / "dense" / "model.safetensors"
    bm_file = tmp_path / "bm" / "model.safetensors"
    assert bm_file.stat().st_size < dense_file.stat().st_size
    fp16_layers = sum(2 * o * i for o, i in shapes)
    bm_layers = safetensors_data_bytes(bm_file) - (safetensors_data_bytes(dense_file) - fp16_layers)
    # 50 % of the values (fp16) + one bit per weight
    assert bm_layers == sum(o * i + o * math.ceil(i / 8) for o, i in shapes)


# ------------------------------------------------------------------------------ CLI

RECIPE_GPTQ = """\
stages:
  - method: gptq
    bits: 4
    group_size: 128
"""
RECIPE_24_GPTQ = """\
stages:
  - method: sparsegpt
    sparsity: 0.5
    pattern: "2:4"
  - method: gptq
    bits: 4
    group_size: 128
"""


@pytest.fixture(scope="module")
def cli_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A model folder with a tokenizer (hidden 128, intermediate 256: group 128 tiles every
    layer), and calibration / evaluation text files."""
    base = tmp_path_factory.mktemp("cli")
    model = tiny_llama(seed=1, hidden=128, intermediate=256)
    save_model_dir(base / "model", model, make_tokenizer())
    (base / "calib.txt").write_text(make_text(2000, seed=10))
    (base / "eval.txt").write_text(make_text(600, seed=11))
    return {"base": base, "model": base / "model", "calib": base / "calib.txt", "eval": base / "eval.txt"}


def _cli_compress(env: dict, recipe_text: str, name: str, *extra: str) -> Path:
    recipe = env["base"] / f"{name}.yaml"
    recipe.write_text(recipe_text)
    out = env["base"] / name
    rc = main(
        [
            "compress",
            str(env["model"]),
            "--recipe",
            str(recipe),
            "--calib",
            str(env["calib"]),
            "--out",
            str(out),
            "--nsamples",
            "4",
            "--seqlen",
            "32",
            *extra,
        ]
    )
    assert rc == 0
    return out


def _cli_eval(env: dict, out: Path, capsys: pytest.CaptureFixture) -> dict:
    capsys.readouterr()
    assert main(["eval", str(out), "--text", str(env["eval"]), "--seqlen", "32", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert isinstance(res["perplexity"], float) and math.isfinite(res["perplexity"]) and res["perplexity"] > 1
    return res


@pytest.mark.parametrize(
    ("recipe", "fmt"), [(RECIPE_GPTQ, "int"), (RECIPE_24_GPTQ, "int-2:4")], ids=["gptq", "2:4+gptq"]
)
def test_cli_compress_and_eval(cli_env: dict, recipe: str, fmt: str, capsys: pytest.CaptureFixture) -> None:
    assert yaml.safe_load(recipe)["stages"][-1] == {"method": "gptq", "bits": 4, "group_size": 128}
    out = _cli_compress(cli_env, recipe, fmt.replace(":", ""))
    assert "compressed 14 layers" in capsys.readouterr().out
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert {m["format"] for m in cfg["modules"].values()} == {fmt}
    assert {m["group_size"] for m in cfg["modules"].values()} == {128}
    assert (out / "tokenizer.json").is_file()
    res = _cli_eval(cli_env, out, capsys)
    assert res["windows"] >= 1
    model = AutoModelForCausalLM.from_pretrained(out)
    for name in cfg["modules"]:
        w = weight_of(model.get_submodule(name))
        if fmt == "int-2:4":
            assert is_nm_sparse(w, 2, 4) and float((w == 0).float().mean()) >= 0.5


def test_cli_sparse_format_bitmask(cli_env: dict, capsys: pytest.CaptureFixture) -> None:
    out = _cli_compress(
        cli_env, "stages:\n  - method: wanda\n    sparsity: 0.5\n", "bitmask", "--sparse-format", "bitmask"
    )
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert {m["format"] for m in cfg["modules"].values()} == {"bitmask"}
    _cli_eval(cli_env, out, capsys)


def test_cli_bad_group_size_names_the_module(cli_env: dict, capsys: pytest.CaptureFixture) -> None:
    recipe = cli_env["base"] / "bad.yaml"
    recipe.write_text("stages:\n  - method: gptq\n    bits: 4\n    group_size: 96\n")
    out = cli_env["base"] / "bad"
    rc = main(
        [
            "compress",
            str(cli_env["model"]),
            "--recipe",
            str(recipe),
            "--calib",
            str(cli_env["calib"]),
            "--out",
            str(out),
            "--nsamples",
            "4",
            "--seqlen",
            "32",
        ]
    )
    assert rc == 2
    err = capsys.readouterr().err
    assert "model.layers.0.self_attn.q_proj" in err and "group_size=96" in err
    assert not out.exists()


@pytest.mark.parametrize("bits", ["1", "9", "four"])
def test_cli_bad_bits(cli_env: dict, bits: str, capsys: pytest.CaptureFixture) -> None:
    recipe = cli_env["base"] / f"bits{bits}.yaml"
    recipe.write_text(f"stages:\n  - method: rtn\n    bits: {bits}\n")
    out = cli_env["base"] / f"bits{bits}"
    rc = main(["compress", str(cli_env["model"]), "--recipe", str(recipe), "--out", str(out)])
    assert rc == 2
    assert "bits must be an integer from 2 to 8" in capsys.readouterr().err
    assert not out.exists()


# ------------------------------------------------------------------------------ dtypes, shards


def test_bfloat16_checkpoint_roundtrips(tmp_path: Path) -> None:
    model, rep = llmpress.compress(
        tiny_llama(), {"method": "rtn", "bits": 4, "group_size": 32}, None, progress=False
    )
    save_quantized(model, tmp_path / "bf16", report=rep, dtype=torch.bfloat16)
    cfg = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert {m["storage_dtype"] for m in cfg["quantization_config"]["modules"].values()} == {"bfloat16"}
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16")
    assert loaded.dtype == torch.bfloat16
    assert loaded.get_submodule("model.layers.0.mlp.up_proj").weight_scale.dtype == torch.bfloat16
    to_runtime(model, dtype=torch.bfloat16, result=rep)
    assert torch.equal(logits(loaded), logits(model))
    assert_same_state(loaded, model)


def test_loading_in_another_compute_dtype(saved_formats: dict) -> None:
    ref = logits(AutoModelForCausalLM.from_pretrained(saved_formats["int"])).float()
    for dt, tol in ((torch.float32, 5e-3), (torch.bfloat16, 5e-2)):
        m = AutoModelForCausalLM.from_pretrained(saved_formats["int"], dtype=dt)
        out = logits(m)
        assert out.dtype == dt and torch.allclose(out.float(), ref, atol=tol)


def test_sharded_resave_roundtrips_and_checks_every_shard(saved_formats: dict, tmp_path: Path) -> None:
    first = AutoModelForCausalLM.from_pretrained(saved_formats["int-2:4"])
    first.save_pretrained(tmp_path / "sh", max_shard_size="40KB")
    shards = sorted((tmp_path / "sh").glob("model-*.safetensors"))
    assert len(shards) >= 2 and (tmp_path / "sh" / "model.safetensors.index.json").is_file()
    second = AutoModelForCausalLM.from_pretrained(tmp_path / "sh")
    assert_same_state(first, second)
    assert torch.equal(logits(first), logits(second))
    last = shards[-1]
    last.write_bytes(last.read_bytes()[:-100])  # truncate the last shard only
    with pytest.raises(CheckpointError, match="truncated") as ei:
        AutoModelForCausalLM.from_pretrained(tmp_path / "sh")
    assert str(last) in str(ei.value)


def test_saving_twice_and_saving_a_runtime_model_give_the_same_checkpoint(tmp_path: Path) -> None:
    """Saving never changes the model: a second save gives the same checkpoint, and so does
    saving the model after :func:`to_runtime` packed it in place (it is already packed)."""
    model, rep = llmpress.compress(
        tiny_llama(), {"method": "rtn", "bits": 4, "group_size": 32}, None, progress=False
    )
    save_quantized(model, tmp_path / "a", report=rep)
    save_quantized(model, tmp_path / "b", report=rep)
    to_runtime(model, result=rep)
    save_quantized(model, tmp_path / "c", report=rep)
    first = AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    for again in ("b", "c"):
        second = AutoModelForCausalLM.from_pretrained(tmp_path / again)
        assert_same_state(first, second)
        assert torch.equal(logits(second), logits(model))


def test_module_entries_of_version_2_checkpoints_round_trip_unchanged() -> None:
    """One model, in memory and on disk: every entry a format-2 checkpoint holds comes back
    from :class:`ModuleFormat` exactly as stored (same keys, same values)."""
    root = Path(__file__).parent / "data" / "format_v2"
    entries = [
        e
        for cfg in sorted(root.glob("*/config.json"))
        for e in json.loads(cfg.read_text())["quantization_config"]["modules"].values()
    ]
    assert len({e["format"] for e in entries}) >= 5  # int, int-2:4, bitmask, dense, dropped, fp8...
    for e in entries:
        assert ModuleFormat.from_dict(e).to_dict() == e
