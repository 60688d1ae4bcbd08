"""compressed-tensors export: symmetric int4/int8 pack-quantized checkpoints that transformers
(with the ``compressed-tensors`` package) loads natively, with the same outputs as llmpress."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _quant_models import (
    ARCHS,
    calib_ids,
    logits,
    make_text,
    make_tokenizer,
    quantized,
    save_model_dir,
    tiny_gpt2,
    tiny_llama,
)
from models import is_nm_sparse
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import llmpress
from llmpress.cli.main import main
from llmpress.errors import LlmpressError
from llmpress.format.compressed_tensors import compressed_tensors_config, save_compressed_tensors
from llmpress.format.loading import load_model
from llmpress.format.runtime import select_kernels
from llmpress.format.save import save_quantized, save_result
from llmpress.quant.packing import unpack_int32

pytest.importorskip("compressed_tensors")

CASES = {
    "int4-g32": {"method": "gptq", "bits": 4, "group_size": 32, "symmetric": True},
    "int8-channel": {"method": "gptq", "bits": 8, "group_size": -1, "symmetric": True},
}


def _export(model: torch.nn.Module, stages: list[dict], out: Path) -> tuple[torch.nn.Module, object]:
    model, rep = llmpress.compress(model, {"stages": stages}, calib_ids(), progress=False)
    save_compressed_tensors(model, out, report=rep, dtype=torch.float32)
    return model, rep


@pytest.mark.parametrize("case", list(CASES))
def test_transformers_loads_the_export(case: str, tmp_path: Path) -> None:
    stage = CASES[case]
    model, rep = _export(tiny_llama(), [stage], tmp_path / "ct")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32)
    assert torch.allclose(logits(loaded), logits(model), atol=1e-4)

    cfg = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "compressed-tensors" and cfg["format"] == "pack-quantized"
    (group,) = cfg["config_groups"].values()
    assert sorted(group["targets"]) == sorted(quantized(rep))
    w = group["weights"]
    assert (w["num_bits"], w["symmetric"], w["type"]) == (stage["bits"], True, "int")
    if stage["group_size"] == -1:
        assert w["strategy"] == "channel" and w["group_size"] is None
    else:
        assert w["strategy"] == "group" and w["group_size"] == stage["group_size"]

    bits = stage["bits"]
    with safe_open(str(tmp_path / "ct" / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        for name, q in quantized(rep).items():
            out_f, in_f = q.codes.shape
            assert {f"{name}.weight_packed", f"{name}.weight_scale", f"{name}.weight_shape"} <= keys
            assert f"{name}.weight" not in keys
            packed = f.get_tensor(f"{name}.weight_packed")
            assert packed.dtype == torch.int32 and packed.shape == (out_f, in_f * bits // 32)
            # llmpress's codes, stored as a little-endian bitstream (signed q + 2**(bits-1))
            assert torch.equal(unpack_int32(packed, bits, in_f), q.codes)
            assert torch.equal(f.get_tensor(f"{name}.weight_scale"), q.scales)
            assert f.get_tensor(f"{name}.weight_shape").tolist() == [out_f, in_f]
    assert (tmp_path / "ct" / "llmpress_report.json").is_file()


@pytest.mark.parametrize("arch", ["opt", "qwen2"])
def test_other_architectures(arch: str, tmp_path: Path) -> None:
    """Linear layers with biases (OPT, Qwen2's q/k/v)."""
    model, _ = _export(ARCHS[arch](), [CASES["int4-g32"]], tmp_path / "ct")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32)
    assert torch.allclose(logits(loaded), logits(model), atol=1e-4)


def test_mixed_grids_get_one_config_group_each(tmp_path: Path) -> None:
    stages = [
        {"method": "rtn", "bits": 4, "group_size": 32, "symmetric": True, "targets": ["self_attn"]},
        {"method": "rtn", "bits": 8, "group_size": -1, "symmetric": True, "targets": ["mlp"]},
    ]
    model, rep = _export(tiny_llama(), stages, tmp_path / "ct")
    groups = compressed_tensors_config(quantized(rep))["config_groups"]
    assert len(groups) == 2
    assert sorted(t for g in groups.values() for t in g["targets"]) == sorted(quantized(rep))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32)
    assert torch.allclose(logits(loaded), logits(model), atol=1e-4)


