"""Allocation: level sets and budgets, the EvoPress search and its checkpoint, the level
database (fingerprint, reuse, stitched = direct), OWL's formula, ShortGPT/SLEB on a model
with redundant blocks, recipes through the API and the CLI, and saved models that reload."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from models import DATA_DIR, calib_ids, tiny_llama, weight_of
from transformers import AutoModelForCausalLM

import llmpress
from llmpress.allocation.level_sets import bit_levels, drop_levels, sparsity_levels
from llmpress.allocation.problem import AllocationProblem, moves_from
from llmpress.cli.main import main
from llmpress.engine.stats import StatsCollector
from llmpress.errors import AllocationError, RecipeError
from llmpress.format.save import save_result, to_runtime
from llmpress.math.linalg import inverse_cholesky_upper
from llmpress.plugins.evopress import EvoPressConfig, evolve, mutate
from llmpress.plugins.gptq import GPTQConfig, gptq_quantize
from llmpress.plugins.owl import nearest_levels, outlier_ratio, owl_sparsities
from llmpress.plugins.sparsegpt import sparsegpt_prune

IDS = calib_ids(4, 32)
FAST = {"sparsity_step": 0.1, "sparsity_span": 0.2}
NUMELS = [1024, 256, 256, 1024, 2048, 2048, 2048] * 2


def _problem(levels, fitness=None, **kw) -> AllocationProblem:  # noqa: ANN001
    return AllocationProblem(
        kind="sparsity",
        units=[f"u{i}" for i in range(len(levels.values))],
        levels=levels.values,
        costs=levels.costs,
        start=levels.start,
        budget=levels.budget,
        target=0.5,
        fitness=fitness or (lambda lv, t: 0.0),
        max_tokens=1024,
        seqlen=32,
        progress=False,
        **kw,
    )


def _toy_fitness(weights: list[float]):  # noqa: ANN202
    """A non-separable toy fitness: weighted sum of level values plus a coupling term."""

    def f(levels, tokens):  # noqa: ANN001, ANN202
        v = [w * lv for w, lv in zip(weights, levels)]
        return sum(x * x for x in v) + 0.1 * v[0] * v[-1] + 1.0 / tokens

    return f


# ------------------------------------------------------------------ level sets and budgets


@pytest.mark.parametrize("kind", ["sparsity", "bits", "blocks"])
def test_no_mutation_ever_breaks_the_budget(kind: str) -> None:
    if kind == "sparsity":
        ls = sparsity_levels(NUMELS, 0.7, 0.05, 0.25, 0.95)
    elif kind == "bits":
        ls = bit_levels(NUMELS, 2.5, range(2, 9))
    else:
        ls = drop_levels(8, 2)
    p = _problem(ls)
    p.check(ls.start)  # the uniform start meets it exactly
    rng = random.Random(0)
    levels = list(ls.start)
    for _ in range(300):
        levels = mutate(p, levels, rng, 3)
        assert p.cost(levels) == p.budget
        p.check(levels)


def test_sparsity_levels_are_equal_absolute_steps_and_average_the_target() -> None:
    ls = sparsity_levels(NUMELS, 0.7, 0.05, 0.25, 0.95)
    steps = {b - a for c in ls.costs for a, b in zip(c, c[1:])}
    assert len(steps) == 1  # one absolute step for every layer
    assert ls.budget == sum(round(0.7 * n) for n in NUMELS)
    assert all(abs(ls.values[i][ls.start[i]] - 0.7) <= 0.5 / n for i, n in enumerate(NUMELS))
    p = _problem(ls)
    assert moves_from(p, ls.start, 0) == list(range(1, len(NUMELS)))  # any layer can pay for layer 0


def test_bit_levels_start_meets_fractional_average_and_bad_budgets_are_refused() -> None:
    ls = bit_levels(NUMELS, 2.5, range(2, 9))
    assert ls.budget == 2.5 * sum(NUMELS)
    with pytest.raises(AllocationError, match="outside the levels"):
        bit_levels(NUMELS, 9, range(2, 9))
    with pytest.raises(AllocationError, match="cannot start uniformly"):
        bit_levels([100, 200, 300], 2.5, range(2, 9))
    with pytest.raises(AllocationError, match="fewer than the model's depth"):
        drop_levels(4, 4)


# ------------------------------------------------------------------ EvoPress


def test_evopress_improves_and_resumes_to_the_identical_result(tmp_path: Path) -> None:
    ls = sparsity_levels(NUMELS, 0.5, 0.05, 0.25, 0.95)
    weights = [random.Random(i).uniform(0.1, 2.0) for i in range(len(NUMELS))]
    cfg = EvoPressConfig(generations=8, offspring=4, tokens=(64, 256), survivors=(2,))
    full = evolve(_problem(ls, _toy_fitness(weights), fingerprint="x"), cfg)
    assert full.history[-1] <= full.history[0] and len(full.history) == 8
    assert full.history == sorted(full.history, reverse=True)  # elitism: never worse

    ck = tmp_path / "search.json"
    calls = {"n": 0}

    def interrupted(levels, tokens):  # noqa: ANN001, ANN202
        calls["n"] += 1
        if calls["n"] > 20:  # killed in the middle of a generation
            raise KeyboardInterrupt
        return _toy_fitness(weights)(levels, tokens)

    with pytest.raises(KeyboardInterrupt):
        evolve(_problem(ls, interrupted, fingerprint="x", checkpoint=str(ck)), cfg)
    assert json.loads(ck.read_text())["generation"] >= 1
    resumed = evolve(_problem(ls, _toy_fitness(weights), fingerprint="x", checkpoint=str(ck)), cfg)
    assert resumed.levels == full.levels and resumed.history == full.history
    assert resumed.fitness == full.fitness
    with pytest.raises(AllocationError, match="another search"):
        evolve(_problem(ls, _toy_fitness(weights), fingerprint="other", checkpoint=str(ck)), cfg)


# ------------------------------------------------------------------ OWL


def test_owl_formula_on_a_hand_built_example() -> None:
    s = owl_sparsities([0.01, 0.03, 0.02, 0.06], 0.7, 0.08)
    # mean 0.03; deviations 0.02, 0, 0.01, -0.03; the farthest block sits at -lambda
    assert s == pytest.approx([0.7 + 0.08 * 2 / 3, 0.7, 0.7 + 0.08 / 3, 0.62])
    assert sum(s) / 4 == pytest.approx(0.7)
    assert all(0.62 - 1e-12 <= x <= 0.78 + 1e-12 for x in s)
    # outlier ratio: scores above M x mean
    scores = [torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 11.0]])]  # mean 2
    assert outlier_ratio(scores, 5.0) == pytest.approx(0.1)
    assert outlier_ratio(scores, 6.0) == 0.0


def test_owl_levels_follow_block_sparsity_within_one_step_and_meet_the_budget() -> None:
    numels = [1024, 2048] * 4
    ls = sparsity_levels(numels, 0.6, 0.02, 0.3, 0.95)
    p = _problem(ls, groups=[0, 0, 1, 1, 2, 2, 3, 3])
    wanted = [x for b in owl_sparsities([0.1, 0.2, 0.05, 0.3], 0.6, 0.1) for x in (b, b)]
    levels = nearest_levels(p, wanted)
    p.check(levels)
    step = ls.costs[0][1] - ls.costs[0][0]
    for i, lv in enumerate(levels):
        assert abs(ls.costs[i][lv] - wanted[i] * numels[i]) <= step


# ------------------------------------------------------------------ the level database


def _direct_sparsegpt(model: torch.nn.Module, levels: dict[str, float]) -> dict[str, torch.Tensor]:
    """Each layer pruned by SparseGPT at its level, from the dense model's input statistics."""
    mods = {n: model.get_submodule(n) for n in levels}
    with StatsCollector(mods, {"hessian"}) as col, torch.no_grad():
        for x in IDS.split(4):
            col.new_batch()
            model(input_ids=x, use_cache=False)
    out = {}
    for n, s in levels.items():
        U = inverse_cholesky_upper(col.stats[n].hessian, 0.01)
        out[n] = sparsegpt_prune(weight_of(mods[n]), U, s)[0]
    return out


