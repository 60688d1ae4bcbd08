"""``llmpress demo``: every configuration runs, saves, reloads identically and gets a card;
at the default size the numbers show the orderings the papers lead users to expect."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import pytest
import torch

from llmpress import demo
from llmpress.cli import main
from llmpress.demo import DemoConfig, DemoResult, demo_cases, format_table, orderings, run_demo

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
            assert r.size_mb == pytest.approx(dense.size_mb, rel=0.05), r
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
        "size",
        "MB",
        "reload",
        "time",
    ]
    assert len(lines) == 2 + len(small.rows)
    assert all(r.name in line and f"{r.ppl:.3f}" in line for r, line in zip(small.rows, lines[2:]))


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
    assert len([line for line in lines if "identical" in line]) == 1 + len(demo_cases())
    assert (
        f"results:    {out}" in stdout
        and f"model card: {out / 'sparsegpt-gptq-2of4-w4' / 'README.md'}" in stdout
    )
    assert "INFO" not in stdout


@pytest.mark.slow
def test_default_demo_shows_the_expected_orderings(tmp_path: Path) -> None:
    """At the real size (about two minutes): calibrated pruning beats magnitude, SparseGPT is
    at least as good as Wanda, GPTQ beats RTN, and 2:4 + 4-bit costs more than 4-bit alone."""
    result = run_demo(tmp_path / "out", cache=False, progress=False)
    checks = orderings(result.rows)
    assert all(checks.values()), f"{checks}\n{format_table(result.rows)}"
