"""Publishing through a local Hub: push, pull in a fresh process, model cards, failures."""

from __future__ import annotations

import json
import logging
import os
import re
import runpy
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import transformers
from huggingface_hub import HfApi, ModelCard, ModelCardData
from localhub import LocalHubServer
from models import DATA_DIR, calib_ids, tiny_llama

import llmpress
from llmpress.cli.eval_harness import EvalRecord, evaluate, load_eval, save_eval
from llmpress.cli.main import main
from llmpress.format.save import save_result, to_runtime
from llmpress.hub import CardTemplateError, PublishError, build_card, pull, push, push_model
from llmpress.hub.folder import PLOT_FILE, read_folder
from llmpress.plugin_manager import get_plugin_manager

EVAL = DATA_DIR / "eval.txt"
RECIPE = {"stages": [{"method": "wanda", "sparsity": 0.5}]}
PROBE = [[5, 17, 42, 9, 101, 3, 77, 250, 11, 64, 8, 199, 31, 2, 140, 66]]


@pytest.fixture(scope="module")
def compressed(tmp_path_factory: pytest.TempPathFactory, tokenizer) -> tuple[torch.nn.Module, Path]:
    """A tiny Llama pruned with Wanda (in memory) and its saved folder (with a perplexity result)."""
    model = tiny_llama(seed=0, vocab=256)
    model, report = llmpress.compress(model, RECIPE, calib_ids(8, 32, vocab=256), progress=False)
    folder = tmp_path_factory.mktemp("saved") / "tiny-wanda"
    llmpress.save_compressed(model, folder, tokenizer=tokenizer, report=report)
    evaluate(model, tokenizer, text=EVAL, seqlen=32, save_to=folder)
    return model, folder


@pytest.fixture
def folder(compressed, tmp_path: Path) -> Path:
    """A private copy of the saved folder (pushing writes the card into it)."""
    return Path(shutil.copytree(compressed[1], tmp_path / "tiny-wanda"))


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor(PROBE)).logits


def _commits(repo_id: str) -> int:
    return len(HfApi().list_repo_commits(repo_id))


def _bibtex_keys(text: str) -> set[str]:
    return set(re.findall(r"@\w+\{([^,\s]+),", text))


def _usage_code(card_text: str) -> str:
    usage = card_text.split("## Usage", 1)[1]
    return usage.split("```python\n", 1)[1].split("```", 1)[0]


# ------------------------------------------------------------------------------ end to end


def test_push_then_fresh_process_loads_identical_logits(
    local_hub: LocalHubServer, compressed, folder, tmp_path
):
    model, _ = compressed
    # the dense base on the Hub, with a license the compressed card must carry
    base = tiny_llama(seed=0, vocab=256)
    base.push_to_hub("local-user/tiny-base")
    ModelCard.from_template(ModelCardData(license="apache-2.0"), model_description="base").push_to_hub(
        "local-user/tiny-base"
    )

    info = push(folder, "local-user/tiny-wanda", base_model="local-user/tiny-base")
    assert str(info.repo_url) == f"{local_hub.url}/local-user/tiny-wanda"
    assert _commits("local-user/tiny-wanda") == 2  # repo creation + one upload commit
    files = set(HfApi().list_repo_files("local-user/tiny-wanda"))
    assert {
        "README.md",
        PLOT_FILE,
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "llmpress_report.json",
        "llmpress_eval.json",
    } <= files

    card = ModelCard.load("local-user/tiny-wanda")
    data = card.data
    assert data.base_model == "local-user/tiny-base" and data.license == "apache-2.0"
    assert data.library_name == "transformers" and data.pipeline_tag == "text-generation"
    assert "base_model_relation" not in data.to_dict()  # pruned only: no Hub relation fits
    assert {"llmpress", "wanda", "unstructured-sparsity"} <= set(data.tags)
    saved = {(r.task, r.metric): r.value for r in load_eval(folder)}
    assert {(e.dataset_name, e.metric_type): e.metric_value for e in data.eval_results} == saved
    assert f"]({PLOT_FILE})" in card.text and "sun2024simple" in card.text
    assert "50.0 %" in card.text and "method: wanda" in card.text

    assert torch.equal(_fresh_process_logits("local-user/tiny-wanda", card.text, tmp_path), _logits(model))


