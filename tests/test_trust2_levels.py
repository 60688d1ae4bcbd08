"""Issue 18 (trust round 2), items 8 and 9: a level database and an EvoPress checkpoint are
caches. A damaged (truncated, byte-flipped) layer file is named in a warning and that layer
rebuilt; a damaged EvoPress checkpoint is named in a warning and the search restarts."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import pytest
import torch
from models import DATA_DIR, calib_ids, tiny_llama, weight_of
from safetensors import safe_open

import llmpress
from llmpress.allocation.level_sets import sparsity_levels
from llmpress.allocation.levels import LevelDatabase, Manifest
from llmpress.allocation.problem import AllocationProblem
from llmpress.cli.main import main
from llmpress.errors import AllocationError
from llmpress.format.checkpoint import VERIFY_ENV
from llmpress.model.results import LayerResult
from llmpress.plugins.evopress import EvoPressConfig, evolve

IDS = calib_ids(4, 32)
EVO = {"method": "evopress", "generations": 2, "offspring": 3, "tokens": [64], "survivors": []}
FAST = {"sparsity_step": 0.1, "sparsity_span": 0.2}


def _recipe(db: Path) -> dict:
    return {
        "stages": [
            {"method": "sparsegpt", "sparsity": 0.6, "allocation": {**EVO, **FAST, "database": str(db)}}
        ]
    }


def _run(db: Path, caplog: pytest.LogCaptureFixture) -> tuple[torch.nn.Module, dict]:
    """A search over the database in ``db``, afresh (its search checkpoints removed)."""
    for ck in db.glob("search_*.json"):
        ck.unlink()
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        model, report = llmpress.compress(tiny_llama(), _recipe(db), IDS, progress=False)
    return model, report.allocation


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k).clone() for k in f.keys()}  # noqa: SIM118 - copies, not views of the file


def _assert_same_search(got: tuple[torch.nn.Module, dict], want: tuple[torch.nn.Module, dict]) -> None:
    (m1, a1), (m2, a2) = got, want
    assert a1["levels"] == a2["levels"]
    assert a1["fitness"] == pytest.approx(a2["fitness"], rel=1e-4, abs=1e-6)
    for n in a2["levels"]:
        torch.testing.assert_close(
            weight_of(m1.get_submodule(n)), weight_of(m2.get_submodule(n)), rtol=1e-4, atol=1e-5
        )


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def _damaged_names(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "damaged" in r.getMessage()
    ]


def test_truncated_layer_file_is_named_rebuilt_and_the_search_is_unchanged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = tmp_path / "db"
    clean = _run(db, caplog)
    files = sorted(db.glob("unit_*.safetensors"))
    manifest = json.loads((db / "manifest.json").read_text())
    assert set(manifest["files"]) == {f.name for f in files}  # a checksum per layer file
    typed = Manifest.model_validate(manifest)  # one model in memory and on disk
    assert typed.files is not None and typed.files[files[0].name].size == files[0].stat().st_size
    assert typed.model_dump() == manifest
    victim = files[3]
    before = _tensors(victim)
    with victim.open("r+b") as f:
        f.truncate(1000)
    again = _run(db, caplog)
    warned = _damaged_names(caplog)
    assert len(warned) == 1 and victim.name in warned[0] and "truncated" in warned[0]
    after = _tensors(victim)  # rebuilt, readable, the same tensors
    assert after.keys() == before.keys()
    for k in before:
        torch.testing.assert_close(after[k].float(), before[k].float(), rtol=1e-4, atol=1e-5)
    _assert_same_search(again, clean)
    _run(db, caplog)  # the rebuilt file's checksum was recorded: no warning the next time
    assert not _damaged_names(caplog)


def test_byte_flips_in_every_layer_file_are_named_and_rebuilt(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = tmp_path / "db"
    clean = _run(db, caplog)
    files = sorted(db.glob("unit_*.safetensors"))
    for path in files:  # flip bytes in the tensor data (the header stays readable)
        data = bytearray(path.read_bytes())
        header = 8 + int.from_bytes(data[:8], "little")
        for k in range(header + 1, len(data), max(1, (len(data) - header) // 16)):
            data[k] ^= 0xFF
        path.write_bytes(bytes(data))
    again = _run(db, caplog)
    warned = _damaged_names(caplog)
    assert len(warned) == len(files)
    assert all(any(f.name in w for w in warned) for f in files)
    assert all("checksum" in w for w in warned)
    _assert_same_search(again, clean)


def test_a_file_without_a_recorded_checksum_and_a_damaged_manifest_are_rebuilt(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = tmp_path / "db"
    clean = _run(db, caplog)
    man = db / "manifest.json"
    data = json.loads(man.read_text())
    del data["files"]["unit_00001.safetensors"]  # killed between the file and the manifest
    man.write_text(json.dumps(data))
    _assert_same_search(_run(db, caplog), clean)
    warned = _damaged_names(caplog)
    assert len(warned) == 1 and "unit_00001.safetensors" in warned[0]
    del data["files"]
    man.write_text(json.dumps(data))  # a manifest of an llmpress without checksums: all rebuilt
    _assert_same_search(_run(db, caplog), clean)
    assert [m for m in _warnings(caplog) if "rebuilding every layer" in m]
    man.write_text(man.read_text()[:40])  # a manifest cut short: every layer is rebuilt
    _assert_same_search(_run(db, caplog), clean)
    assert [m for m in _warnings(caplog) if "manifest.json is damaged" in m and "rebuilding every layer" in m]
    assert {f.name for f in db.glob("unit_*.safetensors")} == set(json.loads(man.read_text())["files"])


def test_without_hashing_a_truncated_file_is_still_caught(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    fp = {"model": "m", "recipe": "r", "levels": "l", "calibration": "c"}
    units, shapes = ["a", "b"], [(4, 8), (4, 8)]
    db = LevelDatabase(units, shapes, fp, tmp_path)
    for i in range(2):
        db.put(i, [LayerResult(weight=torch.randn(4, 8))], torch.ones(8))
    cut, flipped = tmp_path / "unit_00000.safetensors", tmp_path / "unit_00001.safetensors"
    cut.write_bytes(cut.read_bytes()[:-1])
    data = bytearray(flipped.read_bytes())
    data[-1] ^= 0xFF
    flipped.write_bytes(bytes(data))
    monkeypatch.setenv(VERIFY_ENV, "0")  # sizes only: the flip goes unseen, the cut does not
    db = LevelDatabase(units, shapes, fp, tmp_path)
    assert not db.has(0) and db.has(1)
    monkeypatch.delenv(VERIFY_ENV)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        db = LevelDatabase(units, shapes, fp, tmp_path)
    assert not db.has(0) and not db.has(1)
    assert [flipped.name in m for m in _damaged_names(caplog)] == [False, True]
    db.put(1, [LayerResult(weight=torch.zeros(4, 8))], None)
    assert LevelDatabase(units, shapes, fp, tmp_path).has(1)


def test_a_database_of_another_model_is_still_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = tmp_path / "db"
    _run(db, caplog)
    with pytest.raises(AllocationError, match="model"):
        llmpress.compress(tiny_llama(seed=1), _recipe(db), IDS, progress=False)


# ------------------------------------------------------------------ EvoPress checkpoints

NUMELS = [1024, 256, 256, 1024, 2048, 2048, 2048]


def _problem(ck: Path | None, **kw) -> AllocationProblem:  # noqa: ANN003
    ls = sparsity_levels(NUMELS, 0.5, 0.05, 0.25, 0.95)
    weights = [random.Random(i).uniform(0.1, 2.0) for i in range(len(NUMELS))]

    def fitness(levels, tokens):  # noqa: ANN001, ANN202
        v = [w * lv for w, lv in zip(weights, levels)]
        return sum(x * x for x in v) + 0.1 * v[0] * v[-1] + 1.0 / tokens

    return AllocationProblem(
        kind="sparsity",
        units=[f"u{i}" for i in range(len(NUMELS))],
        levels=ls.values,
        costs=ls.costs,
        start=ls.start,
        budget=ls.budget,
        target=0.5,
        fitness=fitness,
        max_tokens=1024,
        seqlen=32,
        progress=False,
        fingerprint="x",
        checkpoint=None if ck is None else str(ck),
        **kw,
    )


CFG = EvoPressConfig(generations=6, offspring=4, tokens=(64, 256), survivors=(2,))


def _damage(kind: str, ck: Path) -> None:
    text = ck.read_text()
    if kind == "half":
        ck.write_text(text[: len(text) // 2])
    elif kind == "binary":
        ck.write_bytes(b"\xff\xfe\x00garbage")
    else:
        state = json.loads(text)
        if kind == "parent":
            state["parent"] = state["parent"][:-1]
        elif kind == "rng":
            state["rng"] = [3, [1, 2], None]
        else:  # "types"
            state["generation"] = "three"
        ck.write_text(json.dumps(state))


@pytest.mark.parametrize("kind", ["half", "binary", "parent", "rng", "types"])
def test_damaged_evopress_checkpoint_warns_and_restarts(
    kind: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fresh = evolve(_problem(None), CFG)
    ck = tmp_path / "search.json"
    evolve(_problem(ck), CFG)
    _damage(kind, ck)
    with caplog.at_level(logging.WARNING):
        again = evolve(_problem(ck), CFG)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and str(ck) in warned[0] and "restart" in warned[0]
    assert again.levels == fresh.levels and again.history == fresh.history  # searched from scratch
    assert json.loads(ck.read_text())["generation"] == CFG.generations  # rewritten, valid
    assert Path(f"{ck}.damaged").is_file()  # the damaged bytes kept aside


def test_checkpoint_of_another_search_or_not_a_checkpoint_is_still_refused(tmp_path: Path) -> None:
    ck = tmp_path / "search.json"
    ck.write_text(json.dumps({"something": "else"}))
    with pytest.raises(AllocationError, match="not an evopress checkpoint"):
        evolve(_problem(ck), CFG)
    evolve(_problem(ck.with_name("other.json")), CFG)
    state = json.loads(ck.with_name("other.json").read_text())
    state["key"] = "another problem"
    ck.write_text(json.dumps(state))
    with pytest.raises(AllocationError, match="another search"):
        evolve(_problem(ck), CFG)


def test_block_dropping_search_with_a_named_damaged_checkpoint_restarts(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ck = tmp_path / "drop.json"
    alloc = {**EVO, "generations": 3, "checkpoint": str(ck)}
    recipe = {"stages": [{"method": "drop_blocks", "blocks": 2, "allocation": alloc}]}
    first = llmpress.compress(tiny_llama(layers=4), recipe, IDS, progress=False)[1].allocation
    ck.write_text(ck.read_text()[:-7])
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        again = llmpress.compress(tiny_llama(layers=4), recipe, IDS, progress=False)[1].allocation
    assert any(str(ck) in r.getMessage() and "restart" in r.getMessage() for r in caplog.records)
    assert again["dropped"] == first["dropped"] and again["history"] == pytest.approx(first["history"])


def test_cli_with_a_half_cut_evopress_checkpoint_restarts_with_a_warning(
    tiny_model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = tmp_path / "db"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "stages:\n  - method: sparsegpt\n    sparsity: 0.6\n    allocation:\n      method: evopress\n"
        f"      generations: 2\n      offspring: 3\n      tokens: [64]\n      survivors: []\n"
        f"      sparsity_step: 0.1\n      sparsity_span: 0.2\n      database: {db}\n"
    )

    def compress(out: str) -> tuple[int, dict]:
        args = [
            "compress",
            str(tiny_model_dir),
            "--recipe",
            str(recipe),
            "--calib",
            str(DATA_DIR / "calib.txt"),
        ]
        rc = main([*args, "--out", str(tmp_path / out), "--nsamples", "4", "--seqlen", "32"])
        return rc, json.loads((tmp_path / out / "llmpress_report.json").read_text())["allocation"]

    rc, first = compress("a")
    assert rc == 0
    (ck,) = db.glob("search_evopress_*.json")
    ck.write_text(ck.read_text()[: len(ck.read_text()) // 2])
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        rc, second = compress("b")
    assert rc == 0
    assert any(ck.name in r.getMessage() and "restart" in r.getMessage() for r in caplog.records)
    assert second["levels"] == first["levels"]
    assert second["fitness"] == pytest.approx(first["fitness"], rel=1e-4, abs=1e-6)


def test_atomic_file_keeps_the_old_file_when_writing_fails(tmp_path: Path) -> None:
    from llmpress.format.output import atomic_file

    path = tmp_path / "state.json"
    with atomic_file(path) as tmp:
        tmp.write_text("old")
    with pytest.raises(RuntimeError), atomic_file(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed while writing")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["state.json"]
