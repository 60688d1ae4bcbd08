"""Checkpoints written by llmpress's format version 2 (commit 8c825cf, sha256 checksums, no
``checksum_algorithm``) still load, with the logits that version gave.

The folders in ``tests/data/format_v2`` were made by ``make_v2.py`` there, run with that
version: one per stored form (packed int4 with and without 2:4, bitmask sparse, resized
``dense`` entries, ``dropped`` sub-blocks, FP8 and INT8 W8A8, MoE experts), each with the logits
that version's ``from_pretrained(dtype="auto")`` gave on a fixed probe.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from models import DATA_DIR, calib_ids
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import llmpress  # noqa: F401  (registers the quantizer)
from llmpress.errors import CheckpointError

V2 = DATA_DIR / "format_v2"
CASES = sorted(p.name for p in V2.iterdir() if p.is_dir())
PROBE = calib_ids(2, 16, seed=7)  # the probe make_v2.py used
#: largest |new - old| / max |old| logit by the coarser of the stored and loaded dtypes (no
#: bit-exact comparison across CPUs); W8A8 rounds inputs to the 8-bit grid in the compute
#: dtype, where one value may land on the next grid point: 3x
TOL = {torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 5e-2}


def _stored_dtype(folder: Path) -> torch.dtype:
    cfg = json.loads((folder / "config.json").read_text())
    return getattr(torch, cfg.get("dtype") or cfg["torch_dtype"])


def _logits(folder: Path, dtype: torch.dtype | str) -> tuple[torch.Tensor, torch.dtype]:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    with torch.no_grad():
        return model(input_ids=PROBE).logits.float(), model.dtype


def test_the_committed_folders_are_format_version_2() -> None:
    assert len(CASES) == 8
    for name in CASES:
        q = json.loads((V2 / name / "config.json").read_text())["quantization_config"]
        assert q["format_version"] == 2 and "checksum_algorithm" not in q and q["checksums"], name


@pytest.mark.parametrize("load", ["auto", torch.float32], ids=["auto", "float32"])
@pytest.mark.parametrize("name", CASES)
def test_version_2_checkpoint_loads_with_the_logits_it_had(name: str, load: torch.dtype | str) -> None:
    folder = V2 / name
    old = load_file(str(V2 / f"{name}.logits.safetensors"))["logits"]
    new, dtype = _logits(folder, load)
    assert dtype == (_stored_dtype(folder) if load == "auto" else load)
    assert torch.isfinite(new).all()
    tol = max(TOL[dtype], TOL[_stored_dtype(folder)]) * (3 if "w8a8" in name or "fp8" in name else 1)
    err = float((new - old).abs().max()) / float(old.abs().max())
    assert err <= tol, f"{name} loaded as {load}: logits differ by {err:.2e} of their scale (tolerance {tol})"


def test_version_2_checksums_still_catch_a_changed_byte(tmp_path: Path) -> None:
    folder = Path(shutil.copytree(V2 / "gptq4", tmp_path / "gptq4"))
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    packed = [e for k, e in header.items() if k != "__metadata__" and e["dtype"] in ("I32", "U8")]
    begin = 8 + n + packed[0]["data_offsets"][0]
    data[begin] ^= 0x11  # one packed code
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum"):
        AutoModelForCausalLM.from_pretrained(folder)
