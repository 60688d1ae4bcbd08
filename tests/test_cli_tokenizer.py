"""``--tokenizer PATH_OR_ID`` on ``compress`` and ``eval``, for a model saved without a tokenizer
(the case the CLI could not handle: the Python API's hint ``pass tokenizer=...`` is no use there)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import transformers
from models import DATA_DIR, tiny_llama

from llmpress.cli.main import main

CALIB = DATA_DIR / "calib.txt"
EVAL = DATA_DIR / "eval.txt"


@pytest.fixture(autouse=True)
def _fresh(fresh_plugin_manager: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LLMPRESS_DISABLE_PLUGINS", raising=False)


@pytest.fixture
def bare(tmp_path: Path) -> Path:
    """A tiny Llama (vocab 256) saved with no tokenizer files."""
    path = tmp_path / "bare"
    tiny_llama(seed=0, vocab=256).save_pretrained(path)
    return path


@pytest.fixture
def tok_dir(tmp_path: Path, tokenizer) -> Path:
    """The tests' tokenizer on its own in a folder."""
    path = tmp_path / "tok"
    tokenizer.save_pretrained(path)
    return path


def _error(err: str) -> str:
    """The one ``error:`` line of stderr (progress bars may precede it), no traceback."""
    assert "Traceback" not in err
    (line,) = [ln for ln in err.replace("\r", "\n").splitlines() if ln.startswith("error: ")]
    return line


def _compress(model: Path, tmp_path: Path, *extra: str) -> list[str]:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("stages:\n  - method: wanda\n    sparsity: 0.5\n")
    return ["compress", str(model), "--recipe", str(recipe), "--calib", str(CALIB), "--out",
            str(tmp_path / "out"), "--nsamples", "4", "--seqlen", "32", *extra]  # fmt: skip


def test_compress_without_a_tokenizer_names_the_cli_option(
    bare: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(_compress(bare, tmp_path)) == 2
    assert "--tokenizer PATH_OR_ID" in _error(capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_compress_with_tokenizer_option_saves_it_with_the_result(
    bare: Path, tok_dir: Path, tmp_path: Path, tokenizer
) -> None:
    assert main(_compress(bare, tmp_path, "--tokenizer", str(tok_dir))) == 0
    saved = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")  # the result carries it
    text = CALIB.read_text()[:200]
    assert saved(text)["input_ids"] == tokenizer(text)["input_ids"]


def test_eval_without_a_tokenizer_names_the_cli_option(
    bare: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["eval", str(bare), "--text", str(EVAL), "--seqlen", "32", "--no-save"]) == 2
    assert "--tokenizer PATH_OR_ID" in _error(capsys.readouterr().err)


def test_eval_with_tokenizer_option(
    bare: Path, tok_dir: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The same weights with the same tokenizer, whether it comes from the folder or the option."""
    args = ["--text", str(EVAL), "--seqlen", "32", "--json", "--no-save"]
    assert main(["eval", str(bare), "--tokenizer", str(tok_dir), *args]) == 0
    with_option = json.loads(capsys.readouterr().out)
    assert main(["eval", str(tiny_model_dir), *args]) == 0
    own = json.loads(capsys.readouterr().out)
    assert math.isfinite(with_option["perplexity"])
    assert with_option["perplexity"] == pytest.approx(own["perplexity"], rel=1e-5)


def test_bad_tokenizer_option_is_one_error_line(
    bare: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["eval", str(bare), "--text", str(EVAL), "--tokenizer", str(tmp_path / "nope")]) == 2
    assert _error(capsys.readouterr().err).startswith("error: --tokenizer")
    assert main(_compress(bare, tmp_path, "--tokenizer", str(tmp_path / "nope"))) == 2
    assert _error(capsys.readouterr().err).startswith("error: --tokenizer")
    assert not (tmp_path / "out").exists()
