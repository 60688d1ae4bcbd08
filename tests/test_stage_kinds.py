"""A plugin brings its own stage kind, and a YAML recipe runs it through the command line
between a pruning stage and a quantization stage (core v3: a new kind touches no engine code)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import ClassVar

import torch
import transformers
from models import calib_ids, tiny_llama

import llmpress
from llmpress.cli.main import main
from llmpress.engine.stage import BlockStep, BlockwiseStage, StageExecutor
from llmpress.format.save import REPORT_FILE
from llmpress.model.modules import get_weight
from llmpress.model.results import LayerResult
from llmpress.plugin_manager import get_plugin_manager
from llmpress.recipe.config import MethodConfig


# ---- the plugin: 23 lines ---------------------------------------------------------------
class Rescale(BlockwiseStage):
    """A stage kind: every target layer's weight times the config's ``factor``."""

    def process_block(self, step: BlockStep) -> None:
        for rel, mod in step.targets(self.stage).items():
            new = LayerResult(weight=get_weight(mod) * self.config.factor)  # type: ignore[attr-defined]
            self.record.commit(f"{step.name}.{rel}", mod, new, self.config.method)


@dataclasses.dataclass(frozen=True)
class RescaleConfig(MethodConfig):
    method: ClassVar[str] = "rescale_test"
    kind: ClassVar[type[StageExecutor]] = Rescale
    needs_calibration: ClassVar[bool] = False
    stats: ClassVar[frozenset[str]] = frozenset()
    factor: float = 1.0


class RescalePlugin:
    @llmpress.hookimpl
    def llmpress_register_methods(self, register) -> None:  # noqa: ANN001
        register(RescaleConfig)


# ---- the test ------------------------------------------------------------------------------
RECIPE = """stages:
  - {method: magnitude, sparsity: 0.5}
  - {method: rescale_test, factor: 2.0}
  - {method: rtn, bits: 8, group_size: -1, symmetric: true}
"""


def test_new_stage_kind_runs_between_prune_and_quant(
    fresh_plugin_manager: None, tiny_model_dir: Path, tmp_path: Path
) -> None:
    get_plugin_manager().register(RescalePlugin())
    (tmp_path / "r.yaml").write_text(RECIPE, encoding="utf-8")
    out = tmp_path / "out"
    assert (
        main(["compress", str(tiny_model_dir), "--recipe", str(tmp_path / "r.yaml"), "--out", str(out)]) == 0
    )
    report = json.loads((out / REPORT_FILE).read_text())
    name = "model.layers.0.mlp.down_proj"
    assert report["modules"][name]["methods"] == ["magnitude", "rescale_test", "rtn"]

    # the same three steps by hand: prune, double, quantize (the grid sees the doubled weights)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    dense = get_weight(ref.get_submodule(name)).clone()
    llmpress.compress(ref, {"method": "magnitude", "sparsity": 0.5}, progress=False)
    for mod in ref.modules():
        if isinstance(mod, torch.nn.Linear) and mod is not ref.lm_head:
            mod.weight.data *= 2.0
    llmpress.compress(ref, {"method": "rtn", "bits": 8, "group_size": -1, "symmetric": True}, progress=False)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = loaded(ids).logits, ref(ids).logits
    assert (got - want).abs().max() < 1e-2  # the saved model is the same three steps
    assert report["modules"][name]["sparsity"] >= 0.5  # the mask survived the rescale and the grid
    assert not torch.allclose(get_weight(ref.get_submodule(name)), dense * (dense != 0), atol=1e-2)


def test_an_allocation_stage_runs_among_other_stages() -> None:
    """The runner groups stages: a model-level allocation stage, then a blockwise quantization
    stage on the model it left; the report writes the allocation back as an explicit stage."""
    recipe = {
        "stages": [
            {"method": "sparsegpt", "sparsity": 0.5, "allocation": {"method": "uniform"}},
            {"method": "rtn", "bits": 4, "group_size": 32},
        ]
    }
    model, result = llmpress.compress(tiny_llama(), recipe, calib_ids(), progress=False)
    first, second = result.recipe["stages"]
    assert first["allocation"]["method"] == "explicit" and second == recipe["stages"][1]
    assert result.allocation is not None and result.allocation["method"] == "uniform"
    name = "model.layers.0.mlp.down_proj"
    assert result.modules[name].methods == ["sparsegpt", "rtn"] and result.modules[name].bits == 4
    assert abs(result.modules[name].sparsity - 0.5) < 0.01  # the quantization kept the mask