def _fresh_process_logits(repo_id: str, card_text: str, tmp_path: Path, prelude: str = "") -> torch.Tensor:
    """In a new process with an empty cache: ``from_pretrained(repo_id)`` through the endpoint,
    logits of :data:`PROBE`, then the card's usage snippet as pasted (it must print something)."""
    script = textwrap.dedent(f"""
        import sys, torch, transformers
        {prelude}
        m = transformers.AutoModelForCausalLM.from_pretrained("{repo_id}")
        with torch.no_grad():
            torch.save(m(torch.tensor({PROBE})).logits, sys.argv[1])
        exec(sys.argv[2], {{}})
    """)
    env = {**os.environ, "HF_HOME": str(tmp_path / "fresh"), "HF_HUB_CACHE": str(tmp_path / "fresh" / "hub")}
    out = tmp_path / "logits.pt"
    r = subprocess.run(
        [sys.executable, "-c", script, str(out), _usage_code(card_text)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip(), "the usage snippet printed nothing"
    return torch.load(out)


def test_quantized_model_round_trips_through_the_quantizer(
    local_hub: LocalHubServer, tokenizer, tmp_path
) -> None:
    recipe = {
        "stages": [
            {"method": "wanda", "sparsity": 0.5, "pattern": "2:4"},
            {"method": "rtn", "bits": 4, "group_size": 32},
        ]
    }
    model, report = llmpress.compress(
        tiny_llama(seed=2, vocab=256), recipe, calib_ids(8, 32, vocab=256), progress=False
    )
    save_result(model, tmp_path / "q", report=report, tokenizer=tokenizer)
    to_runtime(model, result=report)  # what loading the saved folder gives: packed layers, fp16
    info = push(tmp_path / "q", "local-user/tiny-q4", base_model="local-user/missing-base")
    card = ModelCard.load("local-user/tiny-q4")
    assert card.data.base_model_relation == "quantized" and {"rtn", "quantized", "4-bit"} <= set(
        card.data.tags
    )
    assert "import llmpress" in _usage_code(card.text)
    assert torch.equal(
        _fresh_process_logits("local-user/tiny-q4", card.text, tmp_path, "import llmpress"), _logits(model)
    )
    pulled, tok = pull("local-user/tiny-q4", revision=info.oid, dtype=torch.float16)
    assert tok is not None and torch.equal(_logits(pulled), _logits(model))


def test_push_again_updates_in_one_commit(local_hub: LocalHubServer, folder: Path) -> None:
    (folder / "llmpress_old.json").write_text("{}")
    push(folder, "local-user/again")
    assert _commits("local-user/again") == 2
    (folder / "llmpress_old.json").unlink()
    save_eval(folder, [EvalRecord(task="tiny_task", metric="acc", value=0.75, dataset="tiny_task")])
    info = push(folder, "local-user/again")
    assert _commits("local-user/again") == 3
    assert HfApi().list_repo_commits("local-user/again")[0].commit_id == info.oid
    files = HfApi().list_repo_files("local-user/again")
    assert "llmpress_old.json" not in files  # a stale llmpress file is removed in the same commit
    results = {e.dataset_name: e.metric_value for e in ModelCard.load("local-user/again").data.eval_results}
    assert results["tiny_task"] == 0.75


def test_plain_model_push_to_hub_keeps_the_llmpress_card(
    local_hub: LocalHubServer, compressed, folder
) -> None:
    model, _ = compressed
    push(folder, "local-user/kept")
    model.push_to_hub("local-user/kept")  # transformers' own push: loads the repo's card and keeps it
    card = ModelCard.load("local-user/kept")
    assert "compressed with llmpress" in card.text and card.data.eval_results
    loaded = transformers.AutoModelForCausalLM.from_pretrained("local-user/kept")
    assert torch.equal(_logits(loaded), _logits(model))


def test_push_model_publishes_the_model_with_the_folder_files_and_card(
    local_hub: LocalHubServer, compressed, folder
) -> None:
    model, _ = compressed
    own = type(model).push_to_hub
    info = push_model(model, "local-user/attached", source=folder, tags=["demo"])
    assert "push_to_hub" not in model.__dict__ and type(model).push_to_hub is own  # nothing patched
    assert _commits("local-user/attached") == 2 and info.oid
    files = set(HfApi().list_repo_files("local-user/attached"))
    assert {"README.md", "tokenizer.json", "llmpress_report.json", "model.safetensors", PLOT_FILE} <= files
    card = ModelCard.load("local-user/attached")
    assert "compressed with llmpress" in card.text and {"llmpress", "demo"} <= set(card.data.tags)
    loaded = transformers.AutoModelForCausalLM.from_pretrained("local-user/attached")
    assert torch.equal(_logits(loaded), _logits(model))


def test_push_model_refuses_a_source_that_is_no_model_folder(tmp_path: Path, compressed) -> None:
    with pytest.raises(PublishError, match="not a saved model folder"):
        push_model(compressed[0], "local-user/none", source=tmp_path)


def test_cli_push_prints_the_repo_url(local_hub: LocalHubServer, folder: Path, capsys) -> None:
    assert main(["push", str(folder), "local-user/from-cli", "--template", "short", "--private"]) == 0
    assert capsys.readouterr().out.strip() == f"{local_hub.url}/local-user/from-cli"
    assert HfApi().model_info("local-user/from-cli").private is True
    assert "## Size" not in ModelCard.load("local-user/from-cli").text  # the short template


# -------------------------------------------------------------------------------- failures


def test_wrong_token_is_a_clear_auth_error_and_no_token_leaks(
    local_hub_factory, folder: Path, tmp_path: Path, caplog, capsys
) -> None:
    local_hub_factory(tokens={"hf_good_token_abc": "alice"})
    caplog.set_level(logging.DEBUG)
    with pytest.raises(PublishError, match=r"authentication failed .*HTTP 401.*token was rejected") as e:
        push(folder, "alice/tiny", token="hf_wrong_token_xyz")
    assert "hf_wrong_token_xyz" not in str(e.value)
    info = push(folder, "alice/tiny", token="hf_good_token_abc")
    assert info.oid
    assert main(["push", str(folder), "alice/tiny", "--token", "hf_wrong_token_xyz"]) == 2
    seen = caplog.text + "".join(capsys.readouterr())
    for secret in ("hf_good_token_abc", "hf_wrong_token_xyz"):
        assert secret not in seen
        for root in (Path(os.environ["HF_HOME"]), folder):
            for p in root.rglob("*"):
                assert not p.is_file() or secret.encode() not in p.read_bytes(), p


def test_invalid_repo_name_fails_before_any_request(local_hub: LocalHubServer, folder: Path, capsys) -> None:
    with pytest.raises(PublishError, match="invalid repo id 'alice/bad name!'"):
        push(folder, "alice/bad name!")
    assert main(["push", str(folder), "a/b/c"]) == 2
    assert "invalid repo id 'a/b/c'" in capsys.readouterr().err
    assert local_hub.request_log == []


def test_transient_server_errors_are_retried(local_hub: LocalHubServer, folder: Path) -> None:
    local_hub.fail_next(2, status=503, paths_containing="/commit/")
    push(folder, "local-user/flaky", retries=3, backoff=0.01)
    assert _commits("local-user/flaky") == 2  # the failed attempts left no commit


def test_server_errors_past_retries_then_rerun(local_hub: LocalHubServer, folder: Path) -> None:
    local_hub.fail_next(10, status=503, paths_containing="/commit/")
    with pytest.raises(PublishError, match=r"HTTP 503 .*after 2 attempt\(s\).*re-run"):
        push(folder, "local-user/down", retries=2, backoff=0.01)
    assert HfApi().list_repo_files("local-user/down") == [".gitattributes"]  # nothing half-published
    local_hub.clear_failures()
    push(folder, "local-user/down")
    assert "model.safetensors" in HfApi().list_repo_files("local-user/down")


def test_server_down_mid_upload_then_rerun_succeeds(
    local_hub: LocalHubServer, compressed, folder: Path
) -> None:
    local_hub.fail_next(paths_containing="/commit/", crash=True)  # dies when the commit arrives (after LFS)
    url = re.escape(local_hub.url)
    with pytest.raises(PublishError, match=rf"connection to {url} dropped .*Nothing was published.*re-run"):
        push(folder, "local-user/crash", retries=1)
    assert not local_hub.running
    with pytest.raises(PublishError, match=rf"create repo: cannot reach {url} \(ConnectError\)"):
        push(folder, "local-user/crash", retries=1)
    local_hub.start()
    assert HfApi().list_repo_files("local-user/crash") == [".gitattributes"]
    push(folder, "local-user/crash")
    loaded = transformers.AutoModelForCausalLM.from_pretrained("local-user/crash")
    assert torch.equal(_logits(loaded), _logits(compressed[0]))


def test_template_syntax_error_names_file_and_line(local_hub: LocalHubServer, folder: Path, tmp_path) -> None:
    bad = tmp_path / "bad.md.j2"
    bad.write_text("---\n{{ card_data }}\n---\n# {{ model_name }}\n{{ summary ) }}\n\nmore text\n")
    with pytest.raises(CardTemplateError, match=rf"{re.escape(str(bad))}, line 5: unexpected '\)'"):
        push(folder, "local-user/never", template=bad)
    assert not HfApi().repo_exists("local-user/never")  # failed before any upload
    undefined = tmp_path / "undefined.md.j2"
    undefined.write_text("---\n{{ card_data }}\n---\n\n{{ model_name }}\n{{ no_such_variable }}\n")
    with pytest.raises(CardTemplateError, match=r"undefined.md.j2, line 6: .*no_such_variable"):
        build_card(folder, template=undefined)
    with pytest.raises(CardTemplateError, match="not found"):
        build_card(folder, template=tmp_path / "missing.j2")


# ------------------------------------------------------------------------------ model cards


def test_every_builtin_plugin_supplies_a_citation() -> None:
    pm = get_plugin_manager()
    builtin = {
        n: m
        for n, m in pm.methods.items()
        if getattr(pm.pm.get_plugin(m.plugin), "__name__", "").startswith("llmpress.plugins.")
    }
    assert {"magnitude", "wanda", "sparsegpt"} <= set(builtin)
    for name in builtin:
        bib = pm.methods[name].config_cls.citation
        assert bib and bib.lstrip().startswith("@") and _bibtex_keys(bib), name
        assert bib.count("{") == bib.count("}"), name


def test_card_of_a_multi_method_recipe_cites_each_method(folder: Path) -> None:
    pm = get_plugin_manager()
    methods = sorted(pm.methods)
    report = json.loads((folder / "llmpress_report.json").read_text())
    report["recipe"] = {"stages": [{"method": m} for m in methods]}
    (folder / "llmpress_report.json").write_text(json.dumps(report))
    text = build_card(folder, repo_id="me/multi").text
    for m in methods:
        keys = _bibtex_keys(pm.methods[m].config_cls.citation)
        assert keys and keys <= _bibtex_keys(text), m
    assert set(methods) <= set(ModelCard(build_card(folder).content).data.tags)


def test_card_of_a_quantized_checkpoint(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    modules = {
        n: {"format": "int", "bits": 4, "group_size": 32, "in_features": s[1], "out_features": s[0]}
        for n, s in ((m.name, m.shape) for m in read_folder(folder).modules())
    }
    config["quantization_config"] = {"quant_method": "llmpress", "format_version": 1, "modules": modules}
    (folder / "config.json").write_text(json.dumps(config))
    card = build_card(folder, repo_id="me/q4", base_model="meta-llama/Llama-3.1-8B", license="llama3.1")
    data = card.data.to_dict()
    assert data["base_model"] == "meta-llama/Llama-3.1-8B" and data["base_model_relation"] == "quantized"
    assert data["license"] == "llama3.1" and {"quantized", "4-bit"} <= set(data["tags"])
    assert "import llmpress" in _usage_code(card.text)
    assert "(4-bit)" in card.text  # the per-module table shows the nominal bits


def test_card_numbers_match_the_folder(folder: Path) -> None:
    info = read_folder(folder)
    mods = info.modules()
    assert len(mods) == 14 and all(m.sparsity == pytest.approx(0.5, abs=0.01) for m in mods)
    size = info.size()
    assert size.params == sum(p.numel() for p in tiny_llama(vocab=256).parameters())
    assert size.bits_per_param == pytest.approx(32.0)  # saved in float32
    text = build_card(folder, template="short").text
    assert "## Usage" not in text and "```python" in text and "sun2024simple" in text


def test_custom_template_can_extend_the_default(folder: Path, tmp_path: Path) -> None:
    tpl = tmp_path / "mine.md.j2"
    tpl.write_text('{% extends "default.md.j2" %}\n')
    assert build_card(folder, template=tpl).text == build_card(folder).text
    plain = tmp_path / "plain.md.j2"
    plain.write_text("Just {{ model_name }}.\n")  # no metadata block: it is added
    card = build_card(folder, template=plain, repo_id="me/plain")
    assert card.text.strip() == "Just plain." and "llmpress" in card.data.tags


# ---------------------------------------------------------------------------------- example


def test_examples_publish_prints_the_repo_url(local_hub: LocalHubServer, tmp_path: Path, capsys) -> None:
    example = Path(__file__).resolve().parents[1] / "examples" / "publish.py"
    ns = runpy.run_path(str(example), run_name="publish_example")
    code = ns["main"](
        [
            "--endpoint",
            local_hub.url,
            "--repo-id",
            "local-user/example",
            "--out",
            str(tmp_path / "m"),
            "--steps",
            "0",
        ]
    )
    assert code == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"{local_hub.url}/local-user/example"
    assert ModelCard.load("local-user/example").data.eval_results


def test_card_describes_stages_through_their_configs() -> None:
    """Each stage is described by its method config's ``describe()``; an unknown method by its name."""
    from llmpress.hub.card import _describe_stage

    assert (
        _describe_stage({"method": "sparsegpt", "sparsity": 0.6})
        == "SparseGPT pruning to 60 % unstructured sparsity"
    )
    assert _describe_stage({"method": "wanda", "pattern": "2:4", "targets": ["mlp"]}) == (
        "Wanda pruning to 50 % 2:4 sparsity on layers matching mlp"
    )
    assert (
        _describe_stage({"method": "gptq", "bits": 3, "group_size": 128})
        == "GPTQ quantization to 3 bits (group size 128)"
    )
    assert "FLAP structured pruning of heads and neurons, 30 %" in _describe_stage(
        {"method": "flap", "ratio": 0.3}
    )
    assert "from `base-model` (preset minitron, kl 1) on 4,096 tokens" in _describe_stage(
        {"method": "distill", "preset": "minitron", "tokens": 4096, "teacher": "base-model"}
    )
    assert _describe_stage({"method": "no-such-method", "x": 1}) == "no-such-method"
