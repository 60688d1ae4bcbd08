"""Damaged checkpoints: seeded mutations of a tiny 4-bit checkpoint's safetensors header and
``config.json``. Every case must load with identical outputs or raise an llmpress error;
never another exception, never a silently different model."""

from __future__ import annotations

import copy
import json
import random
import shutil
import struct
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from _quant_models import calib_ids, tiny_llama
from transformers import AutoModelForCausalLM

import llmpress
from llmpress.errors import LlmpressError
from llmpress.format.save import save_quantized

PROBE = calib_ids(1, 12, seed=3)
N_CASES = 200
_SWAPS = {"F16": "BF16", "BF16": "F16", "F32": "I32", "I32": "F32", "U8": "I8", "I8": "U8", "I64": "F64"}


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=PROBE).logits


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> dict:
    recipe = {
        "stages": [
            {"method": "sparsegpt", "pattern": "2:4", "targets": ["mlp"]},
            {"method": "rtn", "bits": 4, "group_size": 32},
        ]
    }
    model, rep = llmpress.compress(tiny_llama(seed=1), recipe, calib_ids(), progress=False)
    d = save_quantized(model, tmp_path_factory.mktemp("fuzz") / "q4", report=rep)
    return {"dir": d, "logits": _logits(AutoModelForCausalLM.from_pretrained(d))}


# ------------------------------------------------------------------ safetensors header


def _read(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _write(path: Path, header: dict, data: bytes) -> None:
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)


def _tensors(header: dict) -> list[str]:
    return sorted(k for k in header if k != "__metadata__")


def _header_mutation(rng: random.Random, header: dict, data: bytes) -> tuple[str, dict, bytes]:
    names = _tensors(header)
    name = rng.choice(names)
    t = header[name]
    kind = rng.choice(["dtype", "shape", "swap", "rename", "drop", "offset", "metadata", "truncate", "pad"])
    if kind == "dtype":
        t["dtype"] = _SWAPS.get(t["dtype"], "F32")
    elif kind == "shape":
        shape = t["shape"]
        choice = rng.choice(["reverse", "grow", "flatten", "extra"])
        t["shape"] = (
            shape[::-1]
            if choice == "reverse" and len(shape) > 1
            else [shape[0] + 1, *shape[1:]]
            if choice == "grow" and shape
            else [int(torch.tensor(shape).prod())]
            if choice == "flatten"
            else [*shape, 1]
        )
    elif kind == "swap":
        size = t["data_offsets"][1] - t["data_offsets"][0]
        same = [
            n
            for n in names
            if n != name and header[n]["data_offsets"][1] - header[n]["data_offsets"][0] == size
        ]
        if same:
            other = header[rng.choice(same)]
            t["data_offsets"], other["data_offsets"] = other["data_offsets"], t["data_offsets"]
        else:
            kind = "swap-none"
    elif kind == "rename":
        base, _, suffix = name.rpartition(".")
        header[
            rng.choice([f"{base}.{suffix}_x", f"{base}.weight_zero", f"{base}.weight_meta", name + "x"])
        ] = header.pop(name)
    elif kind == "drop":
        header.pop(name)
    elif kind == "offset":
        a, b = t["data_offsets"]
        d = rng.choice([-2, 2, -8, 8])
        t["data_offsets"] = [max(0, a + d), max(0, b + d)]
    elif kind == "metadata":
        header["__metadata__"] = rng.choice([{"format": "np"}, {}, {"format": "pt", "x": "y"}])
    elif kind == "truncate":
        data = data[: rng.randrange(len(data))]
    else:
        data = data + b"\0" * rng.choice([1, 8, 64])
    return f"header:{kind}", header, data


# ------------------------------------------------------------------ config.json

_BAD_VALUES: list[object] = ["4", 0, -3, 3.5, True, None, [], {}, 1000, "v1", "int8"]


