"""Writes the format-version-2 checkpoints of ``tests/test_format_v2.py``.

Run once with llmpress at commit 8c825cf (format version 2, sha256 checksums), from the
repository root of that checkout: ``python tests/data/format_v2/make_v2.py OUT``. Each case is a
tiny model compressed and saved with that version's public API, plus the logits that
version's ``from_pretrained(dtype="auto")`` gave on a fixed probe, in ``OUT/<case>.logits.safetensors``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests/ (models.py)

from models import calib_ids, tiny_llama, tiny_mixtral, tiny_qwen2  # noqa: E402

import llmpress  # noqa: E402

PROBE = calib_ids(2, 16, seed=7)
CALIB = calib_ids(8, 16)
GPTQ4 = {"method": "gptq", "bits": 4, "group_size": 32, "symmetric": False}
CASES = {  # name: (model, stages, saved dtype, sparse storage)
    "gptq4": (tiny_llama, [GPTQ4], torch.float16, "dense"),
    "sparse24-gptq4": (
        tiny_llama,
        [{"method": "sparsegpt", "sparsity": 0.5, "pattern": "2:4"}, GPTQ4],
        torch.float16,
        "dense",
    ),
    "wanda-bitmask": (tiny_llama, [{"method": "wanda", "sparsity": 0.5}], torch.float16, "bitmask"),
    "flap-global": (tiny_qwen2, [{"method": "flap", "ratio": 0.35}], torch.float16, "dense"),
    "drop-sub-block": (
        tiny_llama,
        [{"method": "drop_blocks", "blocks": 1, "granularity": "sub_block", "allocation": "shortgpt"}],
        torch.float32,
        "dense",
    ),
    "fp8-static": (tiny_qwen2, [{"method": "fp8", "activations": "static"}], torch.float32, "dense"),
    "int8-w8a8": (
        tiny_llama,
        [{"method": "rtn", "bits": 8, "group_size": -1, "symmetric": True, "activations": "int8"}],
        torch.float32,
        "dense",
    ),
    "mixtral-gptq4": (tiny_mixtral, [GPTQ4], torch.float16, "dense"),
}


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, (factory, stages, dtype, sparse) in CASES.items():
        model, report = llmpress.compress(factory(), {"stages": stages}, CALIB, progress=False)
        folder = llmpress.save_compressed(model, out / name, report=report, dtype=dtype, sparse=sparse)
        loaded = AutoModelForCausalLM.from_pretrained(
            folder, dtype="auto"
        ).eval()  # fp32 failed here (issue 26)
        with torch.no_grad():
            logits = loaded(input_ids=PROBE).logits.float().contiguous()
        save_file({"logits": logits}, str(out / f"{name}.logits.safetensors"))
        print(name, llmpress.__version__ if hasattr(llmpress, "__version__") else "", folder)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
