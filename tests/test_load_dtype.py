"""A compressed checkpoint loads in the dtype ``from_pretrained`` is asked for (issue 26).

The llmpress quantizer rebuilds modules before the weights load (resized ``dense`` layers,
``dropped`` sub-blocks, unfused MoE experts, packed layers); they must take the requested
dtype like the rest of the model, not the checkpoint's. The matrix: each method's result,
saved from fp16, bf16 or fp32, loaded with ``dtype`` fp32, bf16, fp16, ``"auto"`` and the
default. FLAP with global widths (the issue's case) is saved from all three dtypes; every
other method from one of them (the three dtypes rotate over the methods), to keep the file
fast. Every floating parameter must have the requested dtype, packed tensors their stored
one, and the logits must be finite and match the in-memory model within the coarser dtype's
tolerance (relative to the largest logit, with a margin: no bit-exact comparisons).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from models import DATA_DIR, calib_ids, tiny_llama, tiny_mixtral, tiny_qwen2
from torch import nn
from transformers import AutoModelForCausalLM

import llmpress
from llmpress.cli.main import main
from llmpress.errors import ModelError
from llmpress.format.loading import load_model
from llmpress.format.runtime import LlmpressLinear
from llmpress.format.save import save_compressed, save_result, to_runtime

PROBE = calib_ids(2, 16, seed=7)
CALIB = calib_ids(4, 16)
F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32
#: how a test loads: the dtype argument of from_pretrained (None: not passed)
LOADS: dict[str, Any] = {"float32": F32, "bfloat16": BF16, "float16": F16, "auto": "auto", "default": None}
#: transformers 5 loads in the checkpoint's dtype by default ("auto"), older ones in fp32
DEFAULT_IS_AUTO = int(transformers.__version__.split(".")[0]) >= 5
#: largest |loaded - in-memory| / max |in-memory| logit, by the coarser of stored and loaded dtype
#: (observed on tiny models: 0 for fp32, up to 6e-3 for fp16 and 1.1e-2 for bf16); W8A8 layers
#: round their inputs to the 8-bit grid in the compute dtype, where one value may land on the
#: next grid point: 3x (observed up to 2.4e-2)
TOL = {F32: 1e-3, F16: 2e-2, BF16: 5e-2}
REQUANTIZED = 3
EVO = {"method": "evopress", "generations": 2, "offspring": 2, "tokens": [64, 128], "survivors": [1]}
GPTQ4 = {"method": "gptq", "bits": 4, "group_size": 32}


def _moe() -> nn.Module:
    """Tiny Mixtral whose routers have clear winners: top-2 choices that rounding cannot flip."""
    model = tiny_mixtral()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight.mul_(30)
    return model


@dataclasses.dataclass(frozen=True)
class Case:
    factory: Callable[[], nn.Module]
    stages: list[dict[str, Any]]
    sources: tuple[torch.dtype, ...]
    formats: frozenset[str]  # what quantization_config must hold (empty: a plain checkpoint)
    experts: bool = False
    w8a8: bool = False


CASES = {
    "uniform-widths": Case(
        tiny_qwen2, [{"method": "magnitude_structured", "ratio": 0.3}], (BF16,), frozenset()
    ),
    "flap-global": Case(
        tiny_qwen2, [{"method": "flap", "ratio": 0.35}], (F16, BF16, F32), frozenset({"dense"})
    ),
    "evopress-widths": Case(
        tiny_llama,
        [
            {
                "method": "minitron",
                "ratio": 0.3,
                "structures": ["neurons"],
                "allocation": {**EVO, "sparsity_step": 0.1},
            }
        ],
        (F32,),
        frozenset({"dense"}),
    ),
    "hidden": Case(
        tiny_qwen2,
        [{"method": "flap", "ratio": 0.3, "structures": ["neurons", "hidden"]}],
        (F16,),
        frozenset({"dense"}),  # FLAP's compensation biases
    ),
    "dropped": Case(
        tiny_llama,
        [{"method": "drop_blocks", "blocks": 1, "granularity": "sub_block", "allocation": "shortgpt"}],
        (BF16,),
        frozenset({"dropped"}),
    ),
    "gptq4": Case(tiny_qwen2, [GPTQ4], (F16,), frozenset({"int"})),  # qwen2: packed layers with biases
    "sparsegpt24-gptq4": Case(
        tiny_qwen2,
        [{"method": "sparsegpt", "sparsity": 0.5, "pattern": "2:4"}, GPTQ4],
        (BF16,),
        frozenset({"int-2:4"}),
    ),
    "fp8": Case(
        tiny_qwen2, [{"method": "fp8", "activations": "static"}], (F32,), frozenset({"fp8"}), w8a8=True
    ),
    "int8-w8a8": Case(
        tiny_qwen2,
        [{"method": "rtn", "bits": 8, "group_size": -1, "symmetric": True, "activations": "int8"}],
        (F16,),
        frozenset({"int"}),
        w8a8=True,
    ),
    "moe-gptq": Case(_moe, [GPTQ4], (BF16,), frozenset({"int"}), experts=True),
}
MATRIX = [(name, src) for name, case in CASES.items() for src in case.sources]


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=PROBE).logits.float()


@dataclasses.dataclass
class Built:
    """A case compressed once: its folder per stored dtype, and the in-memory logits."""

    folders: dict[torch.dtype, Path]
    ref: torch.Tensor


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Built]:
    """``built(case)``: compressed on first use (in fp32), saved from each of its dtypes."""
    cache: dict[str, Built] = {}

    def get(name: str) -> Built:
        if name not in cache:
            case = CASES[name]
            model, report = llmpress.compress(case.factory(), {"stages": case.stages}, CALIB, progress=False)
            base = tmp_path_factory.mktemp(name)
            folders = {
                dt: save_result(model, base / _name(dt), report=report, dtype=dt) for dt in case.sources
            }
            # what the saved layers compute (W8A8 quantizes inputs at run time), in fp32
            ref = logits(to_runtime(copy.deepcopy(model), dtype=F32, result=report))
            cache[name] = Built(folders, ref)
        return cache[name]

    return get


def _coarser(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    return max(a, b, key=lambda d: TOL[d])


@pytest.mark.parametrize("load", list(LOADS))
@pytest.mark.parametrize("name,source", MATRIX, ids=[f"{n}-from-{_name(s)}" for n, s in MATRIX])
def test_every_method_loads_in_the_requested_dtype(
    built: Callable[[str], Built], name: str, source: torch.dtype, load: str
) -> None:
    case, item = CASES[name], built(name)
    folder = item.folders[source]
    qc = json.loads((folder / "config.json").read_text()).get("quantization_config") or {}
    assert {e["format"] for e in qc.get("modules", {}).values()} == case.formats  # what is rebuilt
    kwargs = {} if LOADS[load] is None else {"dtype": LOADS[load]}
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    want = LOADS[load] if isinstance(LOADS[load], torch.dtype) else source
    if load == "default" and not DEFAULT_IS_AUTO:
        want = torch.get_default_dtype()
    wrong = {n: p.dtype for n, p in model.named_parameters() if p.is_floating_point() and p.dtype != want}
    assert not wrong, f"not in {want}: {wrong}"
    packed = {n: m for n, m in model.named_modules() if isinstance(m, LlmpressLinear)}
    assert bool(packed) == bool(case.formats & {"int", "int-2:4", "fp8"})
    for n, m in packed.items():  # packed tensors as stored, bit for bit
        for suffix, (_, dtype) in m.fmt.tensor_shapes().items():
            assert m.get_buffer(suffix).dtype == dtype, f"{n}.{suffix}"
    if case.experts:
        assert any(".experts." in n for n in packed)
    out = logits(model)
    assert out.isfinite().all()
    err = float((out - item.ref).abs().max() / item.ref.abs().max())
    tol = TOL[_coarser(source, want)] * (REQUANTIZED if case.w8a8 else 1)
    assert err < tol, f"relative logit error {err:.2e}"


# ------------------------------------------------------------------------------ saving again


def test_a_loaded_packed_model_saved_in_another_dtype_keeps_its_packed_tensors(
    built: Callable[[str], Built], tmp_path: Path
) -> None:
    """Loaded in fp32 and saved in bf16: the packed codes and scales are stored as they were
    (the format says fp16 scales, FP8 weights), everything else in bf16."""
    for name in ("gptq4", "fp8"):
        first = AutoModelForCausalLM.from_pretrained(built(name).folders[CASES[name].sources[0]], dtype=F32)
        out = save_compressed(first, tmp_path / name, dtype=BF16)
        again = AutoModelForCausalLM.from_pretrained(out, dtype=F32)
        for n, m in again.named_modules():
            if isinstance(m, LlmpressLinear):
                old = first.get_submodule(n)
                for suffix in m.fmt.tensor_shapes():
                    assert torch.equal(m.get_buffer(suffix), old.get_buffer(suffix)), f"{n}.{suffix}"
        ref = logits(first)
        assert float((logits(again) - ref).abs().max() / ref.abs().max()) < TOL[BF16]


# ------------------------------------------------------------------------------ load_model, CLI


@pytest.fixture(scope="module")
def flap_fp16_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer: Any) -> tuple[Path, float]:
    """The issue's case: FLAP with global widths, saved in fp16 with a tokenizer; and the
    in-memory model's perplexity on the eval text (fp32, windows of 32)."""
    from llmpress.cli.evaluate import perplexity

    model, report = llmpress.compress(
        tiny_llama(vocab=256), {"stages": [{"method": "flap", "ratio": 0.35}]}, CALIB, progress=False
    )
    assert len({b.mlp.down_proj.in_features for b in model.model.layers}) > 1  # widths differ
    folder = save_compressed(
        model, tmp_path_factory.mktemp("flap") / "fp16", tokenizer=tokenizer, report=report, dtype=F16
    )
    ppl = perplexity(model, tokenizer, DATA_DIR / "eval.txt", seqlen=32, progress=False)["perplexity"]
    return folder, ppl