def test_stitched_candidate_equals_direct_compression_and_budget_is_exact(tmp_path: Path) -> None:
    model = tiny_llama()
    dense = tiny_llama()
    recipe = {
        "stages": [
            {
                "method": "sparsegpt",
                "sparsity": 0.6,
                "allocation": {
                    "method": "evopress",
                    "generations": 3,
                    "offspring": 4,
                    "tokens": [32, 128],
                    "survivors": [2],
                    **FAST,
                },
            }
        ]
    }
    _, report = llmpress.compress(model, recipe, IDS, progress=False)
    alloc = report.allocation
    assert alloc["cost"] == alloc["budget"]
    zeros = sum(m.sparsity * m.shape[0] * m.shape[1] for m in report.modules.values())
    assert round(zeros) == alloc["budget"]
    direct = _direct_sparsegpt(dense, alloc["levels"])
    for n, w in direct.items():  # same mask; values up to float rounding of the Hessian's scaling
        got = weight_of(model.get_submodule(n))
        assert torch.equal(got == 0, w == 0)
        torch.testing.assert_close(got, w, rtol=1e-5, atol=1e-6)
    # the explicit recipe written back reproduces the allocation with no search
    stage = report.recipe["stages"][0]
    assert stage["allocation"]["method"] == "explicit"
    again, rep2 = llmpress.compress(tiny_llama(), report.recipe, IDS, progress=False)
    for n in direct:
        assert torch.equal(weight_of(again.get_submodule(n)), weight_of(model.get_submodule(n)))


