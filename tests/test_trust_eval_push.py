"""Nothing silently wrong: NaN/inf evaluation results are refused, pushes without weights or with a
NaN card publish nothing, and connections dropped mid-upload are retried or end in a clear error."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import re
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import huggingface_hub.lfs
import pytest
import torch
from huggingface_hub import HfApi, hf_hub_download
from localhub import LocalHubServer
from models import DATA_DIR, save_model_dir, tiny_llama

from llmpress.cli.eval_harness import EVAL_FILE, EvalRecord, _records, evaluate, load_eval, save_eval
from llmpress.cli.evaluate import perplexity
from llmpress.cli.main import main
from llmpress.errors import EvalTaskError, LlmpressError
from llmpress.hub import PublishError, build_card, push
from llmpress.hub.publish import _transient

EVAL = DATA_DIR / "eval.txt"
TASKS = DATA_DIR / "lm_eval_tasks"
LFS_UPLOAD, COMMIT = "/__lfs__/upload/", "/commit/"


# --------------------------------------------------------------------------------- helpers


def _broken_llama(value: float) -> torch.nn.Module:
    """A tiny Llama whose final norm weight is ``value`` (NaN or inf): every logit is NaN/inf."""
    model = tiny_llama(seed=0, vocab=256)
    with torch.no_grad():
        model.model.norm.weight.fill_(value)
    return model


@pytest.fixture(scope="module")
def nan_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer) -> Path:
    """A saved checkpoint whose logits are all NaN (a damaged checkpoint)."""
    return save_model_dir(tmp_path_factory.mktemp("nan") / "nan-llama", _broken_llama(math.nan), tokenizer)


@pytest.fixture(scope="module")
def sound_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer) -> Path:
    """A saved tiny Llama (config, safetensors, tokenizer) with a finite perplexity result."""
    path = save_model_dir(tmp_path_factory.mktemp("sound") / "tiny", tiny_llama(seed=0, vocab=256), tokenizer)
    save_eval(path, [EvalRecord("eval.txt", "perplexity", 300.0, dataset="eval.txt", source="test")])
    return path


@pytest.fixture
def folder(sound_dir: Path, tmp_path: Path) -> Path:
    """A private copy of :func:`sound_dir` (pushing writes the card into it)."""
    return Path(shutil.copytree(sound_dir, tmp_path / "tiny"))


def _error_lines(err: str) -> list[str]:
    """The ``error: ...`` lines of the CLI's stderr (a progress bar may precede one on its line)."""
    return re.findall(r"error: [^\r\n]*", err)


def _commits(repo_id: str) -> int:
    return len(HfApi().list_repo_commits(repo_id))


# ------------------------------------------------------------------------------ evaluation


