"""``llmpress eval`` refuses what it cannot evaluate soundly (issue 18, items 5, 6, 10, 13, 14):
windows past the model's positions, unreadable or too short text, a base model that is not
comparable, a mistyped folder; and lm-eval runs with a tokenizer that has no BOS/EOS token."""

from __future__ import annotations

import copy
import json
import logging
import re
from pathlib import Path

import pytest
import torch
import transformers
from models import DATA_DIR, save_model_dir, tiny_llama, tiny_mistral, train_tokenizer

import llmpress.format.loading
from llmpress.cli.eval_harness import EVAL_FILE
from llmpress.cli.evaluate import perplexity, perplexity_of_windows
from llmpress.cli.main import main
from llmpress.errors import CalibrationError, EvalTaskError, ModelError
from llmpress.format.loading import load_model
from llmpress.format.save import REPORT_FILE

EVAL = DATA_DIR / "eval.txt"
CALIB = DATA_DIR / "calib.txt"
TASKS = DATA_DIR / "lm_eval_tasks"
RECIPE = "stages:\n  - method: magnitude\n    sparsity: 0.5\n"


def _error_line(err: str) -> str:
    """The CLI's one ``error: ...`` line (a progress bar may precede it on its line), no traceback."""
    assert "Traceback" not in err
    (line,) = re.findall(r"error: [^\r\n]*", err)
    return line


