"""Trust, round 2 (issue 18 items 7 and 11): the values of scales and zero points are checked at
every load, checksums or not; a shard index cannot name a file outside its folder."""

from __future__ import annotations

import json
import os
import shutil
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
from llmpress.format.checkpoint import DEFAULT_CHECKSUM, file_checksums, tensor_checksum
from llmpress.format.loading import check_shard_index
from llmpress.format.save import save_quantized

UP = "model.layers.0.mlp.up_proj"
RECIPES = {
    "fp8-static": [{"method": "fp8", "activations": "static"}],
    "int4-asym": {"method": "rtn", "bits": 4, "group_size": 32},
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = {}
    for name, recipe in RECIPES.items():
        model, rep = llmpress.compress(tiny_llama(), recipe, calib_ids(), progress=False)
        out[name] = save_quantized(model, tmp_path_factory.mktemp("t2") / name, report=rep)
    return out


def _copy(saved: dict[str, Path], name: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(saved[name], tmp_path / name))


def _set_value(folder: Path, key: str, value: float) -> None:
    f = folder / "model.safetensors"
    tensors = load_file(str(f))
    t = tensors[key].clone()
    t.view(-1)[-1] = value  # the last one: the error must find it wherever it is
    tensors[key] = t
    save_file(tensors, str(f), metadata={"format": "pt"})


# ------------------------------------------------------------------ item 7: values of small tensors


@pytest.mark.parametrize("value", [float("nan"), 0.0, -1.0, float("inf")])
@pytest.mark.parametrize(
    ("ckpt", "suffix"),
    [("fp8-static", "input_scale"), ("fp8-static", "weight_scale"), ("int4-asym", "weight_scale")],
)
def test_bad_scale_is_refused_without_checksums(
    saved: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    ckpt: str,
    suffix: str,
    value: float,
) -> None:
    folder = _copy(saved, ckpt, tmp_path)
    _set_value(folder, f"{UP}.{suffix}", value)
    monkeypatch.setenv("LLMPRESS_VERIFY_CHECKSUMS", "0")
    with pytest.raises(CheckpointError, match=r"values must be finite and positive") as ei:
        AutoModelForCausalLM.from_pretrained(folder)
    msg = str(ei.value)
    assert f"'{UP}.{suffix}'" in msg and str(folder / "model.safetensors") in msg


def test_zero_point_off_the_grid_is_refused_without_checksums(
    saved: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = _copy(saved, "int4-asym", tmp_path)
    _set_value(folder, f"{UP}.weight_zero", 200)  # 4 bits: zero points are 0..15
    monkeypatch.setenv("LLMPRESS_VERIFY_CHECKSUMS", "0")
    with pytest.raises(CheckpointError, match=rf"'{UP}\.weight_zero' holds 200.*at most 15"):
        AutoModelForCausalLM.from_pretrained(folder)


@pytest.mark.parametrize("ckpt", sorted(RECIPES))
def test_good_checkpoints_still_load_without_checksums(
    saved: dict[str, Path], monkeypatch: pytest.MonkeyPatch, ckpt: str
) -> None:
    monkeypatch.setenv("LLMPRESS_VERIFY_CHECKSUMS", "0")
    model = AutoModelForCausalLM.from_pretrained(saved[ckpt])
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=calib_ids(1, 8, seed=3)).logits).all()


@pytest.mark.parametrize(("scale", "dtype"), [(0.0, "float32"), (float("nan"), "float32"), (1e-9, "float16")])
def test_a_scale_the_format_cannot_store_is_refused_at_save(scale: float, dtype: str) -> None:
    """What is saved loads: a 0 / NaN scale, or one that underflows float16, is refused when packing."""
    from llmpress.format.formats import ModuleFormat, pack_module
    from llmpress.model.results import LayerResult, QuantState

    codes = torch.full((4, 64), 8, dtype=torch.uint8)
    scales = torch.full((4, 2), 0.01)
    scales[2, 1] = scale
    quant = QuantState(codes, scales, torch.full_like(scales, 8.0), bits=4, group_size=32, symmetric=True)
    fmt = ModuleFormat("int", 64, 4, bits=4, group_size=32, symmetric=True, dtype=dtype)
    with pytest.raises(CheckpointError, match=r"cannot save layer\.x: its weight_scale .* at \[2, 1\]"):
        pack_module(fmt, torch.zeros(4, 64), LayerResult(quant=quant), "layer.x")


