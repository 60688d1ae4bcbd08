"""``llmpress demo``: every configuration runs, saves, reloads identically and gets a card;
at the default size the numbers show the orderings the papers lead users to expect."""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
from pathlib import Path

import pytest
import torch

from llmpress.cli import demo
from llmpress.cli.demo import DemoConfig, DemoResult, demo_cases, format_table, orderings, run_demo
from llmpress.cli.main import main

#: a demo small enough for a test: the same steps, a smaller model, fewer tokens
SMALL = DemoConfig(hidden_size=64, intermediate_size=128, steps=20, nsamples=8, eval_tokens=2048)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("demo-cache")


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory, cache: Path) -> DemoResult:
    return run_demo(tmp_path_factory.mktemp("demo") / "out", SMALL, cache_dir=cache, progress=False)


def test_every_configuration_is_a_row(small: DemoResult) -> None:
    expect = [("dense", "-", None)] + [(c.name, c.pattern, c.bits) for c in demo_cases()]
    assert [(r.name, r.pattern, r.bits) for r in small.rows] == expect
    assert {("magnitude", "50%"), ("wanda", "2:4"), ("sparsegpt", "2:4")} <= {
        (r.name, r.pattern) for r in small.rows
    }
    assert {r.bits for r in small.rows} == {None, 3, 4}
    for r in small.rows:
        assert torch.isfinite(torch.tensor(r.ppl)) and r.ppl > 1, r
        assert r.folder.parent == small.out and (r.folder / "config.json").is_file(), r
        assert r.sparsity == pytest.approx(0.5 if r.pattern != "-" else 0.0, abs=1e-3), r
        evaluation = json.loads((r.folder / "llmpress_eval.json").read_text())["results"][0]
        assert evaluation["metric"] == "perplexity" and evaluation["value"] == pytest.approx(r.ppl)


def test_every_result_reloads_identically(small: DemoResult) -> None:
    """Plain ``from_pretrained`` gives exactly the in-memory model's logits (after
    ``to_runtime`` for the packed ones)."""
    assert [r.reload for r in small.rows] == ["identical"] * len(small.rows)


def test_quantized_results_are_packed_and_smaller(small: DemoResult) -> None:
    dense = small.rows[0]
    for r in small.rows[1:]:
        config = json.loads((r.folder / "config.json").read_text())
        assert ("quantization_config" in config) == (r.bits is not None), r
        if r.bits is None:  # a plain fp32 checkpoint: pruned weights are stored as zeros
            assert r.size_mb == dense.size_mb, r  # weights only: the report does not count
        else:
            assert r.size_mb < 0.5 * dense.size_mb, r


def test_model_card_is_written(small: DemoResult) -> None:
    assert small.card == small.rows[-1].folder / "README.md" and small.card.is_file()
    text = small.card.read_text()
    assert text.startswith("---") and "SparseGPT" in text and "GPTQ" in text
    assert demo.EVAL_TASK in text  # the held-out perplexity is in the card's results


def test_table_has_one_line_per_row(small: DemoResult) -> None:
    lines = format_table(small.rows).splitlines()
    assert lines[0].split() == [
        "method",
        "pattern",
        "bits",
        "sparsity",
        "perplexity",
        "weights",
        "MB",
        "reload",
        "time",
    ]
    assert len(lines) == 2 + len(small.rows)
    assert all(r.name in line and f"{r.ppl:.3f}" in line for r, line in zip(small.rows, lines[2:]))


def test_every_folder_has_its_tokenizer(small: DemoResult) -> None:
    """Saved with each result, it loads with ``AutoTokenizer`` and gives the demo's byte ids."""
    from transformers import AutoTokenizer

    text = "def f(x):\n    return 'é' + x  # ok\n"
    for r in small.rows:
        tok = AutoTokenizer.from_pretrained(r.folder)
        assert tok(text, add_special_tokens=False)["input_ids"] == list(text.encode()), r
        assert tok.decode(list(text.encode())) == text


def test_cli_compresses_and_evaluates_demo_folders(
    small: DemoResult, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``llmpress compress`` and ``llmpress eval --text`` on the demo's folders (they failed
    for want of a tokenizer)."""
    text = tmp_path / "held.txt"
    text.write_text(demo.split_corpus(demo.demo_corpus())[1][:4000])
    recipe = tmp_path / "r.yaml"
    recipe.write_text("stages:\n  - method: wanda\n    sparsity: 0.5\n")
    dense, packed = small.rows[0].folder, small.rows[-1].folder
    out = tmp_path / "again"
    args = [
        "--recipe",
        str(recipe),
        "--calib",
        str(text),
        "--out",
        str(out),
        "--nsamples",
        "4",
        "--seqlen",
        "64",
    ]
    assert main(["compress", str(dense), *args]) == 0
    for folder in (packed, out):
        assert main(["eval", str(folder), "--text", str(text), "--seqlen", "64", "--json", "--no-save"]) == 0
        assert json.loads(capsys.readouterr().out.splitlines()[-1])["perplexity"] > 1


def test_cached_model_gives_the_same_numbers(
    small: DemoResult, cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second run takes the trained model from the cache and computes the same table."""

    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("the cached demo model should have been used")

    monkeypatch.setattr(demo, "train_demo_model", no_training)
    again = run_demo(tmp_path / "again", SMALL, cache_dir=cache, progress=False)
    assert [(r.name, r.ppl, r.reload) for r in again.rows] == [(r.name, r.ppl, r.reload) for r in small.rows]


