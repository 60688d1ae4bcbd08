"""Issue 18 (trust, round 2), item 15 and the hub's rough edges: a 4xx answer is not retried and is
named as what it is (also hf_xet's 404 on ``xet-write-token``); the card of a folder that was
never pushed loads its local path and carries ``base_model`` when a Hub id is known; every file
llmpress writes follows the user's umask."""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants, hf_hub_download
from localhub import LocalHubServer
from models import calib_ids, tiny_llama

import llmpress
from llmpress.allocation.levels import LevelDatabase
from llmpress.cli.eval_harness import EvalRecord, save_eval
from llmpress.hub import PublishError, build_card, push, write_card
from llmpress.hub.card import build_card_context
from llmpress.model.results import LayerResult

RECIPE = {"stages": [{"method": "wanda", "sparsity": 0.5}]}


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory, tokenizer) -> Path:
    """A tiny Llama pruned with Wanda, saved with its tokenizer (the report names no base model)."""
    model = tiny_llama(seed=0, vocab=256)
    model, report = llmpress.compress(model, RECIPE, calib_ids(4, 16, vocab=256), progress=False)
    folder = tmp_path_factory.mktemp("saved") / "tiny-wanda"
    llmpress.save_compressed(model, folder, tokenizer=tokenizer, report=report)
    return folder


@pytest.fixture
def folder(saved: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(saved, tmp_path / "tiny-wanda"))


def _requests(hub: LocalHubServer, part: str) -> int:
    return sum(part in r.path for r in hub.request_log)


def _front_matter(card: str) -> dict:
    import yaml

    return yaml.safe_load(card.split("---\n")[1])


def _with_base(folder: Path, base: str) -> Path:
    report = json.loads((folder / "llmpress_report.json").read_text())
    report["base_model"] = base
    (folder / "llmpress_report.json").write_text(json.dumps(report))
    return folder


# ------------------------------------------------------------------ 4xx: not retried, named


def test_a_404_is_not_retried_and_is_named_with_its_url(local_hub: LocalHubServer, folder: Path) -> None:
    local_hub.fail_next(5, status=404, paths_containing="/commit/")
    with pytest.raises(PublishError) as e:
        push(folder, "local-user/gone", retries=3, backoff=0.01)
    url = re.escape(f"{local_hub.url}/api/models/local-user/gone/commit/main")
    assert re.search(rf"upload: the Hub answered 404 Not Found for {url}", str(e.value)), str(e.value)
    assert "dropped" not in str(e.value) and "attempt" not in str(e.value)
    assert _requests(local_hub, "/commit/") == 1  # asked once: a 404 is an answer, not a dropped line


@pytest.mark.parametrize("status", [401, 403])
def test_auth_errors_are_not_retried(local_hub: LocalHubServer, folder: Path, status: int) -> None:
    local_hub.fail_next(5, status=status, paths_containing="/preupload/")
    with pytest.raises(PublishError, match=rf"HTTP {status}"):
        push(folder, "local-user/denied", retries=3, backoff=0.01)
    assert _requests(local_hub, "/preupload/") == 1


