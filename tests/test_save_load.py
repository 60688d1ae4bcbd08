"""Saving compressed models: plain ``from_pretrained`` gives them back bit for bit; atomic writes."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from models import BERT, GPT2, LLAMA, OPT, PHI, QWEN2, Arch, calib_ids, tiny_llama, weight_of
from transformers import AutoConfig

import llmpress
from llmpress.format.loading import auto_class_for, load_model
from llmpress.format.save import RECIPE_FILE, REPORT_FILE, atomic_directory, save_compressed

SAVE_ARCHS = [LLAMA, QWEN2, OPT, GPT2, BERT, PHI]
PROBE = calib_ids(2, 16, seed=7)

# Runs in a fresh interpreter: plain transformers, llmpress never imported.
LOADER = textwrap.dedent(
    """
    import json, sys
    import torch, transformers
    jobs = json.loads(sys.argv[1])
    probe = torch.load(sys.argv[2])
    out = {}
    for name, (path, auto_name) in jobs.items():
        model = getattr(transformers, auto_name).from_pretrained(path, dtype=torch.float32).eval()
        with torch.no_grad():
            logits = model(input_ids=probe).logits
        out[name] = {"state": {k: v.clone() for k, v in model.state_dict().items()}, "logits": logits,
                     "class": type(model).__name__}
    assert not any(m == "llmpress" or m.startswith("llmpress.") for m in sys.modules), "llmpress was imported"
    torch.save(out, sys.argv[3])
    """
)


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """Compress and save one tiny model per architecture; reload all of them in one subprocess."""
    base = tmp_path_factory.mktemp("saved")
    jobs, expected = {}, {}
    for i, arch in enumerate(SAVE_ARCHS):
        pattern = "2:4" if i % 2 else "unstructured"
        model, report = llmpress.compress(
            arch(), {"method": "wanda", "sparsity": 0.5, "pattern": pattern}, calib_ids(), progress=False
        )
        out = save_compressed(model, base / arch.name, report=report)
        with torch.no_grad():
            logits = model(input_ids=PROBE).logits
        jobs[arch.name] = (str(out), auto_class_for(AutoConfig.from_pretrained(out)).__name__)
        expected[arch.name] = {"model": model, "report": report, "dir": out, "logits": logits}
    torch.save(PROBE, base / "probe.pt")
    r = subprocess.run(
        [sys.executable, "-c", LOADER, json.dumps(jobs), str(base / "probe.pt"), str(base / "out.pt")],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=base,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    loaded = torch.load(base / "out.pt")
    for name in expected:
        expected[name]["loaded"] = loaded[name]
        expected[name]["auto"] = jobs[name][1]
    return expected


@pytest.mark.parametrize("arch", SAVE_ARCHS, ids=[a.name for a in SAVE_ARCHS])
def test_plain_transformers_load_is_identical(saved: dict, arch: Arch) -> None:
    item = saved[arch.name]
    model, loaded = item["model"], item["loaded"]
    assert loaded["class"] == type(model).__name__
    state = model.state_dict()
    assert loaded["state"].keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(loaded["state"][k], v), k
    assert torch.equal(loaded["logits"], item["logits"])
    # the zeros survived the round trip
    for name in arch.expected_targets():
        w = loaded["state"][f"{name}.weight"]
        assert float((w == 0).float().mean()) == 0.5, name


def test_auto_class_follows_the_architecture(saved: dict) -> None:
    assert saved["bert"]["auto"] == "AutoModelForMaskedLM"
    for name in ("llama", "qwen2", "opt", "gpt2", "phi"):
        assert saved[name]["auto"] == "AutoModelForCausalLM"


@pytest.mark.parametrize("arch", SAVE_ARCHS, ids=[a.name for a in SAVE_ARCHS])
def test_report_and_recipe_files(saved: dict, arch: Arch) -> None:
    item = saved[arch.name]
    out: Path = item["dir"]
    report = json.loads((out / REPORT_FILE).read_text())
    recipe = json.loads((out / RECIPE_FILE).read_text())
    assert recipe == item["report"].recipe == report["recipe"]
    assert recipe["stages"][0]["method"] == "wanda"
    assert set(report["modules"]) == arch.expected_targets()
    for name, entry in report["modules"].items():
        assert entry["sparsity"] == 0.5 and entry["methods"] == ["wanda"]
        assert entry["shape"] == list(weight_of(item["model"].get_submodule(name)).shape)
    assert report["overall_sparsity"] == 0.5
    assert not [p for p in out.parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_load_model_round_trip(tmp_path: Path, tokenizer) -> None:
    model, report = llmpress.compress(
        tiny_llama(vocab=256), {"method": "magnitude", "sparsity": 0.5}, progress=False
    )
    out = save_compressed(model, tmp_path / "m", tokenizer=tokenizer, report=report)
    assert (out / "tokenizer.json").is_file() and (out / "config.json").is_file()
    back, tok = load_model(out)
    assert next(back.parameters()).dtype == torch.float32 and not back.training
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), model.state_dict().values()))
    assert tok is not None and tok("the river")["input_ids"] == tokenizer("the river")["input_ids"]
    with torch.no_grad():
        assert torch.equal(back(input_ids=PROBE).logits, model(input_ids=PROBE).logits)


def test_save_with_dtype_casts_the_files_not_the_model(tmp_path: Path) -> None:
    from safetensors import safe_open

    model, _ = llmpress.compress(tiny_llama(), {"method": "magnitude", "sparsity": 0.5}, progress=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    save_compressed(model, tmp_path / "half", dtype=torch.float16)
    with safe_open(str(tmp_path / "half" / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in list(f.keys())} == {torch.float16}
        w = f.get_tensor("model.layers.0.mlp.up_proj.weight")
        assert float((w == 0).float().mean()) == 0.5
    # the in-memory model is exactly as it was (no fp16 rounding left behind)
    assert next(model.parameters()).dtype == torch.float32
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(torch.equal(v, buffers[k]) for k, v in model.named_buffers())


# ------------------------------------------------------------------------------------ atomic


def test_failed_save_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_llama()

    def broken_save(path, *args, **kwargs):  # noqa: ANN001, ANN202
        Path(path, "model.safetensors").write_bytes(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr("llmpress.format.save.write_shards", broken_save)  # the shard writer fails midway
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="disk full"):
        save_compressed(model, out)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no .out.tmp-* folder left behind


def test_failed_overwrite_keeps_the_old_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    model = tiny_llama()

    def broken_save(path, *args, **kwargs):  # noqa: ANN001, ANN202
        Path(path, "config.json").write_text("{}")
        raise OSError("boom")

    monkeypatch.setattr("llmpress.format.save.write_shards", broken_save)
    with pytest.raises(OSError, match="boom"):
        save_compressed(model, out, overwrite=True)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_existing_folder_is_not_replaced_without_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(FileExistsError, match="already exists"):
        save_compressed(tiny_llama(), out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_overwrite_replaces_the_folder(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    save_compressed(tiny_llama(), out, overwrite=True)
    names = {p.name for p in out.iterdir()}
    assert "stale.txt" not in names and "config.json" in names
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_atomic_directory_nested_parent_and_extra(tmp_path: Path) -> None:
    out = tmp_path / "a" / "b" / "out"
    save_compressed(tiny_llama(), out, extra=lambda d: (d / "extra.txt").write_text("x"))
    assert (out / "extra.txt").read_text() == "x"
    with pytest.raises(ValueError, match="inside"), atomic_directory(tmp_path / "c") as tmp:
        (tmp / "f").write_text("1")
        raise ValueError("inside")
    assert not (tmp_path / "c").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


@pytest.mark.parametrize(
    "stages",
    [
        [{"method": "magnitude_structured", "ratio": 0.3}],  # a smaller standard config is saved
        [{"method": "rtn", "bits": 4, "group_size": 32}],  # a quantization_config is saved
    ],
    ids=["structured", "quantized"],
)
def test_saving_never_touches_the_callers_config(
    stages: list[dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The saved config is a copy: another reader of ``model.config`` during a save (a thread, an
    exception half way) never sees the smaller widths or the quantization_config."""
    import llmpress.format.save

    model, report = llmpress.compress(tiny_llama(), {"stages": stages}, calib_ids(4, 16), progress=False)
    config = model.config
    before = config.to_dict()
    seen = []
    real = llmpress.format.save.write_shards

    def spy(*args: object, **kwargs: object) -> None:
        seen.append(model.config.to_dict())
        real(*args, **kwargs)

    monkeypatch.setattr(llmpress.format.save, "write_shards", spy)
    folder = save_compressed(model, tmp_path / "out", report=report)
    assert seen == [before] and model.config is config and config.to_dict() == before
    saved = json.loads((folder / "config.json").read_text())
    assert saved != {k: v for k, v in before.items() if k in saved}  # the saved one did change