@pytest.fixture
def loads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The paths ``load_model`` is called with (the CLI loads models only through it)."""
    calls: list[str] = []
    real = llmpress.format.loading.load_model
    monkeypatch.setattr(
        llmpress.format.loading, "load_model", lambda p, **kw: calls.append(str(p)) or real(p, **kw)
    )
    return calls


@pytest.fixture(scope="module")
def short_model(tmp_path_factory: pytest.TempPathFactory, tokenizer) -> Path:
    """A saved tiny Llama that has 64 positions."""
    path = tmp_path_factory.mktemp("short") / "llama-64"
    return save_model_dir(path, tiny_llama(seed=0, vocab=256, max_position_embeddings=64), tokenizer)


# ------------------------------------------------------------- 5: past the model's positions


def test_eval_refuses_seqlen_past_the_model_positions(short_model: Path, loads: list[str], capsys) -> None:
    assert main(["eval", str(short_model), "--text", str(EVAL), "--seqlen", "128"]) == 2
    line = _error_line(capsys.readouterr().err)
    assert "--seqlen 128 exceeds the model's 64 positions; use --seqlen 64 or less" in line
    assert loads == [] and not (short_model / EVAL_FILE).exists()  # refused before loading the model
    assert main(["eval", str(short_model), "--text", str(EVAL), "--seqlen", "64", "--no-save"]) == 0
    assert "windows of 64 tokens" in capsys.readouterr().out


def test_perplexity_api_refuses_seqlen_past_the_model_positions(tokenizer) -> None:
    model = tiny_llama(seed=0, vocab=256, max_position_embeddings=64)
    with pytest.raises(ModelError, match="seqlen 128 exceeds the model's 64 positions"):
        perplexity(model, tokenizer, EVAL, seqlen=128)
    with pytest.raises(ModelError, match="seqlen 65 exceeds the model's 64 positions"):
        perplexity_of_windows(model, torch.zeros(2, 65, dtype=torch.long))
    assert perplexity(model, tokenizer, EVAL, seqlen=64, max_tokens=256)["windows"] == 4


# ---------------------------------------------------------------- 10: text eval cannot use


@pytest.mark.parametrize(
    ("content", "seqlen", "expected", "before_loading"),
    [
        (b"", "32", "evaluation source '.*' holds no text", True),
        (b"  \n\n ", "32", "holds no text", True),
        (bytes(range(256)) * 8, "32", "is not UTF-8 text \\(a binary file\\?\\)", True),
        (b"text\x00with a NUL byte " * 40, "32", "holds NUL bytes", True),
        (b"hello world", "32", "has [0-9]+ tokens, fewer than one window of 32; give more text", False),
        (EVAL.read_bytes(), "100000", "--seqlen 100000 exceeds the model's 256 positions", True),
        (EVAL.read_bytes(), "1", "--seqlen 1: a window needs at least 2 tokens", True),
    ],
    ids=["empty", "blank", "binary", "nul", "short", "seqlen-100000", "seqlen-1"],
)
def test_eval_refuses_text_it_cannot_evaluate(
    tiny_model_dir: Path, tmp_path: Path, loads: list[str], capsys, content, seqlen, expected, before_loading
) -> None:
    text = tmp_path / "eval.txt"
    text.write_bytes(content)
    assert main(["eval", str(tiny_model_dir), "--text", str(text), "--seqlen", seqlen, "--no-save"]) == 2
    assert re.search(expected, _error_line(capsys.readouterr().err))
    assert (loads == []) is before_loading


def test_eval_refuses_a_missing_text_file_and_max_tokens_under_a_window(
    tiny_model_dir: Path, tmp_path: Path, loads: list[str], capsys
) -> None:
    assert main(["eval", str(tiny_model_dir), "--text", str(tmp_path / "nope.txt")]) == 2
    assert "evaluation file" in _error_line(capsys.readouterr().err)
    args = ["eval", str(tiny_model_dir), "--text", str(EVAL), "--seqlen", "32", "--max-tokens", "16"]
    assert main(args) == 2
    assert "--max-tokens 16 is fewer than one window of --seqlen 32" in _error_line(capsys.readouterr().err)
    assert loads == []


def test_perplexity_api_refuses_text_shorter_than_a_window(tokenizer) -> None:
    model = tiny_llama(seed=0, vocab=256)
    with pytest.raises(CalibrationError, match="fewer than one window of 32"):
        perplexity(model, tokenizer, "hello world", seqlen=32)


# ------------------------------------------------------------------ 14: a mistyped folder


def test_load_model_names_a_missing_local_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    (tmp_path / "weights.bin").write_bytes(b"x")
    for name in (str(tmp_path / "nope"), "./nope-dir", "~/surely-not-a-folder-llmpress", "models/llama"):
        with pytest.raises(ModelError, match=r"^no such folder: .* does not exist\); check the path"):
            load_model(name)
    with pytest.raises(ModelError, match="is a file, not a model folder"):
        load_model("weights.bin")
    with pytest.raises(ModelError, match="holds no config.json"):
        load_model("models")


def test_eval_and_compress_name_a_missing_folder(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["eval", "./nope-dir", "--text", str(EVAL)]) == 2
    assert "error: no such folder: ./nope-dir" in _error_line(capsys.readouterr().err)
    (tmp_path / "r.yaml").write_text(RECIPE)
    args = ["compress", "./nope-dir", "--recipe", "r.yaml", "--calib", str(CALIB), "--out", "o"]
    assert main(args) == 2
    assert "error: no such folder: ./nope-dir" in _error_line(capsys.readouterr().err)
    assert not (tmp_path / "o").exists()


def test_an_unreachable_hub_id_gives_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    """``nope-dir`` may be a Hub id (like ``gpt2``): both readings are named, on one line."""
    monkeypatch.chdir(tmp_path)

    def offline(*args, **kwargs):  # noqa: ANN002, ANN003
        raise OSError("We couldn't connect to 'https://huggingface.co'.\nCheck your internet connection.")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", offline)
    assert main(["eval", "nope-dir", "--text", str(EVAL)]) == 2
    line = _error_line(capsys.readouterr().err)
    assert line.startswith("error: no such folder: nope-dir") and "couldn't connect" in line
    assert "HF_HUB_OFFLINE" in line


# ---------------------------------------------------------------- 6: --baseline comparable


@pytest.fixture(scope="module")
def compressed(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """A model compressed from ``./tiny-llama`` (a relative path), run from the base's parent folder."""
    work = tmp_path_factory.mktemp("compressed")
    (work / "r.yaml").write_text(RECIPE)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tiny_model_dir.parent)
        args = [
            "compress",
            f"./{tiny_model_dir.name}",
            "--recipe",
            str(work / "r.yaml"),
            "--out",
            str(work / "out"),
        ]
        assert main([*args, "--calib", str(CALIB), "--nsamples", "4", "--seqlen", "32"]) == 0
    return work / "out"


def _eval_args(folder: Path, *extra: str) -> list[str]:
    text = ["--text", str(EVAL), "--seqlen", "32", "--max-tokens", "128"]
    return ["eval", str(folder), *text, "--json", *extra]


