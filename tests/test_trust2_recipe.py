"""Issue 18 (trust, round 2): recipe keys, bits budgets, recipe limits and the CLI's rough edges."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from models import DATA_DIR

import llmpress
from llmpress.cli.main import main
from llmpress.errors import RecipeError
from llmpress.plugin_manager import get_plugin_manager
from llmpress.recipe.recipes import MAX_RECIPE_BYTES, MAX_RECIPE_NODES, MAX_STAGES, Recipe

README = Path(__file__).resolve().parents[1] / "README.md"
CALIB = DATA_DIR / "calib.txt"


@pytest.fixture(autouse=True)
def _fresh(fresh_plugin_manager: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LLMPRESS_DISABLE_PLUGINS", raising=False)


def _write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def _cli_error(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    """Run the CLI on a user mistake: one ``error:`` line, exit status 2, no traceback."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


# ------------------------------------------------------------------------- 4: duplicate keys


def test_duplicate_yaml_key_in_a_stage_is_refused_with_its_lines(tmp_path: Path) -> None:
    p = _write(tmp_path, "r.yaml", "stages:\n  - method: wanda\n    sparsity: 0.5\n    sparsity: 0.9\n")
    with pytest.raises(RecipeError, match=r"duplicate key 'sparsity' on lines 3 and 4"):
        Recipe.load(p)


def test_two_top_level_stages_keys_are_refused_with_their_lines(tmp_path: Path) -> None:
    text = "stages:\n  - {method: wanda, sparsity: 0.5}\nstages:\n  - {method: magnitude, sparsity: 0.9}\n"
    with pytest.raises(RecipeError, match=r"duplicate key 'stages' on lines 1 and 3"):
        Recipe.load(_write(tmp_path, "r.yml", text))


def test_duplicate_key_in_a_yaml_flow_mapping_is_refused(tmp_path: Path) -> None:
    text = "stages:\n  - {method: wanda, sparsity: 0.5, sparsity: 0.9}\n"
    with pytest.raises(RecipeError, match=r"duplicate key 'sparsity' on line 2;"):
        Recipe.load(_write(tmp_path, "r.yaml", text))


def test_yaml_merge_keys_may_still_be_overridden(tmp_path: Path) -> None:
    text = "stages:\n  - &s {method: wanda, sparsity: 0.5}\n  - <<: *s\n    sparsity: 0.6\n"
    r = Recipe.load(_write(tmp_path, "r.yaml", text))
    assert [s["sparsity"] for s in r.to_dict()["stages"]] == [0.5, 0.6]


def test_duplicate_json_key_is_refused(tmp_path: Path) -> None:
    text = '{"stages": [{"method": "wanda", "sparsity": 0.5, "sparsity": 0.9}]}'
    with pytest.raises(RecipeError, match=r"duplicate key 'sparsity' in the stage of method 'wanda'"):
        Recipe.load(_write(tmp_path, "r.json", text))
    text = '{"stages": [{"method": "wanda", "sparsity": 0.5}], "stages": []}'
    with pytest.raises(RecipeError, match=r"duplicate key 'stages'"):
        Recipe.load(_write(tmp_path, "r.json", text))


def test_duplicate_key_is_one_error_line_in_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    p = _write(tmp_path, "r.yaml", "stages:\n  - method: wanda\n    sparsity: 0.5\n    sparsity: 0.9\n")
    out = tmp_path / "out"
    err = _cli_error(capsys, ["compress", "nowhere", "--recipe", str(p), "--out", str(out)])
    assert "duplicate key 'sparsity' on lines 3 and 4" in err and str(p) in err
    assert not out.exists()


# ------------------------------------------------------------------------- 12: bits budgets


def _resolve(stage: dict) -> list:
    return Recipe.from_dict({"stages": [stage]}).resolve(get_plugin_manager())


def test_bits_budget_below_the_lowest_level_names_the_value_and_the_bound() -> None:
    with pytest.raises(RecipeError) as e:
        _resolve({"method": "gptq", "bits": 1.5, "allocation": {"method": "evopress"}})
    msg = str(e.value)
    assert "bits 1.5" in msg and "at least 2 (the lowest bit-width level)" in msg
    assert "got 1" not in msg and "integer" not in msg


