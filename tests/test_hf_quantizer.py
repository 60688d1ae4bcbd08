"""transformers integration: ``import llmpress`` makes ``from_pretrained`` load packed checkpoints;
without llmpress loading fails loudly; damaged or mismatched checkpoints give a CheckpointError
naming the file or module."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from _quant_models import assert_same_state, logits, tiny_llama
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.quantizers import auto as hf_auto

import llmpress
from llmpress.errors import CheckpointError
from llmpress.format.formats import FORMAT_VERSION
from llmpress.format.hf_quantizer import LlmpressConfig, LlmpressHfQuantizer, register, verify_safetensors
from llmpress.format.runtime import LlmpressLinear, select_kernels
from llmpress.format.save import save_quantized, to_runtime
from llmpress.kernels import cpu_int

Q_PROJ = "model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny Llama quantized with RTN 4-bit g32 (no calibration) and saved."""
    model, rep = llmpress.compress(
        tiny_llama(), {"method": "rtn", "bits": 4, "group_size": 32}, None, progress=False
    )
    d = save_quantized(model, tmp_path_factory.mktemp("hfq") / "rtn4", report=rep)
    to_runtime(model, result=rep)  # what loading gives
    return {"dir": d, "model": model, "logits": logits(model)}


def _copy(saved: dict, tmp_path: Path) -> Path:
    d = tmp_path / "copy"
    shutil.copytree(saved["dir"], d)
    return d


def _edit_config(d: Path, edit: Callable[[dict], None]) -> None:
    cfg = json.loads((d / "config.json").read_text())
    edit(cfg["quantization_config"])
    (d / "config.json").write_text(json.dumps(cfg))


# ------------------------------------------------------------------------------ happy path


def test_import_registers_with_transformers() -> None:
    assert hf_auto.AUTO_QUANTIZATION_CONFIG_MAPPING["llmpress"] is LlmpressConfig
    assert hf_auto.AUTO_QUANTIZER_MAPPING["llmpress"] is LlmpressHfQuantizer
    register()  # idempotent
    register()
    assert hf_auto.AUTO_QUANTIZER_MAPPING["llmpress"] is LlmpressHfQuantizer


def test_from_pretrained_loads_packed_layers(saved: dict) -> None:
    loaded = AutoModelForCausalLM.from_pretrained(saved["dir"])
    assert torch.equal(logits(loaded), saved["logits"])
    assert_same_state(loaded, saved["model"])
    packed = [n for n, m in loaded.named_modules() if isinstance(m, LlmpressLinear)]
    assert len(packed) == 14 and Q_PROJ in packed
    assert isinstance(loaded.config.quantization_config, LlmpressConfig)
    assert loaded.get_submodule(Q_PROJ).weight.dtype == torch.int32


def test_config_json_roundtrip(saved: dict) -> None:
    cfg = AutoConfig.from_pretrained(saved["dir"]).quantization_config
    qc = cfg if isinstance(cfg, LlmpressConfig) else LlmpressConfig.from_dict(cfg)
    d = qc.to_dict()
    assert d["quant_method"] == "llmpress" and d["format_version"] == FORMAT_VERSION
    assert "import llmpress" in d["note"]
    again = LlmpressConfig.from_dict(json.loads(json.dumps(d)))
    assert again.to_dict() == d
    fmts = again.module_formats()
    assert fmts[Q_PROJ].bits == 4 and fmts[Q_PROJ].group_size == 32 and fmts[Q_PROJ].format == "int"


def test_kernel_is_chosen_once_at_load_and_can_be_overridden(
    saved: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    loaded = AutoModelForCausalLM.from_pretrained(saved["dir"])
    packed = [m for m in loaded.modules() if isinstance(m, LlmpressLinear)]
    default = "cpu-int" if cpu_int.available() else "dense"  # 4-bit, groups of 32, on CPU
    assert packed and all(m.kernel is not None and m.kernel.name == default for m in packed)
    assert select_kernels(loaded, "torch") and all(m.kernel.name == "torch" for m in packed)
    ref = logits(loaded)
    assert select_kernels(loaded, "dense") and all(m.kernel.name == "dense" for m in packed)
    assert torch.equal(logits(loaded), ref)
    monkeypatch.setenv("LLMPRESS_KERNEL", "no-such-kernel,dense")
    again = AutoModelForCausalLM.from_pretrained(saved["dir"])
    assert {m.kernel.name for m in again.modules() if isinstance(m, LlmpressLinear)} == {"dense"}
    assert torch.equal(logits(again), ref)


# ------------------------------------------------------------------------------ without llmpress


def test_without_llmpress_loading_fails_loudly(saved: dict) -> None:
    """Plain transformers does not know ``quant_method: llmpress``: it warns "Unknown quantization
    type, got llmpress ... we will skip the quantization", then refuses the packed tensors with a
    load report (``... MISMATCH | Reinit due to size mismatch - ckpt: torch.Size([64, 8]) vs
    model:torch.Size([64, 64])``) and ``RuntimeError: You set `ignore_mismatched_sizes` to
    `False`, thus raising an error``. It never silently returns random weights."""
    code = (
        "import sys\n"
        "from transformers import AutoModelForCausalLM\n"
        f"AutoModelForCausalLM.from_pretrained({str(saved['dir'])!r})\n"
        "assert 'llmpress' not in sys.modules\n"
        "print('LOADED')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert "LOADED" not in r.stdout
    assert "size mismatch" in r.stderr
    assert "ignore_mismatched_sizes" in r.stderr
    assert "MISMATCH" in r.stderr and "self_attn.q_proj.weight" in r.stderr


# ------------------------------------------------------------------------------ damaged files


def test_corrupt_header_names_the_file(saved: dict, tmp_path: Path) -> None:
    d = _copy(saved, tmp_path)
    f = d / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:40] = b"\xff" * 32  # garbage where the JSON header starts
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="not a valid safetensors file") as ei:
        AutoModelForCausalLM.from_pretrained(d)
    assert str(f) in str(ei.value)