def test_xet_token_404_is_one_request_named_with_the_fix(
    local_hub: LocalHubServer, folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """hf_xet reports the Hub's 404 on ``xet-write-token`` as a ``ConnectionError``: it used to be
    retried 3 times and reported as "the connection dropped"."""
    pytest.importorskip("hf_xet")
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", False)  # the client's default: upload through Xet
    local_hub.fail_next(5, status=404, paths_containing="/xet-write-token")
    with pytest.raises(PublishError) as e:
        push(folder, "local-user/no-xet", retries=3, backoff=0.01)
    msg = str(e.value)
    assert "the Hub answered 404 Not Found for " in msg and "/xet-write-token" in msg, msg
    assert "HF_HUB_DISABLE_XET=1" in msg and "dropped" not in msg
    assert _requests(local_hub, "/xet-write-token") == 1


def test_push_through_xet_to_the_local_hub(
    local_hub: LocalHubServer, folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without HF_HUB_DISABLE_XET, huggingface_hub uploads through Xet: the local Hub answers the
    token request and the CAS upload, and serves the files back byte for byte."""
    pytest.importorskip("hf_xet")
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", False)
    (folder / "noise.bin").write_bytes(random.Random(0).randbytes(200_000))  # stored uncompressed
    push(folder, "local-user/via-xet")
    save_eval(folder, [EvalRecord(task="tiny", metric="acc", value=0.5)])
    info = push(folder, "local-user/via-xet")  # again: the client deduplicates against what it sent
    assert _requests(local_hub, "/xet-write-token/") == 2 and _requests(local_hub, "/v1/shards") == 2
    assert _requests(local_hub, "/info/lfs/objects/batch") == 0  # not through Git LFS
    for name in ("model.safetensors", "noise.bin", "tokenizer.json", "llmpress_eval.json", "README.md"):
        path = hf_hub_download("local-user/via-xet", name, revision=info.oid, cache_dir=tmp_path / "dl")
        assert Path(path).read_bytes() == (folder / name).read_bytes(), name


def test_server_errors_are_still_retried(local_hub: LocalHubServer, folder: Path) -> None:
    local_hub.fail_next(2, status=502, paths_containing="/commit/")
    assert push(folder, "local-user/flaky502", retries=3, backoff=0.01).oid
    assert _requests(local_hub, "/commit/") == 3


# ----------------------------------------------------------------------------- model card


def test_card_of_a_never_pushed_folder_loads_its_local_path(folder: Path) -> None:
    card = str(build_card(folder))
    usage = card.split("## Usage", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    assert f"from_pretrained({json.dumps(str(folder.resolve()))})" in usage
    assert "llmpress-demo" not in card and 'from_pretrained("tiny-wanda")' not in card
    assert _front_matter(card)["model_name"] == "tiny-wanda"
    namespace: dict = {}
    exec(compile(usage, "usage", "exec"), namespace)  # the snippet works as pasted
    assert namespace["outputs"].shape[-1] > 0


def test_demo_card_shows_the_local_path(folder: Path, tmp_path: Path) -> None:
    from llmpress.cli.demo import write_demo_card

    card = write_demo_card(folder, tmp_path / "dense-llama").read_text()
    assert "llmpress-demo/" not in card
    assert json.dumps(str(folder.resolve())) in card


def test_card_of_a_pushed_folder_loads_the_hub_id(folder: Path) -> None:
    ctx = build_card_context(folder, repo_id="alice/tiny-wanda", write_plot=False)
    assert 'from_pretrained("alice/tiny-wanda")' in ctx.variables["usage"]
    assert ctx.variables["model_path"] == "alice/tiny-wanda"


def test_base_model_hub_id_from_the_report_goes_into_the_front_matter(folder: Path) -> None:
    card = str(build_card(_with_base(folder, "meta-llama/Llama-3.1-8B")))
    assert _front_matter(card)["base_model"] == "meta-llama/Llama-3.1-8B"


def test_base_model_of_a_cache_snapshot_is_its_hub_id(folder: Path, tmp_path: Path) -> None:
    snapshot = tmp_path / "hub" / "models--Qwen--Qwen2.5-0.5B" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    card = str(build_card(_with_base(folder, str(snapshot))))
    assert _front_matter(card)["base_model"] == "Qwen/Qwen2.5-0.5B"


@pytest.mark.parametrize("exists", [True, False])
def test_base_model_of_a_local_folder_is_named_in_the_text_only(
    folder: Path, tmp_path: Path, exists: bool
) -> None:
    base = tmp_path / "my-dense-llama"
    if exists:
        base.mkdir()
    card = str(build_card(_with_base(folder, str(base))))
    assert "base_model" not in _front_matter(card)  # the Hub's base_model must be a repo id
    assert "`my-dense-llama` (a local model folder)" in card
    assert str(tmp_path) not in card.split("## Usage")[0]  # no local path in the text


# ------------------------------------------------------------------------------- file modes


@contextlib.contextmanager
def _umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def _modes(root: Path) -> dict[str, int]:
    return {
        p.relative_to(root).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in root.rglob("*") if p.is_file()
    }


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_every_written_file_follows_the_umask(tmp_path: Path, tokenizer, mask: int, mode: int) -> None:
    model = tiny_llama(seed=0, vocab=256)
    model, report = llmpress.compress(model, RECIPE, calib_ids(2, 16, vocab=256), progress=False)
    with _umask(mask):
        out = llmpress.save_compressed(model, tmp_path / "out", tokenizer=tokenizer, report=report)
        save_eval(out, [EvalRecord(task="tiny", metric="acc", value=0.5)])
        write_card(out, build_card(out))
        db = LevelDatabase(
            ["model.layers.0.mlp.up_proj"],
            [(4, 8)],
            {"model": "m", "recipe": "r", "levels": "l", "calibration": "c"},
            tmp_path / "levels",
        )
        db.put(0, [LayerResult(weight=torch.ones(4, 8))], None)
    files = _modes(out) | {f"levels/{k}": v for k, v in _modes(tmp_path / "levels").items()}
    for name in ("model.safetensors", "README.md", "llmpress_eval.json", "config.json", "tokenizer.json"):
        assert name in files
    assert any(k.startswith("levels/unit_") for k in files)
    assert {k: v for k, v in files.items() if v != mode} == {}, f"expected {oct(mode)}"
    assert torch.equal(db.get(0, 0).weight, torch.ones(4, 8))
    assert not list(tmp_path.rglob(".*tmp*"))  # no temporary file left behind


def test_eval_file_keeps_the_umask_when_rewritten(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with _umask(0o027):
        save_eval(tmp_path, [EvalRecord(task="a", metric="acc", value=0.5)])
        save_eval(tmp_path, [EvalRecord(task="b", metric="acc", value=0.25)])
    assert stat.S_IMODE((tmp_path / "llmpress_eval.json").stat().st_mode) == 0o640