def test_llmpress_eval_scores_a_flap_checkpoint_stored_in_fp16(
    flap_fp16_dir: tuple[Path, float], capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    folder, in_memory = flap_fp16_dir
    args = [
        "eval",
        str(folder),
        "--text",
        str(DATA_DIR / "eval.txt"),
        "--seqlen",
        "32",
        "--json",
        "--no-save",
    ]
    with caplog.at_level(logging.INFO, logger="llmpress"):
        assert main(args) == 0  # --dtype auto: fp32 on the CPU
    res = json.loads(capsys.readouterr().out)
    assert res["dtype"] == "float32"
    assert f"loading {folder} in float32" in caplog.text
    assert math.isfinite(res["perplexity"]) and res["perplexity"] == pytest.approx(in_memory, rel=1e-2)
    assert main([*args[:-2], "--dtype", "bfloat16", "--json", "--no-save"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["dtype"] == "bfloat16" and res["perplexity"] == pytest.approx(in_memory, rel=5e-2)


def test_llmpress_compress_compresses_a_flap_checkpoint_further(
    flap_fp16_dir: tuple[Path, float], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder, _ = flap_fp16_dir
    recipe = tmp_path / "r.yaml"
    recipe.write_text("stages:\n  - method: magnitude\n    sparsity: 0.5\n")
    out = tmp_path / "out"
    args = ["compress", str(folder), "--recipe", str(recipe), "--calib", str(DATA_DIR / "calib.txt")]
    assert main([*args, "--out", str(out), "--nsamples", "2", "--seqlen", "32"]) == 0
    loaded, _ = load_model(out, dtype="float32")
    assert all(p.dtype == F32 for p in loaded.parameters())
    w = loaded.model.layers[0].mlp.down_proj.weight
    assert w.shape[1] < 64 and abs(float((w == 0).float().mean()) - 0.5) < 0.05
    assert logits(loaded).isfinite().all()


@pytest.mark.parametrize(
    "dtype,device,want",
    [("auto", "cpu", F32), (None, "cpu", F32), ("bfloat16", "cpu", BF16), (F16, "cpu", F16)],
)
def test_load_model_chooses_and_logs_one_dtype(
    flap_fp16_dir: tuple[Path, float],
    dtype: Any,
    device: str,
    want: torch.dtype,
    caplog: pytest.LogCaptureFixture,
) -> None:
    folder, _ = flap_fp16_dir
    with caplog.at_level(logging.INFO, logger="llmpress"):
        model, tok = load_model(folder, dtype=dtype, device=device)
    assert f"loading {folder} in {_name(want)}" in caplog.text
    assert tok is not None and model.dtype == want
    assert {p.dtype for p in model.parameters()} == {want}


@pytest.mark.parametrize("dtype", ["int8", "float33", "cuda"])
def test_load_model_refuses_a_dtype_it_cannot_compute_in(
    flap_fp16_dir: tuple[Path, float], dtype: str
) -> None:
    with pytest.raises(ModelError, match="unknown dtype"):
        load_model(flap_fp16_dir[0], dtype=dtype)