def test_stitched_bits_equal_direct_gptq() -> None:
    model = tiny_llama()
    recipe = {
        "stages": [
            {
                "method": "gptq",
                "bits": 3,
                "group_size": 16,
                "allocation": {
                    "method": "evopress",
                    "generations": 2,
                    "offspring": 3,
                    "tokens": [64],
                    "survivors": [],
                    "bits": [2, 3, 4],
                },
            }
        ]
    }
    _, report = llmpress.compress(model, recipe, IDS, progress=False)
    levels = report.allocation["levels"]
    assert sorted(set(levels.values())) != [3] or report.allocation["history"]
    dense = tiny_llama()
    mods = {n: dense.get_submodule(n) for n in levels}
    with StatsCollector(mods, {"hessian"}) as col, torch.no_grad():
        col.new_batch()
        dense(input_ids=IDS, use_cache=False)
    for n, b in levels.items():
        U = inverse_cholesky_upper(col.stats[n].hessian, 0.01)
        w = gptq_quantize(weight_of(mods[n]), U, GPTQConfig(bits=b, group_size=16))[0]
        torch.testing.assert_close(weight_of(model.get_submodule(n)), w, rtol=1e-5, atol=1e-6)
    total = sum(m.shape[0] * m.shape[1] for m in report.modules.values())
    assert (
        sum(b * report.modules[n].shape[0] * report.modules[n].shape[1] for n, b in levels.items())
        == 3 * total
    )


def test_database_on_disk_is_reused_resumed_and_refused_for_other_calibration(tmp_path: Path) -> None:
    db = tmp_path / "db"
    recipe = {
        "stages": [
            {
                "method": "sparsegpt",
                "sparsity": 0.5,
                "allocation": {"method": "uniform", "database": str(db), **FAST},
            }
        ]
    }
    m1, r1 = llmpress.compress(tiny_llama(), recipe, IDS, progress=False)
    files = sorted(db.glob("unit_*.safetensors"))
    assert len(files) == len(r1.modules) and (db / "manifest.json").is_file()
    files[3].unlink()  # an interrupted build: one layer missing
    m2, _ = llmpress.compress(tiny_llama(), recipe, IDS, progress=False)
    assert len(list(db.glob("unit_*.safetensors"))) == len(files)
    for n in r1.modules:
        assert torch.equal(weight_of(m1.get_submodule(n)), weight_of(m2.get_submodule(n)))
    with pytest.raises(AllocationError, match="calibration"):
        llmpress.compress(tiny_llama(), recipe, calib_ids(4, 32, seed=1), progress=False)
    with pytest.raises(AllocationError, match="model"):
        llmpress.compress(tiny_llama(seed=1), recipe, IDS, progress=False)
    other = {"stages": [{**recipe["stages"][0], "percdamp": 0.05}]}
    with pytest.raises(AllocationError, match="recipe"):
        llmpress.compress(tiny_llama(), other, IDS, progress=False)


# ------------------------------------------------------------------ block dropping


def _redundant_model() -> torch.nn.Module:
    """4 blocks; blocks 1 and 2 add nothing to the residual stream (zero output projections)."""
    model = tiny_llama(layers=4)
    with torch.no_grad():
        for i in (1, 2):
            model.model.layers[i].self_attn.o_proj.weight.zero_()
            model.model.layers[i].mlp.down_proj.weight.zero_()
    return model


