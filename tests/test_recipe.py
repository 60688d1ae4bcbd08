"""Recipes from YAML, JSON, dicts and dataclasses; method configs; errors raised before any work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from models import LLAMA, assert_same_state, calib_ids, is_nm_sparse, snapshot, tiny_llama, weight_of
from torch import nn

import llmpress
import llmpress.pipeline.compress
from llmpress.errors import CalibrationError, ModelError, RecipeError
from llmpress.plugin_manager import make_plugin_manager
from llmpress.plugins.magnitude import MagnitudeConfig
from llmpress.plugins.sparsegpt import SparseGPTConfig
from llmpress.plugins.wanda import WandaConfig
from llmpress.recipe.allocation import AllocationConfig
from llmpress.recipe.config import MethodConfig, PruningConfig
from llmpress.recipe.recipes import Recipe, Stage, as_recipe

ISSUE_RECIPE = """\
stages:
  - method: wanda
    sparsity: 0.5
    pattern: unstructured
"""


@pytest.fixture(scope="module")
def pm():
    return make_plugin_manager()


def _write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


# --------------------------------------------------------------------------------- sources agree


def test_yaml_json_dict_and_dataclass_recipes_agree(tmp_path: Path, pm) -> None:
    expected = {"stages": [{"method": "wanda", "sparsity": 0.5, "pattern": "unstructured"}]}
    from_yaml = Recipe.load(_write(tmp_path, "r.yaml", ISSUE_RECIPE))
    from_yml = Recipe.load(_write(tmp_path, "r.yml", ISSUE_RECIPE))
    from_json = Recipe.load(_write(tmp_path, "r.json", json.dumps(expected)))
    from_dict = Recipe.from_dict(expected)
    from_cls = Recipe(stages=[WandaConfig(sparsity=0.5)])
    for r in (from_yaml, from_yml, from_json, from_dict, from_cls):
        assert r.to_dict() == expected
        (st,) = r.resolve(pm)
        assert st.config == WandaConfig(sparsity=0.5, pattern="unstructured")
        assert st.stage.targets is None and st.stage.ignore == []


def test_dataclass_stage_keeps_targets(pm) -> None:
    r = Recipe(
        stages=[Stage.from_config(SparseGPTConfig(pattern="2:4"), targets=["mlp"], ignore=["down_proj"])]
    )
    d = r.to_dict()
    assert d == {
        "stages": [
            {
                "method": "sparsegpt",
                "sparsity": None,
                "pattern": "2:4",
                "blocksize": 128,
                "percdamp": 0.01,
                "asymmetric": False,
                "alpha": 0.25,
                "targets": ["mlp"],
                "ignore": ["down_proj"],
            }
        ]
    }
    (st,) = Recipe.from_dict(d).resolve(pm)
    assert st.config == SparseGPTConfig(pattern="2:4")
    assert st.stage.targets == ["mlp"] and st.stage.ignore == ["down_proj"]


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_dump_and_load_round_trip(tmp_path: Path, suffix: str, pm) -> None:
    r = Recipe(stages=[MagnitudeConfig(sparsity=0.3, group="row"), WandaConfig(pattern="4:8")])
    path = tmp_path / f"r{suffix}"
    r.dump(path)
    back = Recipe.load(path)
    assert back.to_dict() == r.to_dict()
    assert [s.config for s in back.resolve(pm)] == [
        MagnitudeConfig(sparsity=0.3, group="row"),
        WandaConfig(pattern="4:8"),
    ]


def test_as_recipe_accepts_every_form(tmp_path: Path) -> None:
    d = {"method": "wanda", "sparsity": 0.5}
    forms = [
        d,
        [d],
        {"stages": [d]},
        WandaConfig(sparsity=0.5),
        [WandaConfig(sparsity=0.5)],
        Recipe.from_dict(d),
        str(_write(tmp_path, "a.yaml", "stages:\n  - {method: wanda, sparsity: 0.5}\n")),
        _write(tmp_path, "b.yaml", "- method: wanda\n  sparsity: 0.5\n"),
    ]
    resolved = [as_recipe(f).resolve(make_plugin_manager())[0].config for f in forms]
    assert all(c == WandaConfig(sparsity=0.5) for c in resolved)


def test_options_sub_mapping_is_merged(pm) -> None:
    r = Recipe.from_dict({"stages": [{"method": "sparsegpt", "sparsity": 0.5, "options": {"blocksize": 16}}]})
    assert r.resolve(pm)[0].config == SparseGPTConfig(sparsity=0.5, blocksize=16)


# ------------------------------------------------------------------------- the issue's recipe


@pytest.mark.parametrize(
    ("pattern_yaml", "nm"),
    [
        ("unstructured", None),
        ('"2:4"', (2, 4)),
        ("'4:8'", (4, 8)),
        ("2:4", (2, 4)),
        ("4:8", (4, 8)),
        ('"1:4"', (1, 4)),
    ],
    ids=["unstructured", "2:4-quoted", "4:8-quoted", "2:4-plain", "4:8-plain", "1:4"],
)
def test_issue_recipe_works_as_written(tmp_path: Path, pattern_yaml: str, nm: tuple[int, int] | None) -> None:
    """The recipe of the issue, and its N:M variants, written the way users write YAML.

    Plain ``pattern: 2:4`` must work too: YAML 1.1 reads ``2:4`` as the base-60 integer 124.
    """
    sparsity = 0.5 if nm is None else 1 - nm[0] / nm[1]
    text = ISSUE_RECIPE.replace("pattern: unstructured", f"pattern: {pattern_yaml}")
    if nm is not None and nm != (2, 4):
        text = text.replace("    sparsity: 0.5\n", "")  # sparsity implied by the pattern
    recipe = Recipe.load(_write(tmp_path, "recipe.yaml", text))
    (st,) = recipe.resolve(make_plugin_manager())
    assert st.config.pattern == ("unstructured" if nm is None else f"{nm[0]}:{nm[1]}")
    model, report = llmpress.compress(tiny_llama(), recipe, calib_ids(), progress=False)
    assert set(report.modules) == LLAMA.expected_targets()
    mods = dict(model.named_modules())
    for name in report.modules:
        w = weight_of(mods[name])
        if nm is None:
            assert ((w == 0).sum(1) == w.shape[1] // 2).all(), name
        else:
            assert is_nm_sparse(w, *nm), name
            assert int((w == 0).sum()) == round(w.numel() * sparsity), name


# ---------------------------------------------------------------------------- config round trip


def _configs_of_every_method(pm) -> list[MethodConfig]:
    out = []
    for _, info in sorted(pm.methods.items()):
        cls = info.config_cls
        if issubclass(cls, PruningConfig):
            out += [cls(sparsity=0.25), cls(pattern="2:4"), cls(sparsity=0.75, pattern="1:4")]
        else:  # pragma: no cover - non-pruning methods of later plugins
            out.append(cls())
    return out


def test_every_method_config_round_trips_through_json(pm) -> None:
    configs = _configs_of_every_method(pm) + [
        MagnitudeConfig(sparsity=0.5, group="row"),
        SparseGPTConfig(sparsity=0.6, blocksize=32, percdamp=0.1),
    ]
    assert {c.method for c in configs} >= {"magnitude", "wanda", "sparsegpt"}
    for cfg in configs:
        d = cfg.to_dict()
        assert d["method"] == cfg.method and d["version"] == type(cfg).version
        unset = {"dsnot"} if isinstance(cfg, PruningConfig) and cfg.dsnot is None else set()
        assert set(d) | unset == {"method", "version", *type(cfg).field_names()}  # no refinement: no key
        back = type(cfg).from_dict(json.loads(json.dumps(d)))
        assert back == cfg and type(back) is type(cfg)
        if isinstance(cfg, AllocationConfig):  # an allocation search: under a stage's allocation key
            stage = _STAGE_OF_KIND[sorted(k.value for k in type(cfg).handles)[0]]
            (st,) = Recipe.from_dict({"stages": [{**stage, "allocation": d}]}).resolve(pm)
            assert st.allocation == cfg
            continue
        # as a recipe stage too
        (st,) = Recipe(stages=[cfg]).resolve(pm)
        assert st.config == cfg


_STAGE_OF_KIND = {
    "sparsity": {"method": "sparsegpt", "sparsity": 0.5},
    "bits": {"method": "gptq", "bits": 4},
    "blocks": {"method": "drop_blocks", "blocks": 1},
}


def test_configs_are_frozen_and_hashable() -> None:
    cfg = WandaConfig(sparsity=0.5)
    with pytest.raises(AttributeError):
        cfg.sparsity = 0.1  # type: ignore[misc]
    assert hash(cfg) == hash(WandaConfig(sparsity=0.5))


def test_from_dict_rejects_newer_version_and_wrong_method() -> None:
    with pytest.raises(RecipeError, match="newer than this llmpress supports"):
        WandaConfig.from_dict({"method": "wanda", "version": 99, "sparsity": 0.5})
    with pytest.raises(RecipeError, match="'magnitude' given to WandaConfig"):
        WandaConfig.from_dict({"method": "magnitude", "sparsity": 0.5})


def test_sparsity_target_of_configs() -> None:
    assert WandaConfig(pattern="2:4").sparsity_target().sparsity == 0.5
    assert WandaConfig(pattern="2:4").sparsity_target().nm == (2, 4)
    assert WandaConfig(sparsity=0.3).sparsity_target().group == "row"
    assert MagnitudeConfig(sparsity=0.3).sparsity_target().group == "layer"
    assert MagnitudeConfig(sparsity=0.3, group="row").sparsity_target().group == "row"
    assert WandaConfig(sparsity=0.5, pattern="2:4").sparsity_target().pattern == "2:4"


# ------------------------------------------------------------------------------- bad recipes

BAD_STAGES = [
    ({"method": "wandaa", "sparsity": 0.5}, r"unknown method 'wandaa'; known methods: .*wanda"),
    ({"method": "wanda", "sparsity": 0.5, "pattern": "3-4"}, r"unknown sparsity pattern '3-4'"),
    ({"method": "wanda", "pattern": "4:2"}, r"pattern '4:2': need 0 < N < M"),
    ({"method": "wanda", "pattern": "0:4"}, r"pattern '0:4': need 0 < N < M"),
    ({"method": "wanda", "pattern": "4:4"}, r"pattern '4:4': need 0 < N < M"),
    ({"method": "wanda", "sparsity": 1.0}, r"sparsity 1.0 is outside \[0, 1\)"),
    ({"method": "wanda", "sparsity": -0.1}, r"sparsity -0.1 is outside \[0, 1\)"),
    ({"method": "wanda", "sparsity": "half"}, r"sparsity must be a number, got 'half'"),
    ({"method": "wanda", "sparsity": True}, r"sparsity must be a number"),
    ({"method": "wanda"}, r"'sparsity' is required"),
    ({"method": "wanda", "sparsity": 0.6, "pattern": "2:4"}, r"sparsity 0.6 contradicts pattern '2:4'"),
    (
        {"method": "wanda", "sparsity": 0.5, "targets": ["no_such_layer"]},
        r"target 'no_such_layer' matches no linear",
    ),
    ({"method": "wanda", "sparsity": 0.5, "targets": ["lm_head"]}, r"outside the repeated blocks"),
    ({"method": "wanda", "sparsity": 0.5, "targets": ["mlp("]}, r"bad target regex 'mlp\('"),
    ({"method": "wanda", "sparsity": 0.5, "ignore": ["."]}, r"match no layer \(after 'ignore'\)"),
    (
        {"method": "wanda", "sparsity": 0.5, "sparsityy": 0.5},
        r"unknown option\(s\) \['sparsityy'\] for method 'wanda'",
    ),
    ({"method": "magnitude", "sparsity": 0.5, "group": "column"}, r"group must be 'layer' or 'row'"),
    ({"method": "sparsegpt", "sparsity": 0.5, "blocksize": 0}, r"blocksize must be an integer >= 1"),
    ({"method": "sparsegpt", "sparsity": 0.5, "percdamp": -1}, r"percdamp must be a number in"),
]


class NoWork:
    """A plugin that fails the test if any layer is scored or updated."""

    @llmpress.hookimpl(wrapper=True)
    def llmpress_score_importance(self, module, stats, config):  # noqa: ANN001, ANN201
        raise AssertionError("a layer was scored before the recipe was validated")
        yield  # unreachable: makes this a generator, as pluggy wrappers are

    @llmpress.hookimpl(wrapper=True)
    def llmpress_update_weights(self, module, mask, stats, config):  # noqa: ANN001, ANN201
        raise AssertionError("a layer was updated before the recipe was validated")
        yield  # unreachable: makes this a generator, as pluggy wrappers are


@pytest.mark.parametrize(("stage", "message"), BAD_STAGES, ids=[m[1][:40] for m in BAD_STAGES])
def test_bad_stage_fails_before_any_work(stage: dict, message: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each bad stage comes *second*, after a valid one: nothing may be pruned or even calibrated."""

    def no_calibration(*a: object, **k: object) -> None:
        raise AssertionError("calibration was built before the recipe was validated")

    monkeypatch.setattr(llmpress.pipeline.compress, "build_calibration", no_calibration, raising=False)
    pm = make_plugin_manager(extra_plugins=[NoWork()])
    model = tiny_llama()
    before = snapshot(model)
    recipe = {"stages": [{"method": "magnitude", "sparsity": 0.5}, stage]}
    with pytest.raises(RecipeError, match=message):
        llmpress.compress(model, recipe, calib_ids(), pm=pm, progress=False)
    assert_same_state(model, before)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"stages": []}, "no stages"),
        ({"stages": [{"sparsity": 0.5}]}, "stage 0 must be a mapping with a 'method' key"),
        (
            {"stages": [{"method": "wanda", "sparsity": 0.5}], "model": "x"},
            r"unknown top-level recipe keys \['model'\]",
        ),
        ("wanda", "a recipe is a mapping with a 'stages' list"),
        (42, "a recipe is a mapping"),
    ],
)
def test_malformed_recipe_structure(data: object, message: str) -> None:
    with pytest.raises(RecipeError, match=message):
        Recipe.from_dict(data).resolve(make_plugin_manager())


