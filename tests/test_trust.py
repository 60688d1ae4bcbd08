"""Trust: damaged checkpoints, hostile configs and careless command lines give one clear error;
nothing loads silently wrong; output folders are claimed, atomic and tidy."""

from __future__ import annotations

import json
import os
import shutil
import stat
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _quant_models import calib_ids, tiny_llama
from models import DATA_DIR
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import llmpress
from llmpress.cli.main import main
from llmpress.errors import CheckpointError
from llmpress.format.output import atomic_directory
from llmpress.format.save import save_quantized

PROBE = calib_ids(1, 12, seed=5)
UP = "model.layers.0.mlp.up_proj"


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=PROBE).logits


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An asymmetric 4-bit checkpoint (weight, weight_scale, weight_zero per layer)."""
    model, rep = llmpress.compress(
        tiny_llama(), {"method": "rtn", "bits": 4, "group_size": 32}, None, progress=False
    )
    return save_quantized(model, tmp_path_factory.mktemp("trust") / "q4", report=rep)


@pytest.fixture
def ckpt(saved: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(saved, tmp_path / "q4"))


def _edit_tensors(folder: Path, fn) -> None:  # noqa: ANN001
    f = folder / "model.safetensors"
    tensors = load_file(str(f))
    fn(tensors)
    save_file(tensors, str(f), metadata={"format": "pt"})


def _edit_config(folder: Path, fn) -> None:  # noqa: ANN001
    f = folder / "config.json"
    cfg = json.loads(f.read_text())
    fn(cfg["quantization_config"])
    f.write_text(json.dumps(cfg))


# ------------------------------------------------------------------ packed tensors


@pytest.mark.parametrize("suffix", ["weight", "weight_scale", "weight_zero"])
def test_missing_packed_tensor_is_refused(ckpt: Path, suffix: str) -> None:
    _edit_tensors(ckpt, lambda t: t.pop(f"{UP}.{suffix}"))
    with pytest.raises(CheckpointError, match=rf"tensor '{UP}\.{suffix}' is missing"):
        AutoModelForCausalLM.from_pretrained(ckpt)


@pytest.mark.parametrize("suffix", ["weight_scale", "weight_zero"])
def test_renamed_packed_tensor_is_refused(ckpt: Path, suffix: str) -> None:
    _edit_tensors(ckpt, lambda t: t.__setitem__(f"{UP}.{suffix}_old", t.pop(f"{UP}.{suffix}")))
    with pytest.raises(CheckpointError, match=r"missing|unexpected"):
        AutoModelForCausalLM.from_pretrained(ckpt)


def test_packed_tensor_resaved_as_float32_is_refused(ckpt: Path) -> None:
    _edit_tensors(ckpt, lambda t: t.__setitem__(f"{UP}.weight", t[f"{UP}.weight"].float()))
    with pytest.raises(
        CheckpointError, match=rf"'{UP}\.weight' is stored as torch.float32, expected torch.int32"
    ):
        AutoModelForCausalLM.from_pretrained(ckpt)


def test_int32_header_relabelled_f32_is_refused(ckpt: Path) -> None:
    f = ckpt / "model.safetensors"
    raw = f.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    header[f"{UP}.weight"]["dtype"] = "F32"
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    f.write_bytes(struct.pack("<Q", len(h)) + h + raw[8 + n :])
    with pytest.raises(CheckpointError, match=r"stored as torch.float32, expected torch.int32"):
        AutoModelForCausalLM.from_pretrained(ckpt)


def test_swapped_offsets_of_same_size_tensors_fail_the_checksum(ckpt: Path) -> None:
    f = ckpt / "model.safetensors"
    raw = f.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    a, b = f"{UP}.weight_scale", "model.layers.1.mlp.up_proj.weight_scale"
    header[a]["data_offsets"], header[b]["data_offsets"] = (
        header[b]["data_offsets"],
        header[a]["data_offsets"],
    )
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    f.write_bytes(struct.pack("<Q", len(h)) + h + raw[8 + n :])
    with pytest.raises(CheckpointError, match="does not match its recorded checksum"):
        AutoModelForCausalLM.from_pretrained(ckpt)


def test_checksum_switch_for_very_large_models(ckpt: Path, monkeypatch: pytest.MonkeyPatch, caplog) -> None:  # noqa: ANN001
    ref = _logits(AutoModelForCausalLM.from_pretrained(ckpt))
    monkeypatch.setenv("LLMPRESS_VERIFY_CHECKSUMS", "0")
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(ckpt)), ref)
    assert "not verified" in caplog.text


def test_edited_model_config_is_refused(ckpt: Path) -> None:
    f = ckpt / "config.json"
    cfg = json.loads(f.read_text())
    cfg["rms_norm_eps"] = 0.1
    f.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="was changed after llmpress saved it"):
        AutoModelForCausalLM.from_pretrained(ckpt)


# ------------------------------------------------------------------ quantization_config


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("symmetric", True, r"unexpected tensor"),  # a symmetric layer stores no zero point
        ("group_size", 0, r"group_size"),
        ("bits", "4", r"bits: Input should be a valid integer"),
        ("bits", 9, r"bits: Input should be less than or equal to 8"),
        ("in_features", -1, r"in_features"),
        ("storage_dtype", "float8", r"storage_dtype"),
        ("colour", "red", r"colour: Extra inputs are not permitted"),
    ],
)
def test_bad_module_entry_is_refused_naming_the_field(
    ckpt: Path, field: str, value: object, message: str
) -> None:
    _edit_config(ckpt, lambda q: q["modules"][UP].__setitem__(field, value))
    with pytest.raises(CheckpointError, match=message) as ei:
        AutoModelForCausalLM.from_pretrained(ckpt)
    assert UP in str(ei.value)


@pytest.mark.parametrize("value", ["v1", 1.0, None])
def test_bad_format_version_is_refused(ckpt: Path, value: object) -> None:
    _edit_config(ckpt, lambda q: q.__setitem__("format_version", value))
    with pytest.raises(CheckpointError, match="format_version"):
        AutoModelForCausalLM.from_pretrained(ckpt)


def test_newer_format_version_names_the_upgrade(ckpt: Path) -> None:
    def newer(q: dict) -> None:
        q["format_version"], q["llmpress_version"] = 9, "3.1.0"

    _edit_config(ckpt, newer)
    with pytest.raises(CheckpointError, match=r"format version 9, newer.*upgrade llmpress to 3\.1\.0"):
        AutoModelForCausalLM.from_pretrained(ckpt)


def test_format_version_1_checkpoints_still_load(ckpt: Path) -> None:
    """Version 1 named the value dtype ``dtype``; version 2 says ``storage_dtype``."""
    ref = _logits(AutoModelForCausalLM.from_pretrained(ckpt))

    def to_v1(q: dict) -> None:
        q["format_version"] = 1
        for entry in q["modules"].values():
            entry["dtype"] = entry.pop("storage_dtype")

    _edit_config(ckpt, to_v1)
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(ckpt)), ref)


@pytest.mark.parametrize("value", [3.5, [], True])
def test_nonsense_storage_dtype_is_refused(ckpt: Path, value: object) -> None:
    _edit_config(ckpt, lambda q: q["modules"][UP].__setitem__("storage_dtype", value))
    with pytest.raises(CheckpointError, match="storage_dtype"):
        AutoModelForCausalLM.from_pretrained(ckpt)


def test_unknown_top_level_field_is_refused(ckpt: Path) -> None:
    _edit_config(ckpt, lambda q: q.__setitem__("kv_cache_dtype", "fp8"))
    with pytest.raises(CheckpointError, match="kv_cache_dtype: Extra inputs are not permitted"):
        AutoModelForCausalLM.from_pretrained(ckpt)


# ------------------------------------------------------------------ command line


def _recipe(tmp_path: Path, text: str = "stages:\n  - method: sparsegpt\n    sparsity: 0.5\n") -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


def _compress_args(model_dir: Path, recipe: Path, out: Path, *extra: str) -> list[str]:
    calib = str(DATA_DIR / "calib.txt")
    return [
        "compress",
        str(model_dir),
        "--recipe",
        str(recipe),
        "--calib",
        calib,
        "--out",
        str(out),
        "--nsamples",
        "4",
        "--seqlen",
        "32",
        *extra,
    ]


def _one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    lines = [ln for ln in err if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in "\n".join(err), err
    return lines[0]


def test_binary_recipe_file_is_one_error_line(tmp_path: Path, tiny_model_dir: Path, capsys) -> None:  # noqa: ANN001
    recipe = tmp_path / "r.yaml"
    recipe.write_bytes(bytes(range(256)) * 4)
    assert main(_compress_args(tiny_model_dir, recipe, tmp_path / "out")) == 2
    assert "not text" in _one_error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_binary_calibration_file_is_one_error_line(tmp_path: Path, tiny_model_dir: Path, capsys) -> None:  # noqa: ANN001
    calib = tmp_path / "c.txt"
    calib.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    args = _compress_args(tiny_model_dir, _recipe(tmp_path), tmp_path / "out")
    args[args.index("--calib") + 1] = str(calib)
    assert main(args) == 2
    assert "not UTF-8 text" in _one_error_line(capsys)


def test_unavailable_device_is_one_error_line(tmp_path: Path, tiny_model_dir: Path, capsys) -> None:  # noqa: ANN001
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert main(_compress_args(tiny_model_dir, _recipe(tmp_path), tmp_path / "out", "--device", "cuda")) == 2
    assert "sees no CUDA GPU" in _one_error_line(capsys)
    assert main(_compress_args(tiny_model_dir, _recipe(tmp_path), tmp_path / "out", "--device", "gpu0")) == 2
    assert "not a device name" in _one_error_line(capsys)


def test_seqlen_beyond_the_model_positions_is_one_error_line(
    tmp_path: Path, tiny_model_dir: Path, capsys
) -> None:  # noqa: ANN001
    args = _compress_args(tiny_model_dir, _recipe(tmp_path), tmp_path / "out")
    args[args.index("--seqlen") + 1] = "100000"
    assert main(args) == 2
    assert "exceeds the model's" in _one_error_line(capsys)


def test_debug_shows_the_traceback(tmp_path: Path, tiny_model_dir: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_bytes(b"\x00\xff" * 10)
    with pytest.raises(llmpress.errors.RecipeError):
        main(["--debug", *_compress_args(tiny_model_dir, recipe, tmp_path / "out")])


def test_compressed_tensors_with_an_asymmetric_recipe_fails_before_work(
    tmp_path: Path,
    tiny_model_dir: Path,
    capsys,
    monkeypatch: pytest.MonkeyPatch,  # noqa: ANN001
) -> None:
    import llmpress.format.loading

    monkeypatch.setattr(
        llmpress.format.loading, "load_model", lambda *a, **k: pytest.fail("loaded the model")
    )
    recipe = _recipe(tmp_path, "stages:\n  - method: rtn\n    bits: 4\n    group_size: 32\n")
    assert (
        main(_compress_args(tiny_model_dir, recipe, tmp_path / "out", "--format", "compressed-tensors")) == 2
    )
    assert "symmetric: true" in _one_error_line(capsys)


def test_out_below_a_regular_file_fails_before_work(
    tmp_path: Path, tiny_model_dir: Path, capsys, monkeypatch
) -> None:  # noqa: ANN001
    import llmpress.format.loading

    monkeypatch.setattr(
        llmpress.format.loading, "load_model", lambda *a, **k: pytest.fail("loaded the model")
    )
    (tmp_path / "file").write_text("x")
    assert main(_compress_args(tiny_model_dir, _recipe(tmp_path), tmp_path / "file" / "out")) == 2
    assert "is a file, not a folder" in _one_error_line(capsys)


# ------------------------------------------------------------------ output folders


def test_stale_temp_folders_of_killed_runs_are_removed(tmp_path: Path, tiny_model_dir: Path) -> None:
    out = tmp_path / "out"
    stale = tmp_path / ".out.tmp-killed"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    assert main(_compress_args(tiny_model_dir, _recipe(tmp_path), out)) == 0
    assert not stale.exists() and (out / "config.json").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def test_output_folders_get_the_users_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        with atomic_directory(tmp_path / "o") as tmp:
            (tmp / "f").write_text("x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "o").stat().st_mode) == 0o755


def test_two_concurrent_compress_runs_exactly_one_succeeds(tmp_path: Path, tiny_model_dir: Path) -> None:
    out = tmp_path / "out"
    recipe = _recipe(tmp_path)
    cmd = [sys.executable, "-m", "llmpress", *_compress_args(tiny_model_dir, recipe, out)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    procs = [
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for _ in range(2)
    ]
    results = [(p.wait(timeout=600), p.stderr.read() if p.stderr else "") for p in procs]
    codes = sorted(rc for rc, _ in results)
    assert codes == [0, 2], results
    loser = next(err for rc, err in results if rc == 2)
    assert "another llmpress run is writing" in loser or "already exists" in loser
    assert "Traceback" not in loser
    assert (out / "config.json").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def test_invalid_shard_index_is_one_error_line(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    model, rep = llmpress.compress(
        tiny_llama(), {"method": "rtn", "bits": 4, "group_size": 32}, None, progress=False
    )
    model.save_pretrained(tmp_path / "m", max_shard_size="20KB")
    index = next((tmp_path / "m").glob("*.index.json"))
    index.write_text(index.read_text()[:-20])
    assert main(["eval", str(tmp_path / "m"), "--text", str(DATA_DIR / "eval.txt")]) == 2
    assert "is not valid JSON" in _one_error_line(capsys)
