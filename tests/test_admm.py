"""ADMM pruning (issue 22): exactness at zero sparsity, a reconstruction at least as good as
SparseGPT's on the same mask (every layer of a tiny model, real calibration activations), the
mask schedules and patterns, masks taken from Wanda/SparseGPT, allocation and saving."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from models import DATA_DIR, LLAMA, calib_ids, is_nm_sparse, tiny_llama, weight_of
from torch import nn
from transformers import AutoModelForCausalLM

import llmpress
from llmpress.cli.main import main
from llmpress.engine.stats import LayerStats
from llmpress.errors import RecipeError
from llmpress.math.masks import unstructured_mask
from llmpress.math.targets import SparsityTarget
from llmpress.plugin_manager import make_plugin_manager
from llmpress.plugins.admm import ADMMConfig, _layer_mask, admm_factor, admm_prune, cubic_sparsity
from llmpress.plugins.sparsegpt import SparseGPTConfig
from llmpress.plugins.wanda import wanda_scores

IDS = calib_ids(8, 32)
PM = make_plugin_manager()


def _layer_inputs(model: nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every block linear's calibration input [tokens, in] of the dense ``model``."""
    xs: dict[str, list[torch.Tensor]] = {}
    handles = []
    for name in LLAMA.expected_targets():
        mod = model.get_submodule(name)

        def hook(m: nn.Module, args: tuple, name: str = name) -> None:
            xs.setdefault(name, []).append(args[0].detach().reshape(-1, args[0].shape[-1]))

        handles.append(mod.register_forward_pre_hook(hook))
    with torch.no_grad():
        model(input_ids=ids)
    for h in handles:
        h.remove()
    return {n: torch.cat(v) for n, v in xs.items()}


def _solve(layer: nn.Module, x: torch.Tensor, config: object, mask: torch.Tensor | None = None):
    stats = LayerStats(x.shape[1], torch.device("cpu"), config.statistics())  # type: ignore[attr-defined]
    stats.add(x)
    res = PM.hooks_for(config).update(layer, mask, stats, config)  # type: ignore[arg-type]
    assert res is not None and res.mask is not None and res.weight is not None
    return res


def _error(w0: torch.Tensor, w: torch.Tensor, x: torch.Tensor) -> float:
    return float(((w.double() - w0.double()) @ x.double().t()).square().sum())