def test_eval_refuses_nan_perplexity(nan_dir: Path, tokenizer, capsys) -> None:
    assert main(["eval", str(nan_dir), "--text", str(EVAL), "--seqlen", "32", "--json"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    (line,) = _error_lines(err)
    assert "perplexity" in line and "NaN" in line and "--dtype float32" in line and "checkpoint" in line
    assert not (nan_dir / EVAL_FILE).exists()
    with pytest.raises(EvalTaskError, match=r"perplexity: the model produces NaN/inf .*logits contain NaN"):
        evaluate(_broken_llama(math.nan), tokenizer, text=EVAL, seqlen=32, save_to=nan_dir)
    assert not (nan_dir / EVAL_FILE).exists()


def test_eval_refuses_inf_perplexity(tokenizer) -> None:
    with pytest.raises(EvalTaskError, match=r"NaN/inf .*fp16 can overflow"):
        perplexity(_broken_llama(math.inf), tokenizer, EVAL, seqlen=32)


def test_eval_refuses_nan_lm_eval_results(nan_dir: Path, capsys, monkeypatch) -> None:
    """A NaN model would score a finite, meaningless accuracy: its logits are checked first."""
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    args = ["eval", str(nan_dir), "--tasks", "tiny_mc", "--limit", "2", "--include-path", str(TASKS)]
    assert main(args) == 2
    (line,) = _error_lines(capsys.readouterr().err)
    assert "lm-eval ['tiny_mc']" in line and "NaN" in line and "--dtype float32" in line
    assert not (nan_dir / EVAL_FILE).exists()


def test_lm_eval_records_refuse_non_finite_metrics() -> None:
    results = {"results": {"tiny_mc": {"acc,none": math.nan, "acc_stderr,none": 0.1, "alias": "tiny_mc"}}}
    with pytest.raises(EvalTaskError, match=r"lm-eval: the model produces NaN/inf: tiny_mc acc = nan"):
        _records(results, None)
    results = {"results": {"tiny_mc": {"acc,none": 0.5, "acc_stderr,none": math.nan}}}
    (record,) = _records(results, None)  # a NaN stderr (one document) is dropped, not recorded
    assert (record.value, record.stderr) == (0.5, None)


def test_save_eval_refuses_non_finite_values(tmp_path: Path) -> None:
    save_eval(tmp_path, [EvalRecord("a", "acc", 0.5)])
    before = (tmp_path / EVAL_FILE).read_text()
    for bad in (EvalRecord("t", "perplexity", math.nan), EvalRecord("t", "acc", 0.5, stderr=math.inf)):
        with pytest.raises(EvalTaskError, match=r"refusing to save .*t (perplexity|acc) = (nan|0.5 ± inf)"):
            save_eval(tmp_path, [EvalRecord("ok", "acc", 0.1), bad])
    assert (tmp_path / EVAL_FILE).read_text() == before  # nothing written
    assert [p.name for p in tmp_path.iterdir()] == [EVAL_FILE]  # no temporary file left


def test_load_eval_refuses_a_file_with_non_finite_values(tmp_path: Path) -> None:
    rows = [
        {"task": "eval.txt", "metric": "perplexity", "value": math.nan},
        {"task": "b", "metric": "acc", "value": 1},
    ]
    (tmp_path / EVAL_FILE).write_text(json.dumps({"version": 1, "results": rows}))  # NaN: not strict JSON
    with pytest.raises(
        EvalTaskError, match=rf"{EVAL_FILE} holds .*not finite numbers: eval.txt perplexity = nan"
    ):
        load_eval(tmp_path)
    with pytest.raises(EvalTaskError, match="eval.txt perplexity = nan"):  # a bad entry it would keep
        save_eval(tmp_path, [EvalRecord("c", "acc", 0.5)])
    save_eval(tmp_path, [EvalRecord("eval.txt", "perplexity", 12.5)])  # re-evaluated: the bad entry replaced
    assert {r.key: r.value for r in load_eval(tmp_path)} == {
        ("eval.txt", "perplexity"): 12.5,
        ("b", "acc"): 1,
    }
    assert "NaN" not in (tmp_path / EVAL_FILE).read_text()
    (tmp_path / EVAL_FILE).write_text('{"results": [')
    with pytest.raises(EvalTaskError, match="not valid JSON"):
        load_eval(tmp_path)


# ------------------------------------------------------------------------ push: refusals


def test_push_refuses_folder_without_weights(
    local_hub: LocalHubServer, folder: Path, tmp_path, capsys
) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(folder / "config.json", bare)
    with pytest.raises(PublishError, match=r"holds no weights \(no \*\.safetensors .*nothing was published"):
        push(bare, "local-user/bare")
    assert main(["push", str(bare), "local-user/bare"]) == 2
    (line,) = _error_lines(capsys.readouterr().err)
    assert "no weights" in line
    (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
    index = {
        "metadata": {},
        "weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"},
    }
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(
        PublishError, match=r"missing shard\(s\) model-00002-of-00002.safetensors; nothing was"
    ):
        push(folder, "local-user/bare")
    assert local_hub.request_log == []  # nothing created on the Hub
    assert not HfApi().repo_exists("local-user/bare")


def test_push_refuses_card_with_nan_results(local_hub: LocalHubServer, folder: Path) -> None:
    rows = [{"task": "eval.txt", "metric": "perplexity", "value": math.nan, "dataset": "eval.txt"}]
    (folder / EVAL_FILE).write_text(json.dumps({"version": 1, "results": rows}))
    with pytest.raises(
        PublishError, match=r"model-index\) hold non-finite .*eval.txt perplexity = nan; nothing"
    ):
        push(folder, "local-user/nan-card")
    with pytest.raises(PublishError, match="eval.txt perplexity = nan"):
        build_card(folder)
    card = (
        "---\nmodel-index:\n- name: tiny\n  results:\n  - task: {type: text-generation}\n"
        "    dataset: {name: wikitext, type: wikitext}\n    metrics:\n    - {type: perplexity, value: .inf}\n"
        "---\n# tiny\n"
    )
    with pytest.raises(PublishError, match=r"\(model-index\) hold non-finite .*wikitext perplexity = inf"):
        push(folder, "local-user/nan-card", card=card)
    assert local_hub.request_log == []
    assert not HfApi().repo_exists("local-user/nan-card")


# ---------------------------------------------------------------------- push: dropped connections


@pytest.fixture
def restarting_hub(local_hub: LocalHubServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[LocalHubServer]:
    """The local Hub, started again each time an injected crash stops it (a dropped connection,
    not a dead server); huggingface_hub's own retries of LFS requests are turned off, so that a
    dropped LFS upload reaches llmpress as the ``RuntimeError`` that huggingface_hub wraps it in."""
    monkeypatch.setattr(
        huggingface_hub.lfs,
        "http_backoff",
        functools.partial(huggingface_hub.utils.http_backoff, max_retries=0),
    )
    done = threading.Event()

    def watch() -> None:
        while not done.wait(0.01):
            # `_thread` is cleared at the very end of stop(): only then can the port be bound again
            if not local_hub.running and getattr(local_hub, "_thread", None) is None:
                with contextlib.suppress(OSError):
                    local_hub.start()

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    yield local_hub
    done.set()
    thread.join()


@pytest.mark.parametrize("path", [LFS_UPLOAD, COMMIT])
def test_push_retries_a_dropped_connection_mid_upload(
    restarting_hub: LocalHubServer, folder: Path, path: str, caplog
) -> None:
    caplog.set_level(logging.WARNING, logger="llmpress.hub.publish")
    restarting_hub.fail_next(1, paths_containing=path, crash=True)
    info = push(folder, "local-user/dropped", retries=3, backoff=1.0)
    assert re.search(r"upload failed \((RemoteProtocolError|ReadError)\); retry 1/2", caplog.text), (
        caplog.text
    )
    assert _commits("local-user/dropped") == 2 and info.oid
    remote = hf_hub_download("local-user/dropped", "model.safetensors")
    assert Path(remote).read_bytes() == (folder / "model.safetensors").read_bytes()


@pytest.mark.parametrize("path", [LFS_UPLOAD, COMMIT])
def test_push_persistent_drops_end_in_publish_error_and_publish_nothing(
    restarting_hub: LocalHubServer, folder: Path, path: str, capsys
) -> None:
    restarting_hub.fail_next(100, paths_containing=path, crash=True)
    message = (
        rf"upload: the connection to {re.escape(restarting_hub.url)} dropped .* after 2 attempt\(s\)\. "
        r"Nothing was published: a Hub commit is atomic.*re-running the same command resumes the upload "
        r"\(files already uploaded through LFS are skipped\)"
    )
    with pytest.raises(PublishError, match=message):
        push(folder, "local-user/down", retries=2, backoff=1.0)
    assert main(["push", str(folder), "local-user/down", "--retries", "1"]) == 2
    (line,) = _error_lines(capsys.readouterr().err)
    assert "Nothing was published" in line
    assert _commits("local-user/down") == 1  # the repo's creation only
    assert HfApi().list_repo_files("local-user/down") == [".gitattributes"]

    restarting_hub.clear_failures()
    seen = len(restarting_hub.request_log)
    push(folder, "local-user/down")  # the same command again completes it
    uploads = [r for r in restarting_hub.request_log[seen:] if LFS_UPLOAD in r.path]
    assert uploads == [] if path == COMMIT else len(uploads) == 1  # uploaded LFS files are skipped
    assert _commits("local-user/down") == 2


def test_connection_errors_wrapped_by_huggingface_hub_are_transient() -> None:
    import httpx2
    import requests

    def wrapped(cause: BaseException, context: bool = False) -> RuntimeError:
        try:
            try:
                raise cause
            except Exception as e:
                if context:
                    raise RuntimeError("Error while uploading 'model.safetensors' to the Hub.")  # noqa: B904
                raise RuntimeError("Error while uploading 'model.safetensors' to the Hub.") from e
        except RuntimeError as outer:
            return outer

    assert _transient(wrapped(httpx2.RemoteProtocolError("Server disconnected")))
    assert _transient(wrapped(requests.ConnectionError("reset"), context=True))
    assert not _transient(wrapped(ValueError("bad file")))
    assert not _transient(RuntimeError("no cause"))
    assert isinstance(PublishError("x"), LlmpressError)