def test_stage_index_is_named_in_option_errors() -> None:
    r = Recipe.from_dict(
        {"stages": [{"method": "magnitude", "sparsity": 0.5}, {"method": "wanda", "sparsity": 2}]}
    )
    with pytest.raises(RecipeError, match=r"stage 1 \(wanda\): .*sparsity 2"):
        r.resolve(make_plugin_manager())


def test_recipe_file_errors(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="does not exist"):
        Recipe.load(tmp_path / "missing.yaml")
    with pytest.raises(RecipeError, match="not valid YAML"):
        Recipe.load(_write(tmp_path, "bad.yaml", "stages: [\n  - method: wanda\n"))
    with pytest.raises(RecipeError, match="not valid JSON"):
        Recipe.load(_write(tmp_path, "bad.json", '{"stages": [}'))
    with pytest.raises(RecipeError, match=r"bad2\.yaml: unknown top-level recipe keys"):
        Recipe.load(_write(tmp_path, "bad2.yaml", "stages: []\nextra: 1\n"))


def test_nm_not_dividing_in_features_is_a_model_error_naming_the_module() -> None:
    model = tiny_llama(
        hidden=36, intermediate=72, head_dim=8
    )  # q/k/v/gate/up in_features 36: not a multiple of 8
    before = snapshot(model)
    with pytest.raises(
        ModelError,
        match=r"pattern 4:8 does not divide model\.layers\.0\.self_attn\.q_proj: "
        r"in_features=36 is not a multiple of 8",
    ):
        llmpress.compress(model, {"method": "wanda", "pattern": "4:8"}, calib_ids(), progress=False)
    assert_same_state(model, before)
    # the fix the message suggests: target only layers the pattern tiles (down_proj: 72 inputs, o_proj: 32)
    model, report = llmpress.compress(
        model,
        {"method": "wanda", "pattern": "4:8", "targets": ["down_proj", "o_proj"]},
        calib_ids(),
        progress=False,
    )
    assert {n.rsplit(".", 1)[1] for n in report.modules} == {"down_proj", "o_proj"}
    assert all(is_nm_sparse(weight_of(model.get_submodule(n)), 4, 8) for n in report.modules)