def test_gpt2_conv1d_export_loads_or_is_refused(tmp_path: Path) -> None:
    """GPT-2's block layers are ``Conv1D`` (weight ``[in, out]``), which transformers'
    compressed-tensors support does not replace: an export must either load with the same
    outputs or be refused with an LlmpressError naming the layer (and write nothing).

    BUG (fails today): the export succeeds, ``weight_shape`` is written as ``[in, out]``, and
    ``from_pretrained`` reports the packed tensors UNEXPECTED and the Conv1D weights MISSING,
    i.e. it silently returns a model with *randomly initialized* block weights."""
    model, rep = llmpress.compress(tiny_gpt2(), {"stages": [CASES["int4-g32"]]}, calib_ids(), progress=False)
    try:
        save_compressed_tensors(model, tmp_path / "ct", report=rep, dtype=torch.float32)
    except LlmpressError as e:
        assert "transformer.h.0.attn.c_attn" in str(e)
        assert not (tmp_path / "ct").exists()
        return
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32)
    assert torch.allclose(logits(loaded), logits(model), atol=1e-4)


def test_joint_24_sparse_export_keeps_zeros(tmp_path: Path) -> None:
    stages = [{"method": "sparsegpt", "pattern": "2:4"}, CASES["int4-g32"]]
    model, rep = _export(tiny_llama(), stages, tmp_path / "ct")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32)
    assert torch.allclose(logits(loaded), logits(model), atol=1e-4)
    with safe_open(str(tmp_path / "ct" / "model.safetensors"), framework="pt") as f:
        for name, q in quantized(rep).items():
            in_f = q.codes.shape[1]
            codes = unpack_int32(f.get_tensor(f"{name}.weight_packed"), 4, in_f)
            # the symmetric zero point 8 decodes to 0: at most 2 other codes in every 4
            assert is_nm_sparse((codes != 8).float(), 2, 4), name


def test_asymmetric_is_a_clear_error(tmp_path: Path) -> None:
    model, rep = llmpress.compress(
        tiny_llama(), {"method": "rtn", "bits": 4, "group_size": 32}, None, progress=False
    )
    with pytest.raises(LlmpressError, match=r"asymmetric grid.*symmetric: true") as ei:
        save_compressed_tensors(model, tmp_path / "ct", report=rep)
    assert "model.layers.0.self_attn.q_proj" in str(ei.value)
    assert not (tmp_path / "ct").exists()


def test_unsupported_bits_is_a_clear_error(tmp_path: Path) -> None:
    model, rep = llmpress.compress(
        tiny_llama(), {"method": "rtn", "bits": 3, "group_size": 32, "symmetric": True}, None, progress=False
    )
    with pytest.raises(LlmpressError, match=r"supports 4 and 8 bits.*has 3"):
        save_compressed_tensors(model, tmp_path / "ct", report=rep)
    assert not (tmp_path / "ct").exists()


def test_pruned_only_model_is_a_clear_error(tmp_path: Path) -> None:
    model, rep = llmpress.compress(
        tiny_llama(), {"method": "magnitude", "sparsity": 0.5}, None, progress=False
    )
    with pytest.raises(LlmpressError, match="needs a quantized model"):
        save_compressed_tensors(model, tmp_path / "ct", report=rep)