@pytest.mark.parametrize("method", ["shortgpt", "sleb", "evopress"])
def test_dropping_removes_the_redundant_blocks(method: str) -> None:
    alloc = (
        {"method": method}
        if method != "evopress"
        else {"method": method, "generations": 4, "offspring": 4, "tokens": [64], "survivors": []}
    )
    model = _redundant_model()
    probe = IDS[:1, :8]
    with torch.no_grad():
        before = model(input_ids=probe).logits
    _, report = llmpress.compress(
        model, {"stages": [{"method": "drop_blocks", "blocks": 2, "allocation": alloc}]}, IDS, progress=False
    )
    assert report.allocation["dropped"] == ["model.layers.1", "model.layers.2"]
    assert model.config.num_hidden_layers == 2 and len(model.model.layers) == 2
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=probe).logits, before)


def test_shortgpt_influence_and_too_many_blocks_refused() -> None:
    with pytest.raises(AllocationError, match="depth"):
        llmpress.compress(
            tiny_llama(), {"stages": [{"method": "drop_blocks", "blocks": 2}]}, IDS, progress=False
        )
    model = _redundant_model()
    _, report = llmpress.compress(
        model, {"stages": [{"method": "drop_blocks", "blocks": 1}]}, IDS, progress=False
    )
    bi = report.allocation["block_influence"]
    assert bi["model.layers.1"] == pytest.approx(0, abs=1e-6) and bi["model.layers.0"] > 1e-3


def test_dropped_blocks_generate_with_a_kv_cache_and_reload_without_llmpress_config(tmp_path: Path) -> None:
    model = tiny_llama(layers=4)
    _, report = llmpress.compress(
        model, {"stages": [{"method": "drop_blocks", "blocks": 1, "allocation": "sleb"}]}, IDS, progress=False
    )
    prompt = IDS[:1, :6]
    with_cache = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True)
    without = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(with_cache, without)
    save_result(model, tmp_path / "out", report=report)
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 3 and "quantization_config" not in cfg
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert torch.equal(loaded.generate(prompt, max_new_tokens=6, do_sample=False), with_cache)
    saved = json.loads((tmp_path / "out" / "llmpress_report.json").read_text())
    assert (
        saved["allocation"]["dropped"] and saved["recipe"]["stages"][0]["allocation"]["method"] == "explicit"
    )


def test_sub_block_dropping_saves_dropped_entries_and_reloads(tmp_path: Path) -> None:
    model = tiny_llama(layers=2)
    recipe = {
        "stages": [
            {"method": "drop_blocks", "blocks": 1, "granularity": "sub_block", "allocation": "shortgpt"}
        ]
    }
    _, report = llmpress.compress(model, recipe, IDS, progress=False)
    assert len(report.allocation["dropped"]) == 1
    save_result(model, tmp_path / "out", report=report)
    entries = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]["modules"]
    assert [e["format"] for e in entries.values()] == ["dropped"]
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float16)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(input_ids=IDS[:1]).logits, to_runtime(model, result=report)(input_ids=IDS[:1]).logits
        )


# ------------------------------------------------------------------ recipes, CLI, errors


def test_recipe_errors_before_any_work() -> None:
    with pytest.raises(RecipeError, match="allocation search"):
        llmpress.Recipe.from_dict({"stages": [{"method": "evopress"}]}).resolve()
    with pytest.raises(RecipeError, match="handles sparsity"):
        llmpress.Recipe.from_dict(
            {"stages": [{"method": "gptq", "bits": 3, "allocation": {"method": "owl"}}]}
        ).resolve()
    with pytest.raises(RecipeError, match="unknown option"):
        llmpress.Recipe.from_dict(
            {
                "stages": [
                    {"method": "sparsegpt", "sparsity": 0.5, "allocation": {"method": "evopress", "bogus": 1}}
                ]
            }
        ).resolve()
    with pytest.raises(AllocationError, match="empty"):
        llmpress.Recipe.from_dict(
            {"stages": [{"method": "gptq", "bits": 3, "allocation": {"method": "uniform", "bits": []}}]}
        ).resolve()
    with pytest.raises(RecipeError, match="unstructured"):
        llmpress.compress(
            tiny_llama(),
            {"stages": [{"method": "sparsegpt", "pattern": "2:4", "allocation": "uniform"}]},
            IDS,
        )