@pytest.mark.parametrize(
    ("bits", "bound"),
    [(9.5, "at most 8"), (float("inf"), "at most 8"), (float("nan"), "a number from 2 to 8")],
)
def test_bits_budget_above_the_levels_or_not_a_number_is_refused(bits: float, bound: str) -> None:
    with pytest.raises(RecipeError, match=bound):
        _resolve({"method": "rtn", "bits": bits, "allocation": "uniform"})


def test_bits_budget_is_checked_against_the_sections_levels() -> None:
    with pytest.raises(RecipeError, match=r"bits 3 .*at least 4 .*\[4, 5\]"):
        _resolve({"method": "rtn", "bits": 3, "allocation": {"method": "uniform", "bits": [4, 5]}})
    with pytest.raises(RecipeError, match=r"bits 3.5 .*at least 4"):
        _resolve({"method": "rtn", "bits": 3.5, "allocation": {"method": "uniform", "bits": [4, 5]}})
    (st,) = _resolve({"method": "rtn", "bits": 4.5, "allocation": {"method": "uniform", "bits": [4, 5]}})
    assert st.allocation.average == 4.5


def test_fractional_bits_outside_an_allocation_is_refused_clearly() -> None:
    with pytest.raises(RecipeError, match=r"integer from 2 to 8, got 2.5; .*needs an allocation"):
        _resolve({"method": "gptq", "bits": 2.5})


def test_whole_float_bits_is_that_integer_with_or_without_an_allocation() -> None:
    (plain,) = _resolve({"method": "rtn", "bits": 4.0})
    (alloc,) = _resolve({"method": "rtn", "bits": 4.0, "allocation": "uniform"})
    assert plain.config.bits == alloc.config.bits == 4 and isinstance(plain.config.bits, int)


def test_bits_budget_error_in_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    p = _write(
        tmp_path, "r.yaml", "stages:\n  - method: gptq\n    bits: 1.5\n    allocation: {method: evopress}\n"
    )
    err = _cli_error(capsys, ["compress", "nowhere", "--recipe", str(p), "--out", str(tmp_path / "o")])
    assert "bits 1.5" in err and "at least 2" in err


# ------------------------------------------------------------------------------ 16: limits


def test_too_many_stages_are_refused_naming_the_limit(tmp_path: Path) -> None:
    stage = {"method": "magnitude", "sparsity": 0.5}
    Recipe.from_dict({"stages": [stage] * MAX_STAGES}).resolve(
        get_plugin_manager()
    )  # the limit itself is fine
    with pytest.raises(RecipeError, match=rf"{MAX_STAGES + 1} stages; at most {MAX_STAGES}"):
        Recipe.from_dict({"stages": [stage] * (MAX_STAGES + 1)})
    p = _write(tmp_path, "r.json", json.dumps({"stages": [stage] * 300_000}))  # 12 MB: JSON parses fast
    with pytest.raises(RecipeError, match=rf"300000 stages; at most {MAX_STAGES}"):
        Recipe.load(p)
    with pytest.raises(RecipeError, match=rf"at most {MAX_STAGES}"):  # built in Python
        Recipe(stages=[llmpress.Stage("magnitude", {"sparsity": 0.5})] * (MAX_STAGES + 1)).resolve()


def test_a_recipe_file_over_the_size_limit_is_refused_before_parsing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    p = tmp_path / "big.yaml"
    p.write_text("stages:\n" + "  - {method: magnitude, sparsity: 0.5}\n" * 1, encoding="utf-8")
    with p.open("a", encoding="utf-8") as f:
        f.write("#" * MAX_RECIPE_BYTES["yaml"])  # a comment: valid YAML, just too big

    def never(*args: object, **kwargs: object) -> None:  # pragma: no cover - must not be reached
        raise AssertionError("parsed a file over the limit")

    monkeypatch.setattr("llmpress.recipe.recipes.yaml.load", never)
    with pytest.raises(RecipeError, match=r"big.yaml is 1.0 MiB; a YAML recipe may be at most 1 MiB"):
        Recipe.load(p)