# ------------------------------------------------------------------ checksum algorithms


def test_file_checksums_match_tensor_checksums_for_every_algorithm(tmp_path: Path) -> None:
    """The mapped-file digests equal the in-memory ones (what save and older llmpress recorded)."""
    from llmpress.format.checkpoint import CHECKSUM_ALGORITHMS

    tensors = {
        "a": torch.randn(3, 5).half(),
        "b": torch.arange(7, dtype=torch.int32),
        "c": torch.zeros(0, 3),
        "d": torch.randn(4).to(torch.float8_e4m3fn),
        "e": torch.tensor([1, 2], dtype=torch.uint16),  # a dtype llmpress does not store
    }
    save_file(tensors, str(tmp_path / "m.safetensors"))
    for algo in CHECKSUM_ALGORITHMS:
        want = {k: tensor_checksum(v, algo) for k, v in tensors.items()}
        assert file_checksums([tmp_path / "m.safetensors"], algo) == want, algo


def _edit_config(folder: Path, fn) -> None:  # noqa: ANN001
    f = folder / "config.json"
    cfg = json.loads(f.read_text())
    fn(cfg["quantization_config"])
    f.write_text(json.dumps(cfg))


def _flip_a_code(folder: Path) -> None:
    f = folder / "model.safetensors"
    tensors = load_file(str(f))
    tensors[f"{UP}.weight"] = tensors[f"{UP}.weight"] ^ 1  # one bit of the packed codes
    save_file(tensors, str(f), metadata={"format": "pt"})


