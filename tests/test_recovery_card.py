"""The model card's Recovery section, from a synthetic ``recovery`` record (no training needed)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from huggingface_hub import ModelCard
from models import calib_ids, tiny_llama

import llmpress
from llmpress.hub import build_card
from llmpress.hub.card import RECOVERY_PLOT_FILE, RecoveryRecord, recovery_context
from llmpress.hub.plot import recovery_plot

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

#: a record as the distill stage writes it (``result.recovery``)
RECORD: dict[str, Any] = {
    "method": "distill",
    "preset": "sparse-finetune",
    "weights": {"ce": 1.0, "kl": 0.0, "squarehead": 1.0, "temperature": 1.0},
    "teacher": "/home/someone/models/pycoder-19m",
    "data": "/home/someone/data/calib.txt",
    "tokens": 1_048_576,
    "steps": 256,
    "seqlen": 512,
    "train": "weights",
    "loss_curve": [[s, 3.0 - 0.01 * s] for s in range(1, 41)],
    "eval": {
        "text": "/home/someone/data/eval.txt",
        "base": 5.83,
        "before": 9.50,
        "after": 6.75,
        "curve": [[0, 9.5], [128, 7.1], [256, 6.75]],
    },
    "resumed_from": 0,
    "wall_s": 812.4,
    "tokens_per_s": 1290.7,
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory, tokenizer) -> Path:
    """A tiny Llama pruned with SparseGPT and saved (the report gets a recovery record per test)."""
    model = tiny_llama(seed=0, vocab=256)
    recipe = {"stages": [{"method": "sparsegpt", "sparsity": 0.5}]}
    model, result = llmpress.compress(model, recipe, calib_ids(8, 32, vocab=256), progress=False)
    folder = tmp_path_factory.mktemp("saved") / "tiny-recovered"
    llmpress.save_compressed(model, folder, tokenizer=tokenizer, report=result)
    return folder


def _with_recovery(saved: Path, tmp_path: Path, record: dict[str, Any] | None) -> Path:
    """A copy of the saved folder whose report holds ``record`` and a distill stage."""
    folder = Path(shutil.copytree(saved, tmp_path / saved.name))
    path = folder / "llmpress_report.json"
    report = json.loads(path.read_text())
    if record is not None:
        report["recovery"] = record
        stage = {"method": "distill", "preset": record.get("preset"), "tokens": record.get("tokens")}
        report["recipe"]["stages"].append({k: v for k, v in stage.items() if v is not None})
    path.write_text(json.dumps(report))
    return folder


def _section(text: str) -> str:
    return text.split("## Recovery", 1)[1].split("\n## ", 1)[0]


def test_card_renders_the_recovery_section(saved: Path, tmp_path: Path) -> None:
    folder = _with_recovery(saved, tmp_path, RECORD)
    card = build_card(folder, repo_id="me/tiny-recovered", base_model="org/pycoder-19m")
    sec = _section(card.text)
    assert "1,048,576 tokens (256 steps of sequences of 512 tokens)" in sec
    assert "| model | perplexity on `eval.txt` |" in sec
    assert "| base model (teacher) | 5.830 |" in sec
    assert "| compressed, before recovery | 9.500 |" in sec
    assert "| compressed, after recovery | 6.750 |" in sec
    assert "closed 75 % of the perplexity gap" in sec  # (9.50 - 6.75) / (9.50 - 5.83)
    assert "SquareHead" in sec and "cross-entropy" in sec and "preset `sparse-finetune`" in sec
    # local paths are named by their last part only
    assert "`calib.txt`" in sec and "pycoder-19m" in sec and "/home/someone" not in card.text
    assert f"![Recovery training: loss per step]({RECOVERY_PLOT_FILE})" in sec
    assert (folder / RECOVERY_PLOT_FILE).read_bytes()[:8] == PNG_MAGIC
    # the SquareHead paper is cited; the distill stage is not reported as missing a citation
    assert "kurtic2023sparse," in card.text
    assert "`distill`" not in card.text.split("## Citations", 1)[1]
    data = ModelCard(str(card)).data.to_dict()
    assert "distillation" in data["tags"] and data["base_model_relation"] == "finetune"
    assert "recovery training by distillation" in card.text.split("## Size", 1)[0]


def test_card_without_recovery_has_no_section_and_no_plot(saved: Path, tmp_path: Path) -> None:
    folder = _with_recovery(saved, tmp_path, None)
    card = build_card(folder, repo_id="me/tiny")
    assert "## Recovery" not in card.text and not (folder / RECOVERY_PLOT_FILE).exists()
    assert "kurtic2023sparse" not in card.text
    assert "base_model_relation" not in card.data.to_dict()


def test_minitron_record_in_other_spellings_cites_minitron(saved: Path, tmp_path: Path) -> None:
    record = {
        "preset": "minitron",
        "teacher": "the model before the recipe's first stage",
        "tokens": 4096,
        "steps": 8,
        "loss": [2.5, 2.1, 1.9, 1.8],  # a plain list of per-step losses
        "eval_base": {"perplexity": 10.0},
        "eval_before": {"perplexity": 30.0},
        "eval_after": 20.0,
    }
    folder = _with_recovery(saved, tmp_path, record)
    text = build_card(folder).text
    sec = _section(text)
    assert "KL divergence" in sec and "closed 50 % of the perplexity gap" in sec
    assert (
        "the model as it was before the recipe's first stage" in sec
        and "Data: the calibration source." in sec
    )
    assert "muralidharan2024minitron" in text
    short = build_card(folder, template="short").text
    assert "perplexity 30.000 → 20.000 (base model 10.000)" in short


def test_base_perplexity_from_the_baseline_eval_on_the_same_text() -> None:
    from llmpress.cli.eval_harness import EvalRecord

    raw = {**RECORD, "eval": {k: v for k, v in RECORD["eval"].items() if k != "base"}}
    same = EvalRecord.from_dict({"task": "eval.txt", "metric": "perplexity", "value": 6.7, "baseline": 5.9})
    other = EvalRecord.from_dict({"task": "other.txt", "metric": "perplexity", "value": 6.7, "baseline": 4.0})
    ctx = recovery_context(raw, None, [other, same])
    assert ctx is not None and ctx["rows"][0]["ppl"] == "5.900"
    ctx = recovery_context(raw, None, [other])
    assert ctx is not None and ctx["rows"][0]["ppl"] == "-" and ctx["gap_closed"] is None


def test_citations_follow_the_losses_and_skip_what_is_cited() -> None:
    from llmpress.hub.card import RECOVERY_CITATIONS, recovery_citations

    sqh = RecoveryRecord.model_validate({"preset": "sparse-finetune"})
    assert [c["bibtex"] for c in recovery_citations(sqh, [])] == [RECOVERY_CITATIONS["squarehead"]]
    both = RecoveryRecord.model_validate({"kl": 1.0, "squarehead": 1.0})
    assert len(recovery_citations(both, [])) == 2
    known = [{"method": "distill", "bibtex": RECOVERY_CITATIONS["squarehead"]}]
    assert recovery_citations(both, known) == [{"method": "distill", "bibtex": RECOVERY_CITATIONS["kl"]}]


def test_gradual_pruning_is_described_instead_of_fixed_masks(saved: Path, tmp_path: Path) -> None:
    schedule = {"from": 0.5, "to": 0.7, "every": 16, "score": "fisher"}
    sec = _section(build_card(_with_recovery(saved, tmp_path, {**RECORD, "schedule": schedule})).text)
    assert (
        "Sparsity rose from 50 % to 70 % during training" in sec and "every 16 steps by fisher score" in sec
    )
    assert "pruned weights stay zero" not in sec
    assert "pruned weights stay zero" in _section(
        build_card(_with_recovery(saved, tmp_path / "b", RECORD)).text
    )


def test_record_without_evaluations_shows_no_table() -> None:
    ctx = recovery_context({"tokens": 100, "steps": 2, "kl": 1.0, "squarehead": 1.0}, None)
    assert ctx is not None and not ctx["has_eval"] and ctx["plot"] is None and ctx["gap_closed"] is None
    assert ctx["record"].weights == {"kl": 1.0, "squarehead": 1.0}
    assert recovery_context(None, None) is None


def test_record_reads_the_curves_of_each_loss() -> None:
    rec = RecoveryRecord.model_validate(RECORD)
    assert set(rec.curves) == {"loss"} and len(rec.curves["loss"]) == 40
    assert rec.curves["loss"][0] == (1, pytest.approx(2.99)) and rec.evals[-1] == (256, 6.75)
    assert (rec.base, rec.before, rec.after) == (5.83, 9.5, 6.75)
    assert rec.weights == {"ce": 1.0, "squarehead": 1.0} and rec.temperature == 1.0
    per_loss = [{"step": s, "loss": 3.0 - s / 100, "ce": 2.0 - s / 200} for s in range(1, 5)]
    assert set(RecoveryRecord.model_validate({"loss_curve": per_loss}).curves) == {"loss", "ce"}
    assert RecoveryRecord.model_validate({"preset": "minitron"}).weights == {"kl": 1.0}


def test_recovery_plot_needs_two_points_and_depends_only_on_the_data(tmp_path: Path) -> None:
    assert recovery_plot({"loss": [(1, 2.0)]}, tmp_path / "one.png") is None
    curves = {"loss": [(s, 1.0 / s) for s in range(1, 20)]}
    a = recovery_plot(curves, tmp_path / "a.png", evals=[(0, 9.0), (10, 7.0), (19, 6.5)])
    b = recovery_plot(curves, tmp_path / "b.png", evals=[(0, 9.0), (10, 7.0), (19, 6.5)])
    assert a is not None and b is not None and a.read_bytes() == b.read_bytes()
    assert a.read_bytes()[:8] == PNG_MAGIC


def test_report_keeps_the_record_through_the_folder(saved: Path, tmp_path: Path) -> None:
    from llmpress.hub.folder import read_folder

    info = read_folder(_with_recovery(saved, tmp_path, RECORD))
    assert info.report is not None and info.report.recovery == RECORD
    assert info.report.to_dict()["recovery"] == RECORD


def test_card_of_a_real_recovery_run(tmp_path: Path, tokenizer) -> None:
    """SparseGPT then a short distill stage: the card shows the record the stage wrote."""
    from models import DATA_DIR

    recipe = {
        "stages": [
            {"method": "sparsegpt", "sparsity": 0.5},
            {"method": "distill", "tokens": 512, "seqlen": 32, "batch_size": 4, "lr": 1e-3,
             "eval_text": str(DATA_DIR / "eval.txt"), "eval_every": 2},
        ]
    }  # fmt: skip
    model, result = llmpress.compress(
        tiny_llama(seed=0, vocab=256),
        recipe,
        calib_ids(8, 32, vocab=256),
        tokenizer=tokenizer,
        progress=False,
    )
    folder = tmp_path / "tiny-distilled"
    llmpress.save_compressed(model, folder, tokenizer=tokenizer, report=result)
    ev = result.recovery["eval"]
    sec = _section(build_card(folder).text)
    assert "512 tokens (4 steps of sequences of 32 tokens)" in sec
    assert f"| compressed, before recovery | {ev['before']:.3f} |" in sec
    assert f"| compressed, after recovery | {ev['after']:.3f} |" in sec
    assert "the model as it was before the recipe's first stage" in sec and "SquareHead" in sec
    assert ev["base"] is not None and ev["base"] < ev["before"]  # the teacher, measured on the same windows
    assert f"| base model (teacher) | {ev['base']:.3f} |" in sec
    assert "perplexity on this text was not recorded" not in sec
    assert (folder / RECOVERY_PLOT_FILE).read_bytes()[:8] == PNG_MAGIC
