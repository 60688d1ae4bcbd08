"""The optimum front end: ``LlmpressQuantizer.from_pretrained(...).quantize(save_dir, ...)``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _quant_models import (
    assert_same_state,
    calib_ids,
    logits,
    make_text,
    make_tokenizer,
    save_model_dir,
    tiny_llama,
)
from transformers import AutoModelForCausalLM

from llmpress.format.runtime import LlmpressLinear
from llmpress.format.save import to_runtime

pytest.importorskip("optimum")

from optimum.quantization_base import OptimumQuantizer  # noqa: E402

from llmpress.cli.optimum import LlmpressQuantizer  # noqa: E402 - needs optimum

RECIPE = {"stages": [{"method": "gptq", "bits": 4, "group_size": 32}]}


def test_is_an_optimum_quantizer() -> None:
    assert issubclass(LlmpressQuantizer, OptimumQuantizer)


def test_quantize_a_loaded_model(tmp_path: Path) -> None:
    q = LlmpressQuantizer.from_pretrained(tiny_llama())
    out = q.quantize(tmp_path / "q", recipe=RECIPE, calibration=calib_ids(), progress=False)
    assert Path(out) == tmp_path / "q"
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "llmpress" and len(cfg["modules"]) == 14
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert isinstance(loaded.get_submodule("model.layers.0.mlp.up_proj"), LlmpressLinear)
    to_runtime(
        q.model, result=q.result
    )  # saving left q.model as it was; packed, it computes like the loaded one
    assert torch.equal(logits(loaded), logits(q.model))
    assert_same_state(loaded, q.model)


def test_quantize_from_a_folder_with_text_calibration(tmp_path: Path) -> None:
    src = save_model_dir(tmp_path / "model", tiny_llama(), make_tokenizer())
    (tmp_path / "calib.txt").write_text(make_text(1500, seed=4))
    q = LlmpressQuantizer.from_pretrained(src)
    assert q.tokenizer is not None
    q.quantize(
        tmp_path / "q",
        recipe={"stages": [{"method": "sparsegpt", "pattern": "2:4"}, *RECIPE["stages"]]},
        calibration=str(tmp_path / "calib.txt"),
        nsamples=4,
        seqlen=32,
        progress=False,
    )
    assert (tmp_path / "q" / "tokenizer.json").is_file()
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert {m["format"] for m in cfg["modules"].values()} == {"int-2:4"}
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    to_runtime(q.model, result=q.result)
    assert torch.equal(logits(loaded), logits(q.model))


def test_quantize_to_compressed_tensors(tmp_path: Path) -> None:
    pytest.importorskip("compressed_tensors")
    q = LlmpressQuantizer.from_pretrained(tiny_llama())
    stage = {**RECIPE["stages"][0], "symmetric": True}
    q.quantize(
        tmp_path / "ct",
        recipe={"stages": [stage]},
        calibration=calib_ids(),
        progress=False,
        format="compressed-tensors",
    )
    cfg = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "compressed-tensors"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32)
    # the export stores fp16 scales and weights; the in-memory model is fp32
    assert torch.allclose(logits(loaded), logits(q.model), atol=2e-2)


def test_quantize_needs_a_recipe(tmp_path: Path) -> None:
    q = LlmpressQuantizer.from_pretrained(tiny_llama())
    with pytest.raises(ValueError, match="needs recipe="):
        q.quantize(tmp_path / "q", calibration=calib_ids())
    assert not (tmp_path / "q").exists()


def test_existing_output_needs_overwrite(tmp_path: Path) -> None:
    (tmp_path / "q").mkdir()
    q = LlmpressQuantizer.from_pretrained(tiny_llama())
    with pytest.raises(FileExistsError, match="overwrite"):
        q.quantize(tmp_path / "q", recipe={"method": "rtn", "group_size": 32}, progress=False)
    q = LlmpressQuantizer.from_pretrained(tiny_llama())
    q.quantize(tmp_path / "q", recipe={"method": "rtn", "group_size": 32}, progress=False, overwrite=True)
    assert (tmp_path / "q" / "config.json").is_file()
