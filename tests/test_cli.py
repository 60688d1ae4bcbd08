"""The ``llmpress`` command line on a saved tiny model folder (config, weights, tokenizer)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers
from models import DATA_DIR, LLAMA, is_nm_sparse, save_model_dir, tiny_bert, tiny_llama, weight_of

from llmpress.cli.main import main
from llmpress.format.save import REPORT_FILE

CALIB = DATA_DIR / "calib.txt"
EVAL = DATA_DIR / "eval.txt"
RECIPE = "stages:\n  - method: wanda\n    sparsity: 0.5\n    pattern: unstructured\n"


@pytest.fixture(autouse=True)
def _fresh(fresh_plugin_manager: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LLMPRESS_DISABLE_PLUGINS", raising=False)


def _recipe(tmp_path: Path, text: str = RECIPE, name: str = "r.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def _compress_args(model_dir: Path, recipe: Path, out: Path, *extra: str) -> list[str]:
    return [
        "compress",
        str(model_dir),
        "--recipe",
        str(recipe),
        "--calib",
        str(CALIB),
        "--out",
        str(out),
        "--nsamples",
        "8",
        "--seqlen",
        "32",
        *extra,
    ]


def _cli() -> list[str]:
    script = Path(sys.executable).with_name("llmpress")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "llmpress"]


def _reference_perplexity(model_dir: Path, text: Path, seqlen: int) -> float:
    """Non-overlapping windows, each scored on its own (as the ref-lm README defines it)."""
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = tok(text.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    n = len(ids) // seqlen
    x = torch.tensor(ids[: n * seqlen]).view(n, seqlen)
    with torch.no_grad():
        logits = model(input_ids=x).logits[:, :-1]
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
    return math.exp(float(nll))


def _check_pruned(out: Path, source: Path) -> None:
    """Every block linear of the saved model is 50 % sparse per row; all else as in ``source``."""
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).state_dict()
    dense = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).state_dict()
    assert model.keys() == dense.keys()
    targets = {f"{n}.weight" for n in LLAMA.expected_targets()}
    for k, w in model.items():
        if k in targets:
            assert ((w == 0).sum(1) == w.shape[1] // 2).all(), k
        else:
            assert torch.equal(w, dense[k]), k


# ----------------------------------------------------------------------------------- compress


def test_compress_in_process(tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    assert main(_compress_args(tiny_model_dir, _recipe(tmp_path), out)) == 0
    stdout = capsys.readouterr().out
    assert f"compressed 14 layers to {out}" in stdout and "overall sparsity 0.5000" in stdout
    names = {p.name for p in out.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        REPORT_FILE,
        "llmpress_recipe.json",
    } <= names
    report = json.loads((out / REPORT_FILE).read_text())
    assert report["calibration"]["nsamples"] == 8 and report["calibration"]["seqlen"] == 32
    assert report["calibration"]["source"] == str(CALIB)
    assert report["recipe"] == {"stages": [{"method": "wanda", "sparsity": 0.5, "pattern": "unstructured"}]}
    _check_pruned(out, tiny_model_dir)
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_compress_nm_and_overwrite(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("x")
    recipe = _recipe(tmp_path, 'stages:\n  - method: sparsegpt\n    pattern: "2:4"\n')
    assert (
        main(_compress_args(tiny_model_dir, recipe, out, "--overwrite", "--batch-size", "3", "--seed", "1"))
        == 0
    )
    assert not (out / "stale.txt").exists()
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    for name in LLAMA.expected_targets():
        assert is_nm_sparse(weight_of(model.get_submodule(name)), 2, 4), name


def test_magnitude_needs_no_calib(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    recipe = _recipe(tmp_path, "stages:\n  - method: magnitude\n    sparsity: 0.5\n    group: row\n")
    args = ["compress", str(tiny_model_dir), "--recipe", str(recipe), "--out", str(out)]
    assert main(args) == 0
    _check_pruned(out, tiny_model_dir)


def test_compress_keeps_the_checkpoint_dtype(tokenizer, tmp_path: Path) -> None:
    """An fp16 checkpoint is computed in fp32 on CPU but saved as fp16 again (unless --keep-dtype)."""
    from safetensors import safe_open

    src = save_model_dir(tmp_path / "half", tiny_llama(vocab=256).half(), tokenizer)
    recipe = _recipe(tmp_path, "stages:\n  - {method: magnitude, sparsity: 0.5}\n")
    for flag, dtype in (([], torch.float16), (["--keep-dtype"], torch.float32)):
        out = tmp_path / f"out{len(flag)}"
        assert main(["compress", str(src), "--recipe", str(recipe), "--out", str(out), *flag]) == 0
        with safe_open(str(out / "model.safetensors"), "pt") as f:
            assert {f.get_tensor(k).dtype for k in list(f.keys())} == {dtype}, flag


# -------------------------------------------------------------------------------------- eval


def test_eval_json_in_process(tiny_model_dir: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["eval", str(tiny_model_dir), "--text", str(EVAL), "--seqlen", "32", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)  # stdout is exactly one JSON object
    assert isinstance(res["perplexity"], float) and math.isfinite(res["perplexity"])
    assert res["perplexity"] == pytest.approx(_reference_perplexity(tiny_model_dir, EVAL, 32), rel=1e-5)
    assert res["tokens"] == res["windows"] * 31
    assert res["nll"] == pytest.approx(math.log(res["perplexity"]))


def test_eval_text_output_and_max_tokens(tiny_model_dir: Path, capsys: pytest.CaptureFixture) -> None:
    assert (
        main(["eval", str(tiny_model_dir), "--text", str(EVAL), "--seqlen", "32", "--max-tokens", "100"]) == 0
    )
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("perplexity ") and line.endswith("over 3 windows of 32 tokens")


def test_eval_of_an_encoder_is_a_clear_error(
    tokenizer, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    src = save_model_dir(tmp_path / "bert", tiny_bert(vocab_size=256), tokenizer)
    assert main(["eval", str(src), "--text", str(EVAL), "--seqlen", "32", "--json"]) == 2
    assert "needs a causal LM" in capsys.readouterr().err


def test_console_script_compress_then_eval(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The installed ``llmpress`` entry point, in real subprocesses."""
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "LLMPRESS_DISABLE_PLUGINS"}
    r = subprocess.run(
        [*_cli(), *_compress_args(tiny_model_dir, _recipe(tmp_path), out)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "compressed 14 layers" in r.stdout
    _check_pruned(out, tiny_model_dir)
    r = subprocess.run(
        [*_cli(), "eval", str(out), "--text", str(EVAL), "--seqlen", "32", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1, r.stdout  # logs and progress bars go to stderr
    res = json.loads(lines[0])
    assert res["perplexity"] == pytest.approx(_reference_perplexity(out, EVAL, 32), rel=1e-5)


# ------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    ("recipe", "message"),
    [
        ("stages:\n  - method: wandaa\n    sparsity: 0.5\n", "unknown method 'wandaa'"),
        (
            "stages:\n  - method: wanda\n    sparsity: 0.5\n    pattern: 3-4\n",
            "unknown sparsity pattern '3-4'",
        ),
        ("stages:\n  - method: wanda\n    sparsity: half\n", "sparsity must be a number"),
        ("stages:\n  - method: wanda\n    sparsity: 0.6\n    pattern: '2:4'\n", "contradicts pattern"),
        ("stages:\n  - method: wanda\n    sparsity: 0.5\n    colour: red\n", "unknown option(s) ['colour']"),
        (
            "stages:\n  - method: wanda\n    sparsity: 0.5\n    targets: [nothing_here]\n",
            "matches no linear layer",
        ),
        ("stages: [\n", "not valid YAML"),
        ("stages: []\n", "no stages"),
    ],
)
def test_bad_recipe_exits_2(
    recipe: str, message: str, tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "out"
    assert main(_compress_args(tiny_model_dir, _recipe(tmp_path, recipe), out)) == 2
    err = capsys.readouterr().err
    assert "error: " in err and message in err.split("error: ", 1)[1]
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]


def test_bad_recipe_in_a_subprocess(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    recipe = _recipe(tmp_path, "stages:\n  - method: wanda\n    sparsity: 0.5\n    pattern: '4:2'\n")
    r = subprocess.run(
        [sys.executable, "-m", "llmpress", *_compress_args(tiny_model_dir, recipe, out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2
    assert "need 0 < N < M" in r.stderr and "Traceback" not in r.stderr
    assert r.stdout == ""
    assert not out.exists()


def test_other_errors_exit_2(tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    recipe = _recipe(tmp_path)
    # missing recipe file
    assert main(_compress_args(tiny_model_dir, tmp_path / "nope.yaml", tmp_path / "o1")) == 2
    assert "does not exist" in capsys.readouterr().err
    # existing output folder without --overwrite: untouched
    out = tmp_path / "existing"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert main(_compress_args(tiny_model_dir, recipe, out)) == 2
    assert "already exists" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    # no model there
    assert main(_compress_args(tmp_path / "no-model", recipe, tmp_path / "o2")) == 2
    assert "no such folder" in capsys.readouterr().err
    # wanda without calibration data
    args = ["compress", str(tiny_model_dir), "--recipe", str(recipe), "--out", str(tmp_path / "o3")]
    assert main(args) == 2
    assert "need calibration data" in capsys.readouterr().err
    # windows longer than the model's positions
    args = _compress_args(tiny_model_dir, recipe, tmp_path / "o4")
    args[args.index("--seqlen") + 1] = "100000"
    assert main(args) == 2
    assert "exceeds the model's 256 positions" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing", "r.yaml"]


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:
        main(["compress"])
    assert e.value.code == 2
    assert "--recipe" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main([])
    assert e.value.code == 2


def test_help_lists_the_commands(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("compress", "eval", "plugins"):
        assert cmd in out


def test_eval_baseline_recovery_is_cached_and_carded(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE)
    out = tmp_path / "out"
    assert main(_compress_args(tiny_model_dir, recipe, out)) == 0
    capsys.readouterr()
    args = ["eval", str(out), "--text", str(EVAL), "--seqlen", "32", "--max-tokens", "200", "--json"]
    base_args = ["eval", str(tiny_model_dir), *args[2:], "--no-save"]
    assert main(base_args) == 0
    base = json.loads(capsys.readouterr().out)["perplexity"]
    assert main([*args, "--baseline", str(tiny_model_dir)]) == 0
    res = json.loads(capsys.readouterr().out)
    key = f"{EVAL.name}/perplexity"
    assert res["baseline"][key] == pytest.approx(base, rel=1e-5)
    assert res["recovery"][key] == pytest.approx(100 * base / res["perplexity"], rel=1e-6)
    assert (out / "llmpress_eval_baseline.json").is_file()
    # the second run reuses the cached base results: the base model is not loaded again
    import llmpress.format.loading as loading

    real = loading.load_model
    loaded = []
    monkeypatch.setattr(loading, "load_model", lambda p, **kw: loaded.append(str(p)) or real(p, **kw))
    assert main([*args, "--baseline", str(tiny_model_dir)]) == 0
    assert loaded == [str(out)]
    pytest.importorskip("jinja2")
    from llmpress.hub.card import build_card

    text = str(build_card(out))
    assert "| base model | this model | recovery |" in text and "%" in text