def test_zero_sparsity_gives_the_dense_weight() -> None:
    torch.manual_seed(0)
    x = torch.randn(512, 48) @ torch.randn(48, 48)  # correlated inputs
    w = torch.randn(24, 48)
    factor = admm_factor(x.t() @ x)
    out, keep, loss = admm_prune(w, factor, SparsityTarget(0.0, group="layer"))
    assert keep.all()
    torch.testing.assert_close(out, w, rtol=1e-4, atol=1e-4)
    assert loss < 1e-6 * admm_prune(w, factor, SparsityTarget(0.5, group="layer"))[2]
    layer = nn.Linear(48, 24, bias=False)
    with torch.no_grad():
        layer.weight.copy_(w)
    res = _solve(layer, x, ADMMConfig(sparsity=0.0))
    torch.testing.assert_close(res.weight, w, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_admm_reconstructs_every_layer_at_least_as_well_as_sparsegpt_on_its_mask(pattern: str) -> None:
    model = tiny_llama()
    xs = _layer_inputs(model, IDS)
    sparsity = 0.5 if pattern == "2:4" else 0.7
    for name, x in xs.items():
        layer = model.get_submodule(name)
        w0 = weight_of(layer)
        sg = _solve(layer, x, SparseGPTConfig(sparsity=sparsity, pattern=pattern))
        # ADMM's update on SparseGPT's mask (fixed mask: the weight update alone)
        cfg = ADMMConfig(sparsity=sparsity, pattern=pattern, mask_from="sparsegpt")
        ad = _solve(layer, x, cfg, mask=sg.mask)
        assert torch.equal(ad.mask, sg.mask) and torch.equal(ad.weight == 0, ~sg.mask | (w0 == 0))
        e_sg, e_ad = _error(w0, sg.weight, x), _error(w0, ad.weight, x)
        assert e_ad <= e_sg * 1.001, f"{name}: ADMM {e_ad:.4g} > SparseGPT {e_sg:.4g}"


def test_own_mask_exact_sparsity_nm_and_schedules() -> None:
    torch.manual_seed(1)
    x = torch.randn(400, 64)
    w = torch.randn(32, 64)
    factor = admm_factor(x.t() @ x)
    layer_t = SparsityTarget(0.6, group="layer")
    outs = {}
    for schedule in ("cubic", "final"):
        out, keep, _ = admm_prune(w, factor, layer_t, schedule=schedule)
        assert int((~keep).sum()) == int(0.6 * w.numel()) and torch.equal(out == 0, ~keep)
        outs[schedule] = out
    assert not torch.equal(outs["cubic"], outs["final"])  # the schedules differ
    out, keep, _ = admm_prune(w, factor, SparsityTarget(0.5, nm=(2, 4)))
    assert is_nm_sparse(out, 2, 4) and int(keep.sum()) == w.numel() // 2
    assert cubic_sparsity(0, 15, 0.6) < cubic_sparsity(7, 15, 0.6) < cubic_sparsity(14, 15, 0.6) == 0.6
    # an earlier stage's pruned weights stay pruned
    forced = torch.zeros_like(keep)
    forced[:, :5] = True
    _, keep, _ = admm_prune(w, factor, layer_t, forced=forced)
    assert not keep[:, :5].any() and int((~keep).sum()) == int(0.6 * w.numel())


def test_fast_layer_selection_equals_the_stable_sort() -> None:
    s = torch.randn(60, 50, generator=torch.Generator().manual_seed(3))
    for sparsity in (0.0, 0.3, 0.75):
        assert torch.equal(_layer_mask(s, sparsity), unstructured_mask(s, sparsity, "layer"))
    tied = s.masked_fill(torch.arange(50) < 10, -1.0)  # ties at the threshold: the sort decides
    assert torch.equal(_layer_mask(tied, 0.1), unstructured_mask(tied, 0.1, "layer"))


def test_mask_from_wanda_is_wandas_mask() -> None:
    torch.manual_seed(2)
    x = torch.randn(300, 32) * torch.linspace(0.1, 3, 32)
    layer = nn.Linear(32, 16, bias=False)
    cfg = ADMMConfig(sparsity=0.5, mask_from="wanda")
    stats = LayerStats(32, torch.device("cpu"), cfg.statistics())
    stats.add(x)
    hooks = PM.hooks_for(cfg)
    scores = hooks.score(layer, stats, cfg)
    assert scores is not None and cfg.sparsity_target().group == "row"
    mask = hooks.select_mask(scores, cfg.sparsity_target(), cfg)
    want = unstructured_mask(wanda_scores(layer.weight.detach(), x.norm(dim=0)), 0.5, "row")
    assert torch.equal(mask, want)
    assert hooks.score(layer, stats, ADMMConfig(sparsity=0.5)) is None  # ADMM's own mask


def test_bad_options_are_one_clear_error() -> None:
    with pytest.raises(RecipeError, match="prune_iters 30 exceeds iters 20"):
        ADMMConfig(sparsity=0.5, prune_iters=30)
    with pytest.raises(RecipeError, match="schedule must be 'cubic' or 'final'"):
        ADMMConfig.from_dict({"sparsity": 0.5, "schedule": "linear"})
    with pytest.raises(RecipeError, match="mask_from"):
        ADMMConfig.from_dict({"sparsity": 0.5, "mask_from": "magnitude"})


def test_allocation_builds_admm_levels_and_saves(tiny_model_dir: Path, tmp_path: Path) -> None:
    assert ADMMConfig(sparsity=0.6).allocatable() == SparseGPTConfig(sparsity=0.6).allocatable()
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "stages:\n  - method: admm\n    sparsity: 0.6\n    iters: 6\n    prune_iters: 4\n"
        "    allocation: {method: owl, sparsity_step: 0.1}\n"
    )
    out = tmp_path / "out"
    args = ["compress", str(tiny_model_dir), "--recipe", str(recipe), "--out", str(out)]
    assert main([*args, "--calib", str(DATA_DIR / "calib.txt"), "--nsamples", "4", "--seqlen", "32"]) == 0
    report = json.loads((out / "llmpress_report.json").read_text())
    assert report["allocation"]["method"] == "owl" and set(report["allocation"]["levels"]) == set(
        report["modules"]
    )
    assert len(set(report["allocation"]["levels"].values())) > 1  # OWL spreads the levels
    loaded = AutoModelForCausalLM.from_pretrained(out)
    for name, level in report["allocation"]["levels"].items():
        w = weight_of(loaded.get_submodule(name))
        assert abs(float((w == 0).float().mean()) - level) < 0.02, name
    assert loaded(input_ids=IDS[:1]).logits.isfinite().all()


def test_pipeline_prunes_every_layer_with_admm() -> None:
    model, report = llmpress.compress(
        tiny_llama(), {"stages": [{"method": "admm", "pattern": "2:4"}]}, IDS, progress=False
    )
    assert set(report.modules) == LLAMA.expected_targets()
    for name in report.modules:
        assert is_nm_sparse(weight_of(model.get_submodule(name)), 2, 4), name