def test_cli_evopress_recipes_save_and_reload(tiny_model_dir: Path, tmp_path: Path) -> None:
    recipes = {
        "sparse": "stages:\n  - method: sparsegpt\n    sparsity: 0.7\n    allocation:\n      method: evopress\n"
        "      generations: 2\n      offspring: 3\n      sparsity_step: 0.1\n      sparsity_span: 0.2\n",
        "bits": "stages:\n  - method: gptq\n    bits: 3\n    group_size: 16\n    allocation: {method: evopress, generations: 2, offspring: 3, bits: [2, 3, 4]}\n",
    }
    for name, text in recipes.items():
        (tmp_path / f"{name}.yaml").write_text(text)
        out = tmp_path / name
        rc = main(
            [
                "compress",
                str(tiny_model_dir),
                "--recipe",
                str(tmp_path / f"{name}.yaml"),
                "--calib",
                str(DATA_DIR / "calib.txt"),
                "--out",
                str(out),
                "--nsamples",
                "4",
                "--seqlen",
                "32",
            ]
        )
        assert rc == 0
        report = json.loads((out / "llmpress_report.json").read_text())
        alloc = report["allocation"]
        assert alloc["cost"] == alloc["budget"] and alloc["method"] == "evopress" and alloc["history"]
        assert set(alloc["levels"]) == set(report["modules"])
        loaded = AutoModelForCausalLM.from_pretrained(out)
        assert loaded(input_ids=IDS[:1]).logits.isfinite().all()
        if name == "bits":
            q = json.loads((out / "config.json").read_text())["quantization_config"]["modules"]
            assert {n: e["bits"] for n, e in q.items()} == alloc["levels"]


def test_model_card_shows_the_allocation_table_plot_and_citation(tmp_path: Path) -> None:
    from llmpress.hub import build_card

    model = tiny_llama()
    recipe = {
        "stages": [
            {
                "method": "sparsegpt",
                "sparsity": 0.6,
                "allocation": {
                    "method": "evopress",
                    "generations": 2,
                    "offspring": 2,
                    "tokens": [64],
                    "survivors": [],
                    **FAST,
                },
            }
        ]
    }
    _, report = llmpress.compress(model, recipe, IDS, progress=False)
    save_result(model, tmp_path / "out", report=report)
    text = build_card(tmp_path / "out", repo_id="me/alloc").text
    assert "## Allocation" in text and "**evopress**" in text and "sieberling2024evopress" in text
    assert "| `model.layers.0.mlp.down_proj` |" in text
    assert (tmp_path / "out" / "llmpress_fitness.png").is_file() and "llmpress_fitness.png" in text


def test_fractional_average_bits_under_an_allocation() -> None:
    with pytest.raises(RecipeError, match="integer"):
        llmpress.Recipe.from_dict({"stages": [{"method": "gptq", "bits": 2.5}]}).resolve()
    model = tiny_llama()
    recipe = {"stages": [{"method": "rtn", "bits": 2.5, "group_size": 16, "allocation": "uniform"}]}
    _, report = llmpress.compress(model, recipe, IDS, progress=False)
    levels = report.allocation["levels"]
    assert sorted(set(levels.values())) == [2, 3] and report.allocation["target"] == 2.5
    total = sum(m.shape[0] * m.shape[1] for m in report.modules.values())
    assert (
        sum(b * report.modules[n].shape[0] * report.modules[n].shape[1] for n, b in levels.items())
        == 2.5 * total
    )
    again, _ = llmpress.compress(tiny_llama(), report.recipe, IDS, progress=False)  # the explicit recipe
    for n in levels:
        assert torch.equal(weight_of(again.get_submodule(n)), weight_of(model.get_submodule(n)))


def test_searches_of_other_budgets_share_a_database_and_a_finished_search_is_reused(tmp_path: Path) -> None:
    db = tmp_path / "db"
    alloc = {
        "method": "evopress",
        "generations": 2,
        "offspring": 2,
        "tokens": [64],
        "survivors": [],
        "database": str(db),
    }
    runs = {}
    for bits in (3, 2.5, 3):
        stage = {"method": "rtn", "bits": bits, "group_size": 16, "allocation": alloc}
        runs.setdefault(bits, []).append(
            llmpress.compress(tiny_llama(), {"stages": [stage]}, IDS, progress=False)[1].allocation
        )
    assert len(list(db.glob("unit_*.safetensors"))) == 14  # one database for both budgets
    assert len(list(db.glob("search_evopress_*.json"))) == 2
    first, again = runs[3]
    assert again["levels"] == first["levels"] and again["history"] == first["history"]