def test_deeply_nested_recipe_is_an_error_not_a_crash(tmp_path: Path) -> None:
    for name in ("deep.json", "deep.yaml"):
        p = _write(tmp_path, name, "[" * 5_000 + "]" * 5_000)
        with pytest.raises(RecipeError, match="nested too deeply"):
            Recipe.load(p)


def test_a_yaml_alias_bomb_is_refused_before_it_is_expanded(tmp_path: Path) -> None:
    anchors = ['&x0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    anchors += [f"&x{i} [{', '.join([f'*x{i - 1}'] * 10)}]" for i in range(1, 9)]  # 10^9 values
    text = f"stages:\n  - method: magnitude\n    sparsity: 0.5\n    ignore: [{', '.join(anchors)}]\n"
    p = _write(tmp_path, "bomb.yaml", text)
    assert p.stat().st_size < 1000
    with pytest.raises(RecipeError, match=rf"more than {MAX_RECIPE_NODES:,} values through its YAML aliases"):
        Recipe.load(p)


def test_a_recipe_that_contains_itself_is_refused(tmp_path: Path) -> None:
    p = _write(tmp_path, "r.yaml", "stages: &s\n  - method: wanda\n    sparsity: 0.5\n    ignore: *s\n")
    with pytest.raises(RecipeError, match=r"contains itself through a YAML alias \(line 1\)"):
        Recipe.load(p)


@pytest.mark.parametrize("value", [[["mlp"]], 5, {"a": 1}])
def test_targets_and_ignore_must_be_regexes(value: object) -> None:
    for key in ("targets", "ignore"):
        with pytest.raises(RecipeError, match=rf"'{key}' must be a module-name regex or a list of them"):
            Recipe.from_dict({"method": "wanda", "sparsity": 0.5, key: value})


def test_readme_documents_the_recipe_limits() -> None:
    text = README.read_text(encoding="utf-8")
    assert f"at most {MAX_STAGES} stages" in text
    assert f"{MAX_RECIPE_BYTES['yaml'] >> 20} MiB of YAML" in text
    assert f"{MAX_RECIPE_BYTES['json'] >> 20} MiB of JSON" in text
    assert f"past {MAX_RECIPE_NODES:,} values" in text


# ------------------------------------------------------------------- CLI: compress summary


def _compress(tiny_model_dir: Path, tmp_path: Path, recipe: str, capsys: pytest.CaptureFixture) -> str:
    out = tmp_path / "out"
    args = ["compress", str(tiny_model_dir), "--recipe", str(_write(tmp_path, "r.yaml", recipe))]
    assert main([*args, "--calib", str(CALIB), "--out", str(out), "--nsamples", "4", "--seqlen", "32"]) == 0
    (line,) = [x for x in capsys.readouterr().out.splitlines() if x.startswith("compressed ")]
    return line


def _size_mb(line: str) -> float:
    m = re.search(r"([0-9.]+) MB on disk", line)
    assert m, line
    return float(m.group(1))


def test_compress_summary_of_a_quantize_only_recipe(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    line = _compress(
        tiny_model_dir, tmp_path, "stages:\n  - {method: rtn, bits: 4, group_size: 16}\n", capsys
    )
    assert "sparsity" not in line and "4.00 bits per weight" in line, line
    on_disk = sum(f.stat().st_size for f in (tmp_path / "out").rglob("*") if f.is_file()) / 1e6
    assert _size_mb(line) == pytest.approx(on_disk, abs=0.01)
    report = json.loads((tmp_path / "out" / "llmpress_report.json").read_text())
    assert report["average_bits"] == 4 and {m["bits"] for m in report["modules"].values()} == {4}


def test_compress_summary_of_a_pruning_recipe(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    line = _compress(tiny_model_dir, tmp_path, "stages:\n  - {method: magnitude, sparsity: 0.5}\n", capsys)
    assert "overall sparsity 0.5000" in line and "bits per weight" not in line and _size_mb(line) > 0, line


def test_average_bits_weights_layers_by_size() -> None:
    from llmpress.model.report import CompressionReport, ModuleReport

    r = CompressionReport(
        recipe={},
        modules={
            "a": ModuleReport(name="a", methods=["gptq"], shape=(4, 8), bits=2),  # 32 weights
            "b": ModuleReport(name="b", methods=["gptq"], shape=(4, 24), bits=4),  # 96 weights
            "c": ModuleReport(name="c", methods=["wanda"], shape=(4, 8), sparsity=0.5),  # not quantized
        },
    )
    assert r.average_bits == pytest.approx(3.5)
    assert CompressionReport(recipe={}).average_bits is None


# -------------------------------------------------------------------- CLI: plugins listing


def test_plugins_listing_has_headed_sections(capsys: pytest.CaptureFixture) -> None:
    assert main(["plugins"]) == 0
    lines = capsys.readouterr().out.splitlines()
    headings = [i for i, x in enumerate(lines) if x.endswith(":") and not x.startswith(" ")]
    assert [lines[i].split(" (")[0] for i in headings] == [
        "Stage methods",
        "Allocation searches",
        "Kernels and export targets",
        "General plugins",
    ]

    def section(k: int) -> str:
        end = headings[k + 1] if k + 1 < len(headings) else len(lines)
        return "\n".join(lines[headings[k] + 1 : end])

    assert "methods: wanda" in section(0) and "methods: gptq" in section(0) and "evopress" not in section(0)
    assert "methods: evopress" in section(1) and "methods: owl" in section(1) and "wanda" not in section(1)
    assert re.search(r"^export_torch .*kernels: dense, torch$", section(2), re.M)
    assert re.search(r"^masking .*hooks: llmpress_select_mask", section(3), re.M)


def test_plugins_json_keeps_its_shape_and_sections_extend_it(capsys: pytest.CaptureFixture) -> None:
    assert main(["plugins", "--json"]) == 0
    flat = json.loads(capsys.readouterr().out)
    assert flat["wanda"] == ["wanda"] and flat["masking"] == [] and flat["export_cpu"] == []
    assert main(["plugins", "--json", "--sections"]) == 0
    by_kind = json.loads(capsys.readouterr().out)
    assert set(by_kind) == {"stage_methods", "allocation_searches", "kernels", "general"}
    assert by_kind["stage_methods"]["wanda"] == ["wanda"]
    assert by_kind["allocation_searches"]["evopress"] == ["evopress"]
    assert "cpu-int" in by_kind["kernels"]["export_cpu"]
    assert "masking" in by_kind["general"]
    listed = {p for rows in by_kind.values() for p in rows}
    assert listed == set(flat)  # every plugin of the flat listing is in some section


# ----------------------------------------------------------------- CLI: help shows defaults


def test_compress_help_shows_every_default(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:
        main(["compress", "--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # unwrapped
    for option, default in [
        ("--nsamples", "128"),
        ("--seqlen", "2048"),
        ("--seed", "0"),
        ("--device", "cpu"),
        ("--dtype", "auto"),
        ("--format", "llmpress"),
    ]:
        assert re.search(rf"{option} \S+ .*?\(default: {default}\)", text), option
    assert "(default: as many as hold 8192 tokens)" in text  # --batch-size
    assert "(default: none, the whole model on --device)" in text  # --max-gpu-memory


# ------------------------------------------------------------------- README: the snippet runs


def test_readme_dataclass_recipe_snippet_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    (snippet,) = [b for b in blocks if "WandaConfig" in b]
    assert "import WandaConfig" in snippet  # says where it comes from
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(snippet, "README.md", "exec"), scope)
    assert scope["recipe"].to_dict() == {"stages": [{"method": "wanda", "sparsity": 0.5, "pattern": "2:4"}]}
    assert Recipe.load(tmp_path / "wanda-24.yaml").to_dict() == scope["recipe"].to_dict()