def test_model_without_blocks_is_a_model_error() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16))
    before = snapshot(model)
    with pytest.raises(ModelError, match="no supported blocks"):
        llmpress.compress(model, {"method": "magnitude", "sparsity": 0.5}, progress=False)
    assert_same_state(model, before)


def test_missing_calibration_is_an_error_before_any_work() -> None:
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(CalibrationError, match=r"\['wanda'\] need calibration data"):
        llmpress.compress(model, [MagnitudeConfig(sparsity=0.5), WandaConfig(sparsity=0.5)], progress=False)
    assert_same_state(model, before)
    with pytest.raises(CalibrationError, match="needs a tokenizer"):
        llmpress.compress(model, WandaConfig(sparsity=0.5), ["some text"], progress=False)
    assert_same_state(model, before)


def test_magnitude_needs_no_calibration() -> None:
    model, report = llmpress.compress(tiny_llama(), {"method": "magnitude", "sparsity": 0.5}, progress=False)
    assert report.calibration == {}
    assert report.overall_sparsity == pytest.approx(0.5)


# --------------------------------------------------------------------------- targets and stages


def test_targets_and_ignore_select_layers() -> None:
    model = tiny_llama()
    before = snapshot(model)
    model, report = llmpress.compress(
        model,
        {"method": "magnitude", "sparsity": 0.5, "targets": ["mlp"], "ignore": ["down_proj"]},
        progress=False,
    )
    expected = {f"model.layers.{i}.mlp.{p}" for i in range(2) for p in ("gate_proj", "up_proj")}
    assert set(report.modules) == expected
    after = model.state_dict()
    for k, v in before.items():
        if k.removesuffix(".weight") in expected:
            assert int((after[k] == 0).sum()) == v.numel() // 2
        else:
            assert torch.equal(after[k], v), k


def test_later_stage_keeps_earlier_zeros() -> None:
    """magnitude 30 % then wanda 50 %: every weight the first stage zeroed stays zero."""
    first, _ = llmpress.compress(
        tiny_llama(), {"method": "magnitude", "sparsity": 0.3, "group": "row"}, progress=False
    )
    zeros1 = {n: weight_of(m) == 0 for n, m in first.named_modules() if n in LLAMA.expected_targets()}
    model, report = llmpress.compress(
        tiny_llama(),
        [MagnitudeConfig(sparsity=0.3, group="row"), SparseGPTConfig(sparsity=0.5)],
        calib_ids(),
        progress=False,
    )
    for n, z in zeros1.items():
        w = weight_of(model.get_submodule(n))
        assert (w[z] == 0).all(), n
        assert (w == 0).float().mean() >= 0.5 - 1e-6
        assert report.modules[n].methods == ["magnitude", "sparsegpt"]
    assert report.recipe["stages"][0]["method"] == "magnitude"