def test_corrupt_header_length_names_the_file(saved: dict, tmp_path: Path) -> None:
    d = _copy(saved, tmp_path)
    f = d / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[0:8] = b"\xff" * 8  # header length larger than the file
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="not a valid safetensors file.*header") as ei:
        AutoModelForCausalLM.from_pretrained(d)
    assert str(f) in str(ei.value)


@pytest.mark.parametrize("keep", [0.5, 0.999, 4])
def test_truncated_file_names_the_file(saved: dict, tmp_path: Path, keep: float) -> None:
    d = _copy(saved, tmp_path)
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: int(len(data) * keep) if keep < 1 else int(keep)])
    with pytest.raises(CheckpointError) as ei:
        AutoModelForCausalLM.from_pretrained(d)
    assert str(f) in str(ei.value)
    assert "truncated" in str(ei.value) or "not a valid safetensors file" in str(ei.value)


def test_verify_safetensors_accepts_a_good_file_and_ignores_others(saved: dict, tmp_path: Path) -> None:
    verify_safetensors(saved["dir"] / "model.safetensors")
    verify_safetensors(saved["dir"] / "config.json")  # not a safetensors file: nothing to check


# ------------------------------------------------------------------------------ bad config.json


def test_unknown_module_names_the_module(saved: dict, tmp_path: Path) -> None:
    d = _copy(saved, tmp_path)
    ghost = "model.layers.7.mlp.up_proj"
    _edit_config(
        d, lambda q: q["modules"].__setitem__(ghost, dict(q["modules"]["model.layers.0.mlp.up_proj"]))
    )
    with pytest.raises(CheckpointError, match=r"names module 'model\.layers\.7\.mlp\.up_proj'") as ei:
        AutoModelForCausalLM.from_pretrained(d)
    assert "LlamaForCausalLM" in str(ei.value)


def test_wrong_module_shape_names_the_module(saved: dict, tmp_path: Path) -> None:
    d = _copy(saved, tmp_path)
    _edit_config(d, lambda q: q["modules"][Q_PROJ].__setitem__("in_features", 128))
    with pytest.raises(
        CheckpointError, match=r"module 'model\.layers\.0\.self_attn\.q_proj' has weight shape"
    ):
        AutoModelForCausalLM.from_pretrained(d)


def test_newer_format_version_says_upgrade(saved: dict, tmp_path: Path) -> None:
    d = _copy(saved, tmp_path)
    _edit_config(d, lambda q: q.__setitem__("format_version", 99))
    with pytest.raises(CheckpointError, match=r"format version 99, newer .*upgrade llmpress"):
        AutoModelForCausalLM.from_pretrained(d)


def test_unknown_module_format(saved: dict, tmp_path: Path) -> None:
    d = _copy(saved, tmp_path)
    _edit_config(d, lambda q: q["modules"][Q_PROJ].__setitem__("format", "int-3:8"))
    with pytest.raises(CheckpointError, match=r"unknown format 'int-3:8'"):
        AutoModelForCausalLM.from_pretrained(d)


def test_unknown_module_entry_key_names_the_module(saved: dict, tmp_path: Path) -> None:
    d = _copy(saved, tmp_path)
    _edit_config(d, lambda q: q["modules"][Q_PROJ].__setitem__("colour", "red"))
    with pytest.raises(
        CheckpointError,
        match=r"modules\.model\.layers\.0\.self_attn\.q_proj\.colour: Extra inputs are not permitted",
    ):
        AutoModelForCausalLM.from_pretrained(d)


def test_quantized_entry_without_bits(saved: dict, tmp_path: Path) -> None:
    d = _copy(saved, tmp_path)
    _edit_config(d, lambda q: q["modules"][Q_PROJ].pop("bits"))
    with pytest.raises(CheckpointError, match="needs bits and group_size"):
        AutoModelForCausalLM.from_pretrained(d)


def test_config_class_checks_directly() -> None:
    with pytest.raises(CheckpointError, match="upgrade llmpress"):
        LlmpressConfig(format_version=FORMAT_VERSION + 1)
    with pytest.raises(CheckpointError, match="unknown format 'fp4'"):
        LlmpressConfig(modules={"x": {"format": "fp4", "in_features": 4, "out_features": 4}})
    assert LlmpressConfig().to_dict()["modules"] == {}