def test_report_stores_a_local_base_model_resolved(
    compressed: Path, tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    report = json.loads((compressed / REPORT_FILE).read_text())
    assert report["base_model"] == str(tiny_model_dir.resolve())
    monkeypatch.chdir(tmp_path)  # elsewhere: the recorded base model is still found
    assert main([*_eval_args(compressed, "--no-save"), "--baseline"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["base_model"] == str(tiny_model_dir.resolve()) and "baseline_note" not in res
    assert res["recovery"][f"{EVAL.name}/perplexity"] > 0


def test_baseline_recorded_as_a_missing_relative_path_is_refused_first(
    compressed: Path, tmp_path: Path, loads: list[str], capsys
) -> None:
    folder = tmp_path / "old"
    folder.mkdir()
    for f in compressed.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    report = json.loads((folder / REPORT_FILE).read_text())
    (folder / REPORT_FILE).write_text(json.dumps({**report, "base_model": "./dense-llama-tok"}))
    assert main([*_eval_args(folder), "--baseline"]) == 2
    line = _error_line(capsys.readouterr().err)
    assert f"the base model recorded in {folder / REPORT_FILE}: no such folder: ./dense-llama-tok" in line
    assert "--baseline MODEL" in line
    assert loads == [] and not (folder / EVAL_FILE).exists()  # the compressed model was not evaluated


def test_baseline_with_another_vocabulary_is_refused_first(
    compressed: Path, tmp_path: Path, loads: list[str], capsys
) -> None:
    other = save_model_dir(tmp_path / "other-vocab", tiny_llama(seed=0, vocab=128), train_tokenizer(128))
    assert main([*_eval_args(compressed, "--no-save"), "--baseline", str(other)]) == 2
    line = _error_line(capsys.readouterr().err)
    assert f"base model {other} does not share this model's tokenizer (vocabularies of" in line
    assert loads == []


def test_baseline_with_another_architecture_is_named(
    compressed: Path, tokenizer, tmp_path: Path, capsys
) -> None:
    mistral = save_model_dir(tmp_path / "mistral", tiny_mistral(seed=0, vocab_size=256), tokenizer)
    assert main([*_eval_args(compressed, "--no-save"), "--baseline", str(mistral)]) == 0
    res = json.loads(capsys.readouterr().out)
    note = f"the base model {mistral} is a MistralForCausalLM, this model a LlamaForCausalLM"
    assert res["baseline_note"] == note
    args = [a for a in _eval_args(compressed, "--no-save") if a != "--json"]
    assert main([*args, "--baseline", str(mistral)]) == 0
    out = capsys.readouterr().out
    assert "recovery" in out and "note: the base model" in out and "MistralForCausalLM" in out


# ---------------------------------------------------- 13: a tokenizer without special tokens


@pytest.fixture(scope="module")
def bare(tokenizer) -> transformers.PreTrainedTokenizerFast:
    """The tests' tokenizer with no BOS, EOS, PAD or UNK token (same vocabulary)."""
    from tokenizers import Tokenizer

    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    )
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) == (None,) * 4
    return tok


def _bare_llama() -> torch.nn.Module:
    return tiny_llama(seed=1, vocab=256, bos_token_id=None, eos_token_id=None, pad_token_id=None)


def test_lm_eval_runs_with_a_tokenizer_without_special_tokens(
    bare, tokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog, capsys
) -> None:
    pytest.importorskip("lm_eval")
    from llmpress.cli.eval_harness import run_lm_eval

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    model = _bare_llama()
    with caplog.at_level(logging.WARNING, logger="llmpress.cli.eval_harness"):
        got = run_lm_eval(model, bare, ["tiny_mc"], limit=4, include_path=[TASKS], batch_size=4)
    assert "the tokenizer has no BOS or EOS token" in caplog.text and "on token id 0" in caplog.text
    assert "generation tasks are refused" in caplog.text
    assert bare.pad_token_id is None and len(bare) == len(tokenizer)  # the caller's tokenizer unchanged
    # a multiple-choice task never reads the prefix token: the same scores as with the full tokenizer
    ref = run_lm_eval(model, tokenizer, ["tiny_mc"], limit=4, include_path=[TASKS], batch_size=4)
    assert [(r.key, r.samples) for r in got] == [(r.key, r.samples) for r in ref]
    assert [r.value for r in got] == pytest.approx([r.value for r in ref], abs=1e-6)
    # the CLI on a saved folder
    folder = save_model_dir(tmp_path / "bare", model, bare)
    args = ["--tasks", "tiny_mc", "--limit", "2", "--include-path", str(TASKS), "--no-save"]
    assert main(["eval", str(folder), *args]) == 0
    assert "tiny_mc acc" in capsys.readouterr().out


def test_lm_eval_generation_without_an_eos_token_is_refused(
    bare, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("lm_eval")
    from llmpress.cli.eval_harness import run_lm_eval

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    rows = [{"question": "Two plus two is", "answer": "four"}, {"question": "The sky is", "answer": "blue"}]
    (tmp_path / "gen.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "tiny_gen.yaml").write_text(
        "task: tiny_gen\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {tmp_path / 'gen.jsonl'}\ntest_split: test\noutput_type: generate_until\n"
        'doc_to_text: "{{question}}"\ndoc_to_target: "{{answer}}"\n'
        'generation_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 2\n'
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
    )
    bos_only = copy.deepcopy(bare)
    bos_only.bos_token = bos_only.convert_ids_to_tokens(0)
    for tok in (bare, bos_only):
        with pytest.raises(EvalTaskError, match="generation tasks need an end-of-sequence token"):
            run_lm_eval(_bare_llama(), tok, ["tiny_gen"], limit=2, include_path=[tmp_path])