def test_new_checkpoints_verify_fast_checksums_whatever_their_size(
    saved: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: checksums were skipped above 4 GiB, so a flipped bit loaded silently."""
    import llmpress.format.checkpoint

    folder = _copy(saved, "int4-asym", tmp_path)
    q = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert q["checksum_algorithm"] == DEFAULT_CHECKSUM != "sha256"
    monkeypatch.setattr(llmpress.format.checkpoint, "AUTO_VERIFY_BYTES", 0)  # every checkpoint is "large"
    AutoModelForCausalLM.from_pretrained(folder)
    _flip_a_code(folder)
    with pytest.raises(CheckpointError, match=rf"'{UP}\.weight' does not match its recorded checksum"):
        AutoModelForCausalLM.from_pretrained(folder)


def _as_sha256_checkpoint(folder: Path) -> None:
    """What llmpress saved before ``checksum_algorithm``: sha256 digests, no algorithm field."""

    def to_sha256(q: dict) -> None:
        del q["checksum_algorithm"]
        q["checksums"] = file_checksums([folder / "model.safetensors"], "sha256")
        q["format_version"] = 2

    _edit_config(folder, to_sha256)


def test_sha256_checkpoints_still_verify(saved: dict[str, Path], tmp_path: Path) -> None:
    folder = _copy(saved, "int4-asym", tmp_path)
    _as_sha256_checkpoint(folder)
    AutoModelForCausalLM.from_pretrained(folder)
    _flip_a_code(folder)
    with pytest.raises(CheckpointError, match="does not match its recorded checksum"):
        AutoModelForCausalLM.from_pretrained(folder)


def test_large_sha256_checkpoints_skip_checksums_as_before(
    saved: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import llmpress.format.checkpoint

    folder = _copy(saved, "int4-asym", tmp_path)
    _as_sha256_checkpoint(folder)
    _flip_a_code(folder)
    monkeypatch.setattr(llmpress.format.checkpoint, "AUTO_VERIFY_BYTES", 0)
    AutoModelForCausalLM.from_pretrained(folder)  # sha256 over the limit: skipped, with a warning
    assert "not verified" in caplog.text and "re-save" in caplog.text
    monkeypatch.setenv("LLMPRESS_VERIFY_CHECKSUMS", "1")
    with pytest.raises(CheckpointError, match="does not match its recorded checksum"):
        AutoModelForCausalLM.from_pretrained(folder)


def test_unknown_checksum_algorithm_is_refused(saved: dict[str, Path], tmp_path: Path) -> None:
    folder = _copy(saved, "int4-asym", tmp_path)
    _edit_config(folder, lambda q: q.__setitem__("checksum_algorithm", "md5"))
    with pytest.raises(CheckpointError, match="checksum_algorithm"):
        AutoModelForCausalLM.from_pretrained(folder)


# ------------------------------------------------------------------ item 11: shard index paths


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model, _ = llmpress.compress(
        tiny_llama(), {"method": "rtn", "bits": 4, "group_size": 32}, None, progress=False
    )
    folder = tmp_path_factory.mktemp("t2s") / "m"
    model.save_pretrained(folder, max_shard_size="20KB")
    return folder


def _last_shard(folder: Path) -> str:
    return max(json.loads(next(folder.glob("*.index.json")).read_text())["weight_map"].values())


def _point(folder: Path, shard: str, target: str) -> None:
    """Rewrite the index so that the tensors of ``shard`` name ``target``."""
    index = next(folder.glob("*.index.json"))
    data = json.loads(index.read_text())
    data["weight_map"] = {k: target if v == shard else v for k, v in data["weight_map"].items()}
    index.write_text(json.dumps(data))


def _one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    lines = [ln for ln in err if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in "\n".join(err), err
    return lines[0]


def test_shard_index_escaping_the_folder_is_one_error_line(
    sharded: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = Path(shutil.copytree(sharded, tmp_path / "m"))
    last = _last_shard(folder)
    shutil.move(folder / last, tmp_path / last)  # the file is there, one level up
    _point(folder, last, f"../{last}")
    assert main(["eval", str(folder), "--text", str(DATA_DIR / "eval.txt")]) == 2
    line = _one_error_line(capsys)
    assert f"'../{last}'" in line and "leads out of the checkpoint folder" in line


@pytest.mark.parametrize("how", ["absolute", "dotdot-inside", "windows", "symlink-out"])
def test_shard_names_outside_the_folder_are_refused(sharded: Path, tmp_path: Path, how: str) -> None:
    folder = Path(shutil.copytree(sharded, tmp_path / "m"))
    last = _last_shard(folder)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.move(folder / last, outside / last)
    if how == "absolute":
        target = str(outside / last)
    elif how == "dotdot-inside":
        target = f"sub/../../elsewhere/{last}"
    elif how == "windows":
        target = f"..\\elsewhere\\{last}"
    else:
        os.symlink(outside / last, folder / last)
        target = last
    _point(folder, last, target)
    with pytest.raises(CheckpointError, match=r"absolute path|leads out of the checkpoint folder") as ei:
        check_shard_index(folder)
    assert repr(target) in str(ei.value)


def test_from_pretrained_refuses_a_shard_linked_out_of_the_folder(tmp_path: Path) -> None:
    """transformers refuses '..' and absolute names itself, but follows links."""
    import llmpress.format.shards

    model, rep = llmpress.compress(
        tiny_llama(), {"method": "rtn", "bits": 4, "group_size": 32}, None, progress=False
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(llmpress.format.shards, "MAX_SHARD_BYTES", 20_000)
        folder = save_quantized(model, tmp_path / "q", report=rep)
    last = _last_shard(folder)
    (tmp_path / "elsewhere").mkdir()
    shutil.move(folder / last, tmp_path / "elsewhere" / last)
    os.symlink(tmp_path / "elsewhere" / last, folder / last)
    with pytest.raises(CheckpointError, match=rf"'{last}' is a link that leads out of the checkpoint folder"):
        AutoModelForCausalLM.from_pretrained(folder)


def test_hub_cache_symlinks_into_blobs_are_allowed(sharded: Path, tmp_path: Path) -> None:
    """huggingface_hub stores snapshots/<rev>/<file> as links to ../../blobs/<hash>."""
    repo = tmp_path / "models--user--m"
    snap, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for f in sharded.iterdir():
        shutil.copy(f, blobs / f"blob-{f.name}")
        os.symlink(Path("..", "..", "blobs", f"blob-{f.name}"), snap / f.name)
    check_shard_index(snap)
    other = tmp_path / "other"  # but not a link out of the repository's cache folder
    other.mkdir()
    shard = max(p.name for p in sharded.glob("*.safetensors"))
    shutil.copy(sharded / shard, other / shard)
    (snap / shard).unlink()
    os.symlink(other / shard, snap / shard)
    with pytest.raises(CheckpointError, match="a link that leads out"):
        check_shard_index(snap)
