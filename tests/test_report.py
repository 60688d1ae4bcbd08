"""The report is one pydantic model in memory and on disk; the result carries the run's state
to the savers, which read it from there (not from the model)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _quant_models import calib_ids, tiny_llama

import llmpress
from llmpress.format.compressed_tensors import save_compressed_tensors
from llmpress.format.save import REPORT_FILE, saved_state
from llmpress.model.report import CompressionReport, CompressionResult, ModuleReport
from llmpress.model.results import CompressionState

RECIPE = {"stages": [{"method": "rtn", "bits": 4, "group_size": 16, "symmetric": True}]}


def _report() -> CompressionReport:
    return CompressionReport(
        recipe={"stages": [{"method": "gptq"}]},
        modules={
            "a": ModuleReport(name="a", methods=["gptq"], shape=(4, 8), bits=2, losses={"gptq": 0.25}),
            "b": ModuleReport(name="b", methods=["wanda"], shape=(4, 8), sparsity=0.5, info={"x": 1.0}),
        },
        structure={"removed_fraction": 0.1},
    )


def test_the_report_round_trips_through_its_json(tmp_path: Path) -> None:
    report = _report()
    on_disk = json.loads(report.write(tmp_path / REPORT_FILE).read_text())
    assert on_disk["modules"]["a"] == {
        "methods": ["gptq"], "shape": [4, 8], "sparsity": 0.0, "loss": {"gptq": 0.25}, "bits": 2
    }  # fmt: skip
    assert on_disk["overall_sparsity"] == 0.25 and on_disk["average_bits"] == 2.0
    assert "allocation" not in on_disk and on_disk["devices"] == ["cpu"]
    back = CompressionReport.read(tmp_path / REPORT_FILE)
    assert back.model_dump() == report.model_dump() and back.modules["b"] == report.modules["b"]


def test_the_result_state_is_never_serialized() -> None:
    state = CompressionState(kv_cache={"dtype": "float8_e4m3fn", "scales": {}})
    result = CompressionResult.of(_report(), state)
    assert result.state is state and isinstance(result, CompressionReport)
    assert result.model_dump() == _report().model_dump() and "state" not in result.to_json()


def test_savers_read_the_state_from_the_result(tmp_path: Path) -> None:
    model, result = llmpress.compress(tiny_llama(), RECIPE, calib_ids(), progress=False)
    assert isinstance(result, CompressionResult) and result.state.quantized
    state = result.state
    assert "_llmpress_state" not in model.__dict__  # nothing hidden on the caller's model
    assert not saved_state(model).quantized and saved_state(model, result) is state
    llmpress.save_result(model, tmp_path / "packed", report=result)
    saved = json.loads((tmp_path / "packed" / "config.json").read_text())
    assert {e["format"] for e in saved["quantization_config"]["modules"].values()} == {"int"}
    assert (
        CompressionReport.read(tmp_path / "packed" / REPORT_FILE).model_dump()
        == CompressionReport.model_validate(result.model_dump()).model_dump()
    )
    pytest.importorskip("compressed_tensors")
    save_compressed_tensors(model, tmp_path / "ct", report=result, dtype=torch.float16)
    ct = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert ct["quant_method"] == "compressed-tensors" and ct["config_groups"]
