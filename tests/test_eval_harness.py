"""lm-eval-harness tasks on the in-memory model (offline local task), results saved for the card."""

from __future__ import annotations

import json
import math
import socket
from pathlib import Path

import pytest
import torch
import transformers
from models import DATA_DIR, calib_ids, save_model_dir, tiny_llama

import llmpress
from llmpress.cli.eval_harness import EVAL_FILE, EvalRecord, load_eval, run_lm_eval, save_eval
from llmpress.cli.main import main
from llmpress.errors import EvalTaskError
from llmpress.hub import build_card

pytest.importorskip("lm_eval")

TASKS = DATA_DIR / "lm_eval_tasks"
EVAL = DATA_DIR / "eval.txt"


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No network: offline flags set, and any non-loopback connection fails."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    connect = socket.socket.connect

    def guarded(self: socket.socket, address) -> None:  # noqa: ANN001
        host = address[0] if isinstance(address, tuple) else address
        if (
            isinstance(host, str)
            and host not in ("127.0.0.1", "::1", "localhost")
            and self.family != socket.AF_UNIX
        ):
            raise OSError(f"network access to {host} in an offline test")
        return connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)


@pytest.fixture(scope="module")
def pruned(tokenizer) -> torch.nn.Module:
    model = tiny_llama(seed=1, vocab=256)
    model, _ = llmpress.compress(
        model, {"stages": [{"method": "wanda", "sparsity": 0.5}]}, calib_ids(8, 32, vocab=256), progress=False
    )
    return model


def _docs() -> list[dict]:
    return [json.loads(line) for line in (TASKS / "tiny_mc.jsonl").read_text().splitlines() if line.strip()]


@torch.no_grad()
def _reference_accuracy(model: torch.nn.Module, tok, docs: list[dict]) -> float:
    """acc of a multiple-choice task as lm-eval defines it: argmax of log P(" " + choice | question)."""
    hits = 0
    for d in docs:
        ctx = tok(d["question"], add_special_tokens=False)["input_ids"]
        scores = []
        for choice in d["choices"]:
            whole = tok(d["question"] + " " + choice, add_special_tokens=False)["input_ids"]
            logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), -1)
            scores.append(sum(float(logp[i - 1, whole[i]]) for i in range(len(ctx), len(whole))))
        hits += int(max(range(len(scores)), key=scores.__getitem__) == d["answer"])
    return hits / len(docs)


def test_local_task_runs_offline_on_the_in_memory_model(pruned, tokenizer, offline, monkeypatch) -> None:
    def no_reload(*args, **kwargs):  # noqa: ANN002, ANN003
        raise AssertionError("the model must not be re-loaded")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_reload)
    records = run_lm_eval(pruned, tokenizer, ["tiny_mc"], limit=4, include_path=[TASKS], batch_size=4)
    (acc,) = [r for r in records if r.metric == "acc"]
    assert (acc.task, acc.samples, acc.limit, acc.split, acc.higher_is_better) == (
        "tiny_mc",
        4,
        4,
        "test",
        True,
    )
    assert acc.value == pytest.approx(_reference_accuracy(pruned, tokenizer, _docs()[:4]))
    assert acc.stderr is not None and math.isfinite(acc.stderr)
    assert acc.source.startswith("lm-eval")


def test_unknown_task_is_a_clear_error(pruned, tokenizer, offline) -> None:
    with pytest.raises(EvalTaskError, match=r"unknown lm-eval task\(s\) \['no_such_task'\]"):
        run_lm_eval(pruned, tokenizer, ["no_such_task"], include_path=[TASKS])
    with pytest.raises(EvalTaskError, match="does not exist"):
        run_lm_eval(pruned, tokenizer, ["tiny_mc"], include_path=[TASKS / "missing"])


def test_save_eval_merges_by_task_and_metric(tmp_path: Path) -> None:
    save_eval(tmp_path, [EvalRecord("a", "acc", 0.1), EvalRecord("b", "acc", 0.2)])
    save_eval(tmp_path, [EvalRecord("a", "acc", 0.3, stderr=0.01)])
    assert {r.key: r.value for r in load_eval(tmp_path)} == {("a", "acc"): 0.3, ("b", "acc"): 0.2}
    assert json.loads((tmp_path / EVAL_FILE).read_text())["version"] == 1


def test_cli_eval_tasks_and_perplexity_feed_the_card(
    pruned, tokenizer, tmp_path: Path, offline, capsys
) -> None:
    folder = save_model_dir(tmp_path / "m", pruned, tokenizer)
    args = [
        "eval",
        str(folder),
        "--tasks",
        "tiny_mc",
        "--limit",
        "3",
        "--include-path",
        str(TASKS),
        "--text",
        str(EVAL),
        "--seqlen",
        "32",
        "--json",
    ]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)  # stdout is exactly one JSON object
    assert math.isfinite(out["perplexity"]) and out["windows"] > 0  # the perplexity keys, as before
    acc = out["tasks"]["tiny_mc"]["acc"]
    saved = {r.key: r.value for r in load_eval(folder)}
    assert saved == {("tiny_mc", "acc"): acc, ("eval.txt", "perplexity"): out["perplexity"]}
    results = {(e.dataset_name, e.metric_type): e.metric_value for e in build_card(folder).data.eval_results}
    assert results == {("tiny_mc", "acc"): acc, ("eval.txt", "perplexity"): out["perplexity"]}

    assert (
        main(["eval", str(folder), "--tasks", "tiny_mc", "--limit", "2", "--include-path", str(TASKS)]) == 0
    )
    assert capsys.readouterr().out.startswith("tiny_mc acc ")


def test_cli_eval_errors(pruned, tokenizer, tmp_path: Path, offline, capsys) -> None:
    folder = save_model_dir(tmp_path / "m", pruned, tokenizer)
    assert main(["eval", str(folder)]) == 2
    assert "--text FILE (perplexity) and/or --tasks" in capsys.readouterr().err
    assert main(["eval", str(folder), "--tasks", "nope", "--include-path", str(TASKS), "--no-save"]) == 2
    assert "unknown lm-eval task" in capsys.readouterr().err
    assert not (folder / EVAL_FILE).exists()


def test_evaluation_lives_in_core_and_hub_reexports_it() -> None:
    import subprocess
    import sys

    import llmpress.cli.eval_harness as harness
    import llmpress.hub

    assert llmpress.hub.EvalTaskError is EvalTaskError and llmpress.hub.EvalRecord is harness.EvalRecord
    assert (llmpress.hub.evaluate, llmpress.hub.load_eval) == (harness.evaluate, harness.load_eval)
    code = (
        "import sys, llmpress, llmpress.cli.main, llmpress.cli.eval_harness\n"
        "assert not [m for m in sys.modules if m.startswith('llmpress.hub')], sorted(sys.modules)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