def test_training_is_deterministic() -> None:
    cfg = dataclasses.replace(SMALL, steps=3)
    text = demo.split_corpus(demo.demo_corpus())[0]
    a, b = (demo.train_demo_model(text, cfg).state_dict() for _ in range(2))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cache_key_follows_corpus_and_config() -> None:
    assert SMALL.cache_key("abc") == SMALL.cache_key("abc")
    assert SMALL.cache_key("abc") != SMALL.cache_key("abd")
    assert SMALL.cache_key("abc") != dataclasses.replace(SMALL, steps=21).cache_key("abc")


def test_corpus_is_fixed_stdlib_source_split_into_held_out() -> None:
    """Not llmpress's own source: the demo's numbers must not move when llmpress's code does."""
    text = demo.demo_corpus()
    assert "class ArgumentParser(" in text and "def dataclass(" in text and "def rmtree(" in text
    assert "def run_demo(" not in text
    train, held = demo.split_corpus(text)
    assert train + held == text and len(held) == pytest.approx(0.1 * len(text), abs=1)


def test_quiet_restores_logging_and_progress_bars() -> None:
    import huggingface_hub.utils as hf_utils
    from transformers.utils import logging as tf_logging

    llm = logging.getLogger("llmpress")
    before = (llm.level, tf_logging.get_verbosity(), tf_logging.is_progress_bar_enabled())
    hub_before = hf_utils.are_progress_bars_disabled()
    with demo.quiet():
        assert llm.getEffectiveLevel() >= logging.WARNING and not tf_logging.is_progress_bar_enabled()
    assert (llm.level, tf_logging.get_verbosity(), tf_logging.is_progress_bar_enabled()) == before
    assert hf_utils.are_progress_bars_disabled() == hub_before


def test_cli_prints_one_table_and_where_things_are(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(demo, "DEFAULT_CONFIG", SMALL)
    monkeypatch.setattr(demo, "default_cache_dir", lambda: cache)
    out = tmp_path / "cli"
    assert main(["demo", "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    lines = stdout.splitlines()
    assert sum(line.startswith("method") for line in lines) == 1
    rows = [line for line in lines if line.split()[-2:-1] == ["identical"]]  # the reload column
    assert len(rows) == 1 + len(demo_cases())
    assert (
        f"results:    {out}" in stdout
        and f"model card: {out / 'sparsegpt-gptq-2of4-w4' / 'README.md'}" in stdout
    )
    assert "INFO" not in stdout
    assert "bits        32: the fp32 weights" in stdout and "held-out" in stdout  # the legend
    assert "kept" not in stdout  # --out: the user chose the folder


def test_cli_without_out_says_where_results_are_kept(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without ``--out`` the results go to a new temporary folder, which stays (the card and the
    models are in it) and is named as kept."""
    monkeypatch.setattr(demo, "DEFAULT_CONFIG", SMALL)
    monkeypatch.setattr(demo, "default_cache_dir", lambda: cache)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert main(["demo"]) == 0
    (line,) = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("results:")]
    folder = Path(line.split()[1])
    assert folder.parent == tmp_path and (folder / "dense-llama" / "config.json").is_file()
    assert "kept" in line and "--out DIR" in line


def _rows(ppl: dict[tuple[str, str, int | None], float]) -> list[demo.DemoRow]:
    return [
        demo.DemoRow(n, pat, bits, 0.0, v, 0.0, "identical", 0.0, Path()) for (n, pat, bits), v in ppl.items()
    ]


#: the default demo's perplexities natively on an AVX-512 Xeon (rounded)
MEASURED = {
    ("dense", "-", None): 5.325,
    ("magnitude", "50%", None): 5.630,
    ("magnitude", "2:4", None): 6.091,
    ("wanda", "50%", None): 5.546,
    ("wanda", "2:4", None): 6.025,
    ("sparsegpt", "50%", None): 5.392,
    ("sparsegpt", "2:4", None): 5.559,
    ("rtn", "-", 4): 5.359,
    ("rtn", "-", 3): 5.416,
    ("gptq", "-", 4): 5.331,
    ("gptq", "-", 3): 5.331,
    ("sparsegpt+gptq", "2:4", 4): 5.567,
}


def test_orderings_need_a_clear_gap_and_leave_wanda_against_magnitude_out() -> None:
    """An ordering holds when the better method's increase over dense is at most CLEAR_GAP of the
    worse one's: a near tie does not count either way, and Wanda against magnitude (a near tie
    on this model, flipped by the CPU's instruction set: 5.550 against 5.520 on an AMD EPYC)
    is not checked."""
    checks = orderings(_rows(MEASURED))
    assert all(c.holds for c in checks) and len(checks) == 7
    assert not any("magnitude" in c.claim and "Wanda" in c.claim for c in checks)
    flipped = orderings(_rows({**MEASURED, ("wanda", "50%", None): 5.650}))  # Wanda worse than magnitude
    assert all(c.holds for c in flipped)
    (gptq,) = [c for c in checks if c.claim == "GPTQ < RTN at 3-bit"]
    assert gptq.ratio == pytest.approx((5.331 - 5.325) / (5.416 - 5.325))
    tie = orderings(_rows({**MEASURED, ("gptq", "-", 3): 5.410}))  # better, but only by the last digits
    assert [c.claim for c in tie if not c.holds] == ["GPTQ < RTN at 3-bit"]
    text = demo.format_orderings(_rows(MEASURED))
    assert text.count("holds ") == 7 and "Wanda against magnitude is not checked" in text


@pytest.mark.slow
def test_default_demo_shows_the_expected_orderings(tmp_path: Path) -> None:
    """At the real size (about two minutes): every ordering the papers predict holds with a clear
    gap (no last-digit decisions), whichever instruction set trained the model."""
    result = run_demo(tmp_path / "out", cache=False, progress=False)
    assert all(c.holds for c in orderings(result.rows)), (
        f"{demo.format_orderings(result.rows)}\n{format_table(result.rows)}"
    )