def test_save_result_dispatch(tmp_path: Path) -> None:
    model, rep = llmpress.compress(tiny_llama(), CASES["int8-channel"], calib_ids(), progress=False)
    with pytest.raises(ValueError, match="unknown format 'gguf'"):
        save_result(model, tmp_path / "x", report=rep, fmt="gguf")
    save_result(model, tmp_path / "ct", report=rep, fmt="compressed-tensors")
    cfg = json.loads((tmp_path / "ct" / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "compressed-tensors"


def test_cli_format_compressed_tensors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = save_model_dir(tmp_path / "model", tiny_llama(), make_tokenizer())
    (tmp_path / "calib.txt").write_text(make_text(1500, seed=3))
    recipe = tmp_path / "r.yaml"
    recipe.write_text("stages:\n  - method: gptq\n    bits: 4\n    group_size: 32\n    symmetric: true\n")
    out = tmp_path / "ct"
    rc = main(
        [
            "compress",
            str(src),
            "--recipe",
            str(recipe),
            "--calib",
            str(tmp_path / "calib.txt"),
            "--out",
            str(out),
            "--nsamples",
            "4",
            "--seqlen",
            "32",
            "--format",
            "compressed-tensors",
        ]
    )
    assert rc == 0
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "compressed-tensors"
    assert (out / "tokenizer.json").is_file()
    # the same compression in-process (same text, windows and seed) gives the same model
    ref, tok = load_model(src)
    ref, _ = llmpress.compress(
        ref,
        {"stages": [CASES["int4-g32"]]},
        tmp_path / "calib.txt",
        tokenizer=tok,
        nsamples=4,
        seqlen=32,
        progress=False,
    )
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    # the CLI stores scales and the other weights in fp16
    assert torch.allclose(logits(loaded), logits(ref), atol=2e-2)

    # asymmetric through the CLI: exit code 2 and the reason, nothing written
    recipe.write_text("stages:\n  - method: rtn\n    bits: 4\n    group_size: 32\n")
    capsys.readouterr()
    rc = main(
        [
            "compress",
            str(src),
            "--recipe",
            str(recipe),
            "--out",
            str(tmp_path / "asym"),
            "--format",
            "compressed-tensors",
        ]
    )
    assert rc == 2
    assert "needs symmetric grids" in capsys.readouterr().err
    assert not (tmp_path / "asym").exists()


def test_save_result_passes_dtype_to_the_export(tmp_path: Path) -> None:
    """``save_result(..., fmt="compressed-tensors", dtype=...)`` (used by the CLI with the
    checkpoint's dtype, and by ``LlmpressQuantizer.quantize(dtype=...)``) must store that dtype.

    BUG (fails today): ``save_result`` drops ``dtype`` for compressed-tensors, so the export is
    always fp16 (a bf16 checkpoint is silently narrowed to fp16)."""
    model, rep = llmpress.compress(tiny_llama(), CASES["int8-channel"], calib_ids(), progress=False)
    save_result(model, tmp_path / "ct", report=rep, fmt="compressed-tensors", dtype=torch.bfloat16)
    with safe_open(str(tmp_path / "ct" / "model.safetensors"), framework="pt") as f:
        assert f.get_tensor("model.layers.0.self_attn.q_proj.weight_scale").dtype == torch.bfloat16
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
    assert json.loads((tmp_path / "ct" / "config.json").read_text())["dtype"] == "bfloat16"


def test_export_after_save_quantized(tmp_path: Path) -> None:
    """After ``save_quantized`` (which packs the layers in place) a compressed-tensors export of
    the same model must still work, or fail with a clear LlmpressError.

    BUG (fails today): it reads the packed int32 ``weight`` as the dense weight and fails inside
    the compressed-tensors package (``ValueError: tensor column shape must be divisble by the
    given group_size 32 but got 8``)."""
    model, rep = llmpress.compress(tiny_llama(), CASES["int4-g32"], calib_ids(), progress=False)
    save_quantized(model, tmp_path / "packed", report=rep)
    try:
        save_compressed_tensors(model, tmp_path / "ct", report=rep, dtype=torch.float32)
    except LlmpressError:
        assert not (tmp_path / "ct").exists()
        return
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "packed", dtype=torch.float32)
    select_kernels(ref, "dense")  # fp32-exact decoding (the CPU default computes in bf16)
    assert torch.allclose(logits(loaded), logits(ref), atol=1e-3)
