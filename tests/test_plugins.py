"""Plugin discovery (entry points), blocking, validation, the method registry and a third-party plugin."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import types
import warnings
from pathlib import Path
from typing import ClassVar

import pluggy
import pytest
import torch
from models import LLAMA, calib_ids, is_nm_sparse, snapshot, tiny_llama, weight_of

import llmpress
from llmpress import hookimpl
from llmpress.cli.main import main
from llmpress.errors import RecipeError
from llmpress.plugin_manager import DISABLE_ENV, ENTRY_POINT_GROUP, make_plugin_manager
from llmpress.plugins.wanda import WandaConfig
from llmpress.recipe.config import PruningConfig
from llmpress.recipe.recipes import Recipe

BUILTIN_PLUGINS = {"masking", "magnitude", "wanda", "sparsegpt"}
BUILTIN_METHODS = {"magnitude", "wanda", "sparsegpt"}
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "third_party_plugin"


def make_plugin(name: str, **hooks: object) -> types.ModuleType:
    """A plugin module named ``name`` holding ``hooks``."""
    mod = types.ModuleType(name)
    for k, v in hooks.items():
        setattr(mod, k, v)
    return mod


@pytest.fixture(autouse=True)
def _no_disabled_plugins(monkeypatch: pytest.MonkeyPatch, fresh_plugin_manager: None) -> None:
    monkeypatch.delenv(DISABLE_ENV, raising=False)


# ------------------------------------------------------------------------------------ built-ins


def test_builtins_are_discovered_through_entry_points() -> None:
    pm = make_plugin_manager()
    assert set(pm.plugins()) >= BUILTIN_PLUGINS
    assert set(pm.methods) >= BUILTIN_METHODS
    for name in BUILTIN_PLUGINS:
        assert pm.plugin_origin(name) == f"llmpress {llmpress.__version__}"  # came from llmpress's dist-info
    assert pm.plugins()["masking"] == []
    assert {pm.methods[m].plugin for m in BUILTIN_METHODS} == BUILTIN_METHODS
    for m in BUILTIN_METHODS:
        assert pm.methods[m].config_cls.method == m


def test_without_entry_points_nothing_is_registered() -> None:
    pm = make_plugin_manager(load_entrypoints=False)
    assert pm.methods == {}
    with pytest.raises(RecipeError, match=r"unknown method 'wanda'; known methods: \(none\)"):
        pm.method("wanda")


def test_each_manager_is_fresh() -> None:
    a, b = make_plugin_manager(), make_plugin_manager()
    assert a.pm is not b.pm
    assert a.methods.keys() == b.methods.keys()


def test_process_wide_manager_is_cached_and_resettable() -> None:
    from llmpress.plugin_manager import get_plugin_manager, reset_plugin_manager

    a = get_plugin_manager()
    assert get_plugin_manager() is a
    reset_plugin_manager()
    assert get_plugin_manager() is not a


# ------------------------------------------------------------------------------------- blocking


def test_disable_env_blocks_a_plugin(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DISABLE_ENV, "wanda")
    pm = make_plugin_manager()
    assert "wanda" not in pm.methods
    assert "wanda" not in pm.plugins()
    assert {"magnitude", "sparsegpt"} <= set(pm.methods)
    with pytest.raises(RecipeError, match=r"unknown method 'wanda'; known methods: ") as e:
        Recipe.from_dict({"stages": [{"method": "wanda", "sparsity": 0.5}]}).resolve(pm)
    known = str(e.value).split("known methods: ", 1)[1].split(".", 1)[0].split(", ")
    assert known == sorted(pm.methods) and "wanda" not in known


def test_disabled_method_fails_compress_before_any_work(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DISABLE_ENV, " wanda , sparsegpt ")
    pm = make_plugin_manager()
    assert set(pm.methods) & {"wanda", "sparsegpt"} == set()
    model = tiny_llama()
    before = snapshot(model)
    recipe = {"stages": [{"method": "magnitude", "sparsity": 0.5}, {"method": "wanda", "sparsity": 0.5}]}
    with pytest.raises(RecipeError, match="unknown method 'wanda'"):
        llmpress.compress(model, recipe, calib_ids(), pm=pm, progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_disabled_method_via_cli(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, tmp_path: Path
) -> None:
    monkeypatch.setenv(DISABLE_ENV, "wanda")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("stages:\n  - method: wanda\n    sparsity: 0.5\n")
    out = tmp_path / "out"
    rc = main(["compress", str(tmp_path / "no-model"), "--recipe", str(recipe), "--out", str(out)])
    assert rc == 2
    assert "unknown method 'wanda'" in capsys.readouterr().err
    assert not out.exists()


# ----------------------------------------------------------------------------------- validation


def test_misspelled_hookimpl_is_rejected() -> None:
    @llmpress.hookimpl
    def llmpress_score_importanse(module, stats, config):  # noqa: ANN001, ANN202 - the typo under test
        return None

    bad = make_plugin("typo_plugin", llmpress_score_importanse=llmpress_score_importanse)
    with pytest.raises(pluggy.PluginValidationError, match="llmpress_score_importanse"):
        make_plugin_manager(extra_plugins=[bad])


def test_hookimpl_with_unknown_argument_is_rejected() -> None:
    @llmpress.hookimpl
    def llmpress_score_importance(module, statistics, config):  # noqa: ANN001, ANN202
        return None

    bad = make_plugin("bad_args", llmpress_score_importance=llmpress_score_importance)
    with pytest.raises(pluggy.PluginValidationError, match="statistics"):
        make_plugin_manager(extra_plugins=[bad])


def test_duplicate_method_registration_is_a_clear_error() -> None:
    @llmpress.hookimpl
    def llmpress_register_methods(register):  # noqa: ANN001, ANN202
        register("wanda", WandaConfig)

    dup = make_plugin("my_wanda", llmpress_register_methods=llmpress_register_methods)
    with pytest.raises(
        RecipeError,
        match=r"method 'wanda' registered twice: by .*'wanda'.*'my_wanda'|"
        r"method 'wanda' registered twice: by .*'my_wanda'.*'wanda'",
    ):
        make_plugin_manager(extra_plugins=[dup])


def test_registering_a_non_config_is_an_error() -> None:
    @llmpress.hookimpl
    def llmpress_register_methods(register):  # noqa: ANN001, ANN202
        register("thing", dict)

    with pytest.raises(TypeError, match="MethodConfig subclass"):
        make_plugin_manager(
            extra_plugins=[make_plugin("bad_reg", llmpress_register_methods=llmpress_register_methods)]
        )


def test_registered_name_must_match_config_method() -> None:
    @llmpress.hookimpl
    def llmpress_register_methods(register):  # noqa: ANN001, ANN202
        register("wanda2", WandaConfig)

    with pytest.raises(TypeError, match="'wanda'.*'wanda2'"):
        make_plugin_manager(
            extra_plugins=[make_plugin("bad_name", llmpress_register_methods=llmpress_register_methods)]
        )


# ------------------------------------------------------------------------ an in-process plugin


@dataclasses.dataclass(frozen=True)
class EvenColumnsConfig(PruningConfig):
    """Keeps the even input columns: a method that overrides the default mask selection."""

    method: ClassVar[str] = "even_columns"
    needs_calibration: ClassVar[bool] = False


@llmpress.hookimpl
def _register_even(register):  # noqa: ANN001, ANN202
    register("even_columns", EvenColumnsConfig)


@llmpress.hookimpl
def _score_even(module, stats, config):  # noqa: ANN001, ANN202
    if not isinstance(config, EvenColumnsConfig):
        return None
    return weight_of(module).abs().float()


@llmpress.hookimpl
def _select_even(scores, target, config):  # noqa: ANN001, ANN202
    if not isinstance(config, EvenColumnsConfig):
        return None
    keep = torch.zeros_like(scores, dtype=torch.bool)
    keep[:, ::2] = True
    return keep


EVEN_PLUGIN = make_plugin(
    "even_columns_plugin",
    llmpress_register_methods=_register_even,
    llmpress_score_importance=_score_even,
    llmpress_select_mask=_select_even,
)
# pluggy reads hook names from the attribute names, so the functions may be named anything


def test_extra_plugin_overrides_default_mask_selection_for_its_config_only() -> None:
    pm = make_plugin_manager(extra_plugins=[EVEN_PLUGIN])
    assert pm.methods["even_columns"].plugin == "even_columns_plugin"
    model, report = llmpress.compress(
        tiny_llama(), {"method": "even_columns", "sparsity": 0.5}, pm=pm, progress=False
    )
    mods = dict(model.named_modules())
    assert set(report.modules) == LLAMA.expected_targets()
    for name in report.modules:
        w = weight_of(mods[name])
        assert (w[:, 1::2] == 0).all() and (w[:, ::2] != 0).all(), name
    # other methods still get the default selection: wanda prunes by score, not by column parity
    model, _ = llmpress.compress(
        tiny_llama(), {"method": "wanda", "sparsity": 0.5}, calib_ids(), pm=pm, progress=False
    )
    w = weight_of(model.model.layers[0].mlp.up_proj)
    assert not (w[:, 1::2] == 0).all()
    assert ((w == 0).sum(1) == w.shape[1] // 2).all()


# --------------------------------------------------------------------------------------- CLI


def test_cli_plugins_lists_methods(capsys: pytest.CaptureFixture) -> None:
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.strip().splitlines()}
    assert set(lines) >= BUILTIN_PLUGINS
    for m in BUILTIN_METHODS:
        assert f"methods: {m}" in lines[m]
    assert "llmpress 0.1.0" in lines["wanda"]


def test_cli_plugins_json(capsys: pytest.CaptureFixture) -> None:
    assert main(["plugins", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows["wanda"] == ["wanda"] and rows["masking"] == []
    assert set(rows) >= BUILTIN_PLUGINS


# ---------------------------------------------------------------------- a third-party package


def _install_by_hand(src: Path, target: Path) -> None:
    """What ``pip install --target`` writes that discovery reads: the module and a dist-info
    whose ``entry_points.txt`` is the example's ``[project.entry-points.llmpress]`` table."""
    text = (src / "pyproject.toml").read_text(encoding="utf-8")
    name = re.search(r'^name = "([^"]+)"', text, re.M).group(1)  # type: ignore[union-attr]
    version = re.search(r'^version = "([^"]+)"', text, re.M).group(1)  # type: ignore[union-attr]
    table = text.split(f"[project.entry-points.{ENTRY_POINT_GROUP}]", 1)[1].split("\n[", 1)[0]
    eps = [
        f"{k.strip()} = {v.strip().strip(chr(34))}"
        for k, v in (
            line.split("=", 1) for line in table.splitlines() if "=" in line and not line.startswith("#")
        )
    ]
    dist_info = target / f"{name.replace('-', '_')}-{version}.dist-info"
    dist_info.mkdir(parents=True)
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (dist_info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\n" + "\n".join(eps) + "\n")
    shutil.copy(src / "llmpress_random_prune.py", target / "llmpress_random_prune.py")


@pytest.fixture(scope="session")
def installed_example(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``pip install`` the example plugin (a real wheel build) into a private target folder.

    A private ``--target`` (rather than the venv itself) keeps xdist workers independent and
    leaves nothing to uninstall; the folder goes on ``sys.path`` only for the tests that use it.
    """
    base = tmp_path_factory.mktemp("third_party")
    src = base / "src"
    shutil.copytree(EXAMPLE, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    target = base / "site"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-q",
            "--target",
            str(target),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if r.returncode != 0:  # e.g. no setuptools in this venv: lay the files out as pip would
        warnings.warn(
            f"pip could not build the example plugin, installing by hand: {r.stderr.strip()[-300:]}",
            stacklevel=1,
        )
        shutil.rmtree(target, ignore_errors=True)
        _install_by_hand(src, target)
    assert (target / "llmpress_random_prune.py").is_file()
    (dist,) = importlib.metadata.distributions(path=[str(target)])
    assert dist.metadata["Name"] == "llmpress-random-prune"
    eps = [(e.group, e.name, e.value) for e in dist.entry_points]
    assert eps == [(ENTRY_POINT_GROUP, "random_prune", "llmpress_random_prune")]
    return target


@pytest.fixture
def random_plugin(installed_example: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(installed_example))
    yield installed_example
    sys.modules.pop("llmpress_random_prune", None)


def test_third_party_plugin_is_discovered(random_plugin: Path) -> None:
    pm = make_plugin_manager()
    assert pm.methods["random"].plugin == "random_prune"
    assert pm.plugins()["random_prune"] == ["random"]
    assert pm.plugin_origin("random_prune") == "llmpress-random-prune 0.1.0"
    assert set(pm.methods) >= BUILTIN_METHODS
    cfg = pm.methods["random"].config_cls
    assert issubclass(cfg, PruningConfig)
    assert dataclasses.is_dataclass(cfg) and cfg.__dataclass_params__.frozen
    assert cfg(sparsity=0.5).seed == 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg(sparsity=0.5).seed = 3  # type: ignore[misc]


def test_third_party_plugin_can_be_disabled(random_plugin: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DISABLE_ENV, "random_prune")
    pm = make_plugin_manager()
    assert "random" not in pm.methods
    with pytest.raises(RecipeError, match="unknown method 'random'"):
        Recipe.from_dict({"method": "random", "sparsity": 0.5}).resolve(pm)


def test_third_party_plugin_in_cli_listing(random_plugin: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["plugins", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows["random_prune"] == ["random"]
    assert main(["plugins"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("random_prune"))
    assert "llmpress-random-prune 0.1.0" in line and "methods: random" in line


def test_third_party_plugin_in_cli_subprocess(installed_example: Path) -> None:
    extra = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(installed_example), *extra])}
    env.pop(DISABLE_ENV, None)
    r = subprocess.run(
        [sys.executable, "-m", "llmpress", "plugins", "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["random_prune"] == ["random"]


def test_third_party_method_compresses_to_exact_row_sparsity(random_plugin: Path) -> None:
    pm = make_plugin_manager()
    model = tiny_llama()
    before = snapshot(model)
    model, report = llmpress.compress(model, {"method": "random", "sparsity": 0.5}, pm=pm, progress=False)
    assert set(report.modules) == LLAMA.expected_targets()
    assert report.recipe == {"stages": [{"method": "random", "sparsity": 0.5}]}
    mods = dict(model.named_modules())
    for name in report.modules:
        w = weight_of(mods[name])
        assert ((w == 0).sum(1) == w.shape[1] // 2).all(), name
        assert report.modules[name].sparsity == 0.5
        assert report.modules[name].methods == ["random"]
        # the kept weights are the original ones (no update)
        kept = w != 0
        assert torch.equal(w[kept], before[f"{name}.weight"][kept])
    # random, not magnitude: the pruned set is not the smallest half of every row
    w0 = before["model.layers.0.mlp.up_proj.weight"]
    mag = w0.abs() <= w0.abs().median(dim=1, keepdim=True).values
    assert not torch.equal(mag, weight_of(mods["model.layers.0.mlp.up_proj"]) == 0)


def test_third_party_method_seed_option(random_plugin: Path) -> None:
    pm = make_plugin_manager()

    def masks(recipe: dict) -> list[torch.Tensor]:
        model, _ = llmpress.compress(tiny_llama(), recipe, pm=pm, progress=False)
        return [weight_of(m) == 0 for n, m in model.named_modules() if n.endswith(("q_proj", "down_proj"))]

    a = masks({"method": "random", "sparsity": 0.5, "seed": 1})
    b = masks({"method": "random", "sparsity": 0.5, "seed": 1})
    c = masks({"method": "random", "sparsity": 0.5, "seed": 2})
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    cfg = Recipe.from_dict({"method": "random", "sparsity": 0.5, "seed": 7}).resolve(pm)[0].config
    assert cfg.to_dict() == {
        "method": "random",
        "version": 1,
        "sparsity": 0.5,
        "pattern": "unstructured",
        "seed": 7,
    }
    assert type(cfg).from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(RecipeError, match="seed"):
        Recipe.from_dict({"method": "random", "sparsity": 0.5, "seed": -1}).resolve(pm)
    with pytest.raises(RecipeError, match="unknown option"):
        Recipe.from_dict({"method": "random", "sparsity": 0.5, "sed": 1}).resolve(pm)


def test_third_party_method_with_nm_pattern(random_plugin: Path) -> None:
    pm = make_plugin_manager()
    model, report = llmpress.compress(
        tiny_llama(), {"method": "random", "pattern": "2:4"}, pm=pm, progress=False
    )
    mods = dict(model.named_modules())
    for name in report.modules:
        w = weight_of(mods[name])
        assert is_nm_sparse(w, 2, 4) and int((w == 0).sum()) == w.numel() // 2


def test_dispatch_by_config_type_calls_only_the_owning_plugin(random_plugin: Path) -> None:
    """A method plugin's hooks see only its own configs; general plugins (masking) see all."""
    import llmpress_random_prune as rp

    seen: list[type] = []

    @dataclasses.dataclass(frozen=True)
    class SpyConfig(PruningConfig):
        method: ClassVar[str] = "spy"
        needs_calibration: ClassVar[bool] = False

    class Spy:
        @hookimpl
        def llmpress_register_methods(self, register) -> None:  # noqa: ANN001
            register("spy", SpyConfig)

        @hookimpl
        def llmpress_score_importance(self, module, stats, config) -> torch.Tensor:  # noqa: ANN001
            seen.append(type(config))
            return weight_of(module).abs()

    pm = make_plugin_manager([Spy()])
    recipe = {"stages": [{"method": "random", "sparsity": 0.25}, {"method": "spy", "sparsity": 0.5}]}
    model, report = llmpress.compress(tiny_llama(), recipe, pm=pm, progress=False)
    assert seen and set(seen) == {SpyConfig}
    assert report.modules["model.layers.0.mlp.up_proj"].methods == ["random", "spy"]
    layer = torch.nn.Linear(16, 8)
    s = pm.hooks_for(rp.RandomPruneConfig(sparsity=0.5)).score(
        layer, None, rp.RandomPruneConfig(sparsity=0.5)
    )
    assert s is not None and s.shape == (8, 16)
    assert pm.hooks_for(SpyConfig(sparsity=0.5)).score(layer, None, SpyConfig(sparsity=0.5)) is not None
    with pytest.raises(RecipeError, match="not a registered method config"):
        make_plugin_manager().hooks_for(SpyConfig(sparsity=0.5))


def test_builtin_methods_supply_citations() -> None:
    pm = make_plugin_manager()
    for m in BUILTIN_METHODS:
        bib = pm.methods[m].config_cls.citation
        assert isinstance(bib, str) and bib.lstrip().startswith("@"), m
    method_citations = __import__("llmpress.hub.card", fromlist=["method_citations"]).method_citations
    assert method_citations(["no-such-method"], pm) == ([], ["no-such-method"])