def _config_mutation(rng: random.Random, cfg: dict) -> tuple[str, dict]:
    q = cfg["quantization_config"]
    kind = rng.choice(
        ["entry", "entry", "entry-key", "module", "top", "qc-field", "model-field", "checksums"]
    )
    if kind in ("entry", "entry-key"):
        name = rng.choice(sorted(q["modules"]))
        entry = q["modules"][name]
        if kind == "entry":
            field = rng.choice(sorted(entry) + ["symmetric"])
            entry[field] = rng.choice(
                [v for v in _BAD_VALUES if v != entry.get(field)]
                + ([not entry[field]] if field == "symmetric" and field in entry else [])
            )
        else:
            field = rng.choice(sorted(entry))
            entry[rng.choice(["colour", field + "_"])] = entry.pop(field) if rng.random() < 0.5 else 1
    elif kind == "module":
        name = rng.choice(sorted(q["modules"]))
        op = rng.choice(["drop", "rename", "copy"])
        if op == "drop":
            q["modules"].pop(name)
        elif op == "rename":
            q["modules"][name.replace("layers.0", "layers.7").replace("layers.1", "layers.9") + "x"] = q[
                "modules"
            ].pop(name)
        else:
            other = rng.choice(sorted(q["modules"]))
            q["modules"][other] = copy.deepcopy(q["modules"][name])
    elif kind == "top":
        field = rng.choice(["format_version", "modules", "recipe", "llmpress_version", "note"])
        q[field] = rng.choice([2, "v1", None, 7, [], "x"])
    elif kind == "qc-field":
        q[rng.choice(["extra_field", "bits", "group_size"])] = rng.choice(_BAD_VALUES)
    elif kind == "model-field":
        field = rng.choice(
            [
                "hidden_size",
                "intermediate_size",
                "num_hidden_layers",
                "vocab_size",
                "rms_norm_eps",
                "rope_theta",
                "num_key_value_heads",
                "tie_word_embeddings",
            ]
        )
        v = cfg.get(field)
        cfg[field] = (not v) if isinstance(v, bool) else (v * 2 if isinstance(v, (int, float)) and v else 1)
    else:
        checks = q.get("checksums") or {}
        if checks and rng.random() < 0.5:
            k = rng.choice(sorted(checks))
            checks[k] = checks[k][::-1]
        else:
            q.pop("config_checksum", None) if rng.random() < 0.5 else q.pop("checksums", None)
    return f"config:{kind}", cfg


def _case(rng: random.Random, folder: Path) -> str:
    if rng.random() < 0.5:
        f = folder / "model.safetensors"
        header, data = _read(f)
        kind, header, data = _header_mutation(rng, header, data)
        _write(f, header, data)
        return kind
    f = folder / "config.json"
    kind, cfg = _config_mutation(rng, json.loads(f.read_text()))
    f.write_text(json.dumps(cfg, indent=2))
    return kind


def _outcome(folder: Path, ref: torch.Tensor) -> str:
    try:
        model = AutoModelForCausalLM.from_pretrained(folder)
    except LlmpressError:
        return "llmpress error"
    except Exception as e:  # noqa: BLE001 - what the test counts
        return f"other: {type(e).__name__}: {str(e)[:200]}"
    out = _logits(model)
    return "identical" if out.shape == ref.shape and torch.equal(out, ref) else "silently wrong"


def run_fuzz(
    checkpoint: dict, tmp_path: Path, n: int, seed: int = 0, report: Callable[[str], None] | None = None
) -> Counter:
    rng = random.Random(seed)
    counts: Counter = Counter()
    for i in range(n):
        case = tmp_path / f"case{i}"
        shutil.copytree(checkpoint["dir"], case)
        kind = _case(rng, case)
        outcome = _outcome(case, checkpoint["logits"])
        counts[outcome.split(":")[0]] += 1
        if report is not None and outcome not in ("llmpress error", "identical"):
            report(f"case {i} ({kind}): {outcome}")
        shutil.rmtree(case)
    return counts


def test_fuzzed_checkpoints_load_identically_or_raise_an_llmpress_error(
    checkpoint: dict, tmp_path: Path
) -> None:
    bad: list[str] = []
    counts = run_fuzz(checkpoint, tmp_path, N_CASES, report=bad.append)
    print(dict(counts))
    assert not bad, "\n".join(bad)
    assert counts["llmpress error"] > N_CASES // 2
