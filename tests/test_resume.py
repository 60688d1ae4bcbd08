"""Continuing from an llmpress checkpoint: a loaded compressed model is unpacked to dense layers
with its masks and grids (``llmpress.pipeline.resume``), so a distill-only recipe recovers it
(with an explicit teacher) and a later stage compresses it further, keeping what was stored."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from models import tiny_llama
from transformers import AutoModelForCausalLM

import llmpress
from llmpress.errors import ModelError
from llmpress.format.runtime import LlmpressLinear
from llmpress.format.save import save_result, to_runtime
from llmpress.model.report import CompressionResult

IDS = torch.randint(0, 128, (16, 32), generator=torch.Generator().manual_seed(0))  # [16, 32]
DISTILL: dict[str, Any] = {"method": "distill", "tokens": 1024, "batch_size": 4, "lr": 3e-3, "warmup": 0.0}


def _saved(tmp_path: Path, stages: list[dict[str, Any]], **save: Any) -> tuple[Path, CompressionResult]:
    model, result = llmpress.compress(tiny_llama(seed=0), stages, IDS, progress=False)
    save_result(model, tmp_path / "ckpt", report=result, **save)
    return tmp_path / "ckpt", result


def _load(folder: Path) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert any(isinstance(m, LlmpressLinear) for m in model.modules())  # packed, as loaded
    return model


def test_distill_only_recipe_recovers_a_saved_sparse_quantized_model(tmp_path: Path) -> None:
    ckpt, first = _saved(
        tmp_path, [{"method": "wanda", "sparsity": 0.5}, {"method": "rtn", "bits": 4, "group_size": 16}]
    )
    tiny_llama(seed=0).save_pretrained(tmp_path / "base")
    model, result = llmpress.compress(
        _load(ckpt),
        [{**DISTILL, "preset": "minitron", "teacher": str(tmp_path / "base")}],
        IDS,
        progress=False,
    )
    assert not any(isinstance(m, LlmpressLinear) for m in model.modules())
    moved = 0
    for name, r0 in first.state.layers.items():
        r, w = result.state.layers[name], model.get_submodule(name).weight
        assert r.quant is not None and r.mask is not None and r0.mask is not None
        assert torch.equal(r.mask, r0.mask)  # the stored zeros, restored from the codes and kept
        assert torch.equal(w[~r.mask], torch.zeros_like(w[~r.mask]))
        assert torch.equal(w, r.quant.dequantize().to(w.dtype))  # on the stored grid
        torch.testing.assert_close(r.quant.scales, r0.quant.scales.float(), rtol=1e-3, atol=0)  # fp16 on disk
        moved += int(not torch.equal(r.quant.codes, r0.quant.codes))
        assert result.modules[name].methods == ["checkpoint"]
    assert moved
    assert result.recovery is not None and result.recovery["teacher"] == str(tmp_path / "base")
    save_result(model, tmp_path / "again", report=result)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "again", dtype=torch.float16)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(input_ids=IDS[:2]).logits, to_runtime(model, result=result)(input_ids=IDS[:2]).logits
        )


def test_distill_of_a_loaded_checkpoint_needs_a_teacher(tmp_path: Path) -> None:
    ckpt, _ = _saved(tmp_path, [{"method": "rtn", "bits": 4, "group_size": 16}])
    with pytest.raises(ModelError, match="teacher"):
        llmpress.compress(_load(ckpt), [{**DISTILL, "preset": "minitron"}], IDS, progress=False)


@pytest.mark.parametrize("sparse", ["bitmask", "2:4"])
def test_quantizing_a_saved_sparse_model_keeps_its_zeros(sparse: str, tmp_path: Path) -> None:
    pattern = {"pattern": "2:4"} if sparse == "2:4" else {}
    ckpt, first = _saved(
        tmp_path, [{"method": "sparsegpt", "sparsity": 0.5, **pattern}], sparse_format=sparse
    )
    model, result = llmpress.compress(
        _load(ckpt), [{"method": "gptq", "bits": 4, "group_size": 16}], IDS, progress=False
    )
    for name, r0 in first.state.layers.items():
        r, w = result.state.layers[name], model.get_submodule(name).weight
        assert r.mask is not None and torch.equal(r.mask, r0.mask)
        assert torch.equal(w[~r.mask], torch.zeros_like(w[~r.mask]))
        assert r.quant is not None and result.modules[name].methods == ["checkpoint", "gptq"]
    save_result(model, tmp_path / "again", report=result, sparse_format=sparse)
    formats = {m["format"] for m in _config_modules(tmp_path / "again").values()}
    assert formats == {"int-2:4" if sparse == "2:4" else "int"}


def _config_modules(folder: Path) -> dict[str, Any]:
    import json

    return json.loads((folder / "config.json").read_text())["quantization_config"]["modules"]


def test_an_fp8_checkpoint_is_refused_before_any_change(tmp_path: Path) -> None:
    ckpt, _ = _saved(tmp_path, [{"method": "fp8"}])
    model = _load(ckpt)
    with pytest.raises(ModelError, match="cannot be unpacked"):
        llmpress.compress(model, [{"method": "magnitude", "sparsity": 0.5}], progress=False)
    assert any(isinstance(m, LlmpressLinear) for m in model.modules())  # left as it was


def test_distill_only_recipe_on_a_saved_structured_model(tmp_path: Path) -> None:
    """A width-pruned model saves as a plain smaller checkpoint: a distill-only recipe recovers it
    when its teacher is named (smaller than the teacher), and is refused without one."""
    model, result = llmpress.compress(
        tiny_llama(seed=0), [{"method": "minitron", "ratio": 0.3}], IDS, progress=False
    )
    save_result(model, tmp_path / "small", report=result)
    tiny_llama(seed=0).save_pretrained(tmp_path / "base")
    small = AutoModelForCausalLM.from_pretrained(tmp_path / "small", dtype=torch.float32)
    shapes = {n: p.shape for n, p in small.named_parameters()}
    with pytest.raises(llmpress.errors.RecipeError, match="compressed earlier"):
        llmpress.compress(small, [{**DISTILL, "preset": "minitron"}], IDS, progress=False)
    before = {n: p.detach().clone() for n, p in small.named_parameters()}
    out, res = llmpress.compress(
        small, [{**DISTILL, "preset": "minitron", "teacher": str(tmp_path / "base")}], IDS, progress=False
    )
    assert {n: p.shape for n, p in out.named_parameters()} == shapes
    assert res.recovery is not None and res.recovery["steps"] > 0
    assert any(not torch.equal(p, before[n]) for n, p in out.named_parameters())
