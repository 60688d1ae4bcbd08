"""The recovery stage (``method: distill``): the compression is kept exactly (zeros, shapes,
quantization grids), the student moves toward the teacher, a killed run resumes to the same
weights, and bad input gives one ``error:`` line before any training."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from models import DATA_DIR, tiny_llama
from torch import nn
from transformers import AutoModelForCausalLM

import llmpress
from llmpress.cli.main import main
from llmpress.errors import ModelError, RecipeError
from llmpress.format.save import REPORT_FILE, save_result, to_runtime
from llmpress.plugins.distill import DistillConfig
from llmpress.train import loop
from llmpress.train.losses import LossWeights, ce, kl, squarehead

CALIB = DATA_DIR / "calib.txt"
IDS = torch.randint(0, 128, (16, 32), generator=torch.Generator().manual_seed(0))  # [16, 32]
HELD_OUT = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(1))
#: a few steps of a fast distillation
FAST: dict[str, Any] = {"method": "distill", "tokens": 1024, "batch_size": 4, "lr": 3e-3, "warmup": 0.0}


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _teacher_dir(tmp_path: Path) -> Path:
    """A saved tiny Llama with another vocabulary (64 tokens)."""
    tiny_llama(seed=1, vocab=64).save_pretrained(tmp_path / "teacher")
    return tmp_path / "teacher"


def _kl_to(teacher: nn.Module, student: nn.Module, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return float(kl(student(ids).logits, teacher(ids).logits))


def test_losses_are_zero_for_identical_models_and_presets_resolve() -> None:
    logits = torch.randn(2, 5, 7)
    hidden = [torch.randn(2, 5, 4) for _ in range(3)]
    assert float(kl(logits, logits, 2.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(squarehead(hidden, hidden)) == 0.0
    assert float(squarehead(hidden, [h * 2 for h in hidden])) == pytest.approx(2 * 0.25)  # 2 blocks
    ids = torch.randint(0, 7, (2, 5))
    assert float(ce(logits, ids)) == pytest.approx(
        float(F.cross_entropy(logits[:, :-1].reshape(-1, 7), ids[:, 1:].reshape(-1)))
    )
    assert DistillConfig().loss_weights() == LossWeights(ce=1.0, squarehead=1.0)
    assert DistillConfig(preset="minitron").loss_weights() == LossWeights(kl=1.0)
    assert DistillConfig(preset="minitron", ce=0.5).loss_weights() == LossWeights(ce=0.5, kl=1.0)
    assert DistillConfig(kl=2.0, temperature=2.0).loss_weights() == LossWeights(kl=2.0, temperature=2.0)
    with pytest.raises(RecipeError, match="every loss weight is 0"):
        DistillConfig(ce=0.0)
    with pytest.raises(RecipeError, match="smaller than one batch"):
        DistillConfig(tokens=100, seqlen=32, batch_size=4)


def test_sparsegpt_then_distill_keeps_zeros_and_moves_toward_teacher() -> None:
    dense = tiny_llama(seed=0)
    oneshot, _ = llmpress.compress(
        copy.deepcopy(dense), {"method": "sparsegpt", "sparsity": 0.7}, IDS, progress=False
    )
    recipe = [{"method": "sparsegpt", "sparsity": 0.7}, {**FAST, "preset": "sparse-finetune", "kl": 1.0}]
    model, result = llmpress.compress(copy.deepcopy(dense), recipe, IDS, progress=False)
    for name, rep in result.modules.items():
        w = model.get_submodule(name).weight
        mask = result.state.layers[name].mask
        assert torch.equal(w[~mask], torch.zeros_like(w[~mask]))  # exactly zero, still
        assert rep.sparsity == pytest.approx(0.7, abs=0.01)
        assert rep.info["distill_steps"] == 8
    changed = [
        n
        for n in result.modules
        if not torch.equal(model.get_submodule(n).weight, oneshot.get_submodule(n).weight)
    ]
    assert changed  # training moved the kept weights
    assert _kl_to(dense, model, HELD_OUT) < _kl_to(dense, oneshot, HELD_OUT)
    rec = result.recovery
    assert rec is not None and rec["steps"] == 8 and rec["tokens"] == 8 * 4 * 32
    assert rec["loss_curve"][-1][1] < rec["loss_curve"][0][1]  # the loss went down


def test_structured_then_distill_keeps_shapes_and_reloads(tmp_path: Path, tokenizer: Any) -> None:
    recipe = [{"method": "minitron", "ratio": 0.3}, {**FAST, "preset": "minitron", "data": str(CALIB)}]
    ref, _ = llmpress.compress(tiny_llama(seed=0, vocab=256), recipe[:1], IDS, progress=False)
    model, result = llmpress.compress(
        tiny_llama(seed=0, vocab=256), recipe, IDS, tokenizer=tokenizer, progress=False
    )
    shapes = {n: p.shape for n, p in ref.named_parameters()}
    assert {n: p.shape for n, p in model.named_parameters()} == shapes
    assert result.recovery is not None and result.recovery["weights"]["kl"] == 1.0
    assert result.recovery["data"] == str(CALIB)
    save_result(model, tmp_path / "out", report=result)  # a plain, smaller architecture
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=IDS[:2]).logits, model(input_ids=IDS[:2]).logits)


@pytest.mark.parametrize("quant", ["rtn", "gptq"])
def test_quantized_then_distill_stays_on_grid_and_reloads(quant: str, tmp_path: Path) -> None:
    recipe = [
        {"method": "wanda", "sparsity": 0.5},
        {"method": quant, "bits": 4, "group_size": 16},
        {**FAST, "preset": "minitron"},
    ]
    before, res0 = llmpress.compress(tiny_llama(seed=0), recipe[:2], IDS, progress=False)
    model, result = llmpress.compress(tiny_llama(seed=0), recipe, IDS, progress=False)
    moved = 0
    for name, r in result.state.layers.items():
        q, w = r.quant, model.get_submodule(name).weight
        assert q is not None and (q.bits, q.group_size) == (4, 16)
        assert torch.equal(w, q.dequantize().to(w.dtype))  # the weight is its codes
        assert torch.equal(w[~r.mask], torch.zeros_like(w[~r.mask]))
        assert torch.equal(q.scales, res0.state.layers[name].quant.scales)  # same grid
        moved += int(not torch.equal(q.codes, res0.state.layers[name].quant.codes))
        assert result.modules[name].info["distill_rerounded"] == 1.0
    assert moved  # some codes changed
    save_result(model, tmp_path / "out", report=result)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float16)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(input_ids=IDS[:2]).logits, to_runtime(model, result=result)(input_ids=IDS[:2]).logits
        )


def test_train_scales_freezes_codes() -> None:
    recipe = [{"method": "rtn", "bits": 4, "group_size": 16}, {**FAST, "kl": 1.0, "train": "scales"}]
    _, res0 = llmpress.compress(tiny_llama(seed=0), recipe[:1], IDS, progress=False)
    model, result = llmpress.compress(tiny_llama(seed=0), recipe, IDS, progress=False)
    name = "model.layers.0.mlp.down_proj"
    q, q0 = result.state.layers[name].quant, res0.state.layers[name].quant
    assert torch.equal(q.codes, q0.codes) and not torch.equal(q.scales, q0.scales)
    assert torch.equal(model.get_submodule(name).weight, q.dequantize())


SCHEDULE = {"from": 0.3, "to": 0.6, "every": 3, "score": "fisher"}


@pytest.mark.parametrize("gradual", [False, True], ids=["rtn", "fisher-schedule"])
def test_killed_run_resumes_to_identical_weights(
    gradual: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def recipe(ckpt: Path) -> list[dict[str, Any]]:
        common = {"checkpoint_dir": str(ckpt), "checkpoint_every": 4, "warmup": 0.25}
        if gradual:
            return [
                {"method": "magnitude", "sparsity": 0.3},
                {**FAST, **common, "kl": 1.0, "schedule": SCHEDULE},
            ]
        return [
            {"method": "magnitude", "sparsity": 0.5},
            {"method": "rtn", "bits": 4, "group_size": 16},
            {**FAST, **common, "kl": 1.0, "ce": 1.0},
        ]

    whole, res = llmpress.compress(tiny_llama(seed=0), recipe(tmp_path / "a"), IDS, progress=False)

    def killed(step: int) -> None:
        if step == 5:
            raise KeyboardInterrupt

    monkeypatch.setattr(loop, "_after_step", killed)
    with pytest.raises(KeyboardInterrupt):
        llmpress.compress(tiny_llama(seed=0), recipe(tmp_path / "b"), IDS, progress=False)
    monkeypatch.undo()
    resumed, res2 = llmpress.compress(tiny_llama(seed=0), recipe(tmp_path / "b"), IDS, progress=False)
    assert res2.recovery["resumed_from"] == 4 and res.recovery["resumed_from"] == 0
    assert res2.recovery["loss_curve"] == res.recovery["loss_curve"]
    for (n, a), (_, b) in zip(whole.named_parameters(), resumed.named_parameters()):
        assert torch.equal(a, b), n


def test_bad_teacher_and_order_refused_before_training(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="must come after a compression stage"):
        llmpress.compress(tiny_llama(seed=0), [FAST], IDS, progress=False)
    teacher = _teacher_dir(tmp_path)
    with pytest.raises(ModelError, match="vocabulary has 64 tokens"):
        llmpress.compress(
            tiny_llama(seed=0),
            [{"method": "magnitude", "sparsity": 0.5}, {**FAST, "teacher": str(teacher)}],
            IDS,
            progress=False,
        )


# ------------------------------------------------------------------ the command line
PIPELINE = """stages:
  - {method: sparsegpt, sparsity: 0.5}
  - {method: gptq, bits: 4, group_size: 16}
  - {method: distill, preset: sparse-finetune, tokens: 512, batch_size: 2, seqlen: 32, eval_text: %s}
"""


def _compress(model_dir: Path, tmp_path: Path, recipe: str) -> int:
    (tmp_path / "r.yaml").write_text(recipe, encoding="utf-8")
    args = ["compress", str(model_dir), "--recipe", str(tmp_path / "r.yaml"), "--calib", str(CALIB)]
    return main([*args, "--out", str(tmp_path / "out"), "--nsamples", "4", "--seqlen", "32"])


def test_cli_prune_quantize_distill_reloads(
    fresh_plugin_manager: None, tiny_model_dir: Path, tmp_path: Path
) -> None:
    assert _compress(tiny_model_dir, tmp_path, PIPELINE % (DATA_DIR / "eval.txt")) == 0
    report = json.loads((tmp_path / "out" / REPORT_FILE).read_text())
    rec = report["recovery"]
    assert rec["steps"] == 8 and rec["eval"]["before"] > 0 and rec["eval"]["after"] > 0
    name = "model.layers.0.mlp.down_proj"
    assert report["modules"][name]["methods"] == ["sparsegpt", "gptq"]
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    w = loaded.get_submodule(name)
    assert w is not None and torch.isfinite(loaded(input_ids=IDS[:1] % 256).logits).all()


@pytest.mark.parametrize(
    ("recipe", "message"),
    [
        (
            "stages:\n  - {method: distill, tokens: 512, batch_size: 2}\n",
            "must come after a compression stage",
        ),
        (
            "stages:\n  - {method: magnitude, sparsity: 0.5}\n  - {method: distill, teacher: TEACHER}\n",
            "vocabulary",
        ),
        (
            "stages:\n  - {method: magnitude, sparsity: 0.5}\n  - {method: distill, tokens: 10}\n",
            "smaller than one batch",
        ),
        (
            "stages:\n  - {method: fp8}\n  - {method: distill, tokens: 512, batch_size: 2}\n",
            "not an integer grid",
        ),
    ],
    ids=["distill-first", "teacher-vocab", "tiny-budget", "fp8"],
)
def test_cli_bad_input_one_error_line(
    recipe: str, message: str, fresh_plugin_manager: None, tiny_model_dir: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    def no_training(*a: object, **k: object) -> None:
        raise AssertionError("training started")

    monkeypatch.setattr("llmpress.train.stage.train", no_training)
    teacher = _teacher_dir(tmp_path)
    assert _compress(tiny_model_dir, tmp_path, recipe.replace("TEACHER", str(teacher))) == 2
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if ln.startswith("error")]
    assert len(errors) == 1 and message in errors[0], errors
    assert "compressing blocks" not in err  # refused before any stage worked


def test_two_gloo_processes_train_like_one(tmp_path: Path) -> None:
    import socket

    import torch.multiprocessing as mp
    from _dist_workers import distill_worker

    def recipe(batch: int) -> list[dict[str, Any]]:
        return [{"method": "magnitude", "sparsity": 0.5}, {**FAST, "kl": 1.0, "ce": 1.0, "batch_size": batch}]

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    mp.spawn(distill_worker, args=(2, port, IDS, recipe(2), tmp_path / "two.pt"), nprocs=2)
    two = torch.load(tmp_path / "two.pt")
    one, _ = llmpress.compress(tiny_llama(seed=0), recipe(4), IDS, progress=False)
    start = tiny_llama(seed=0)
    moved = 0
    for n, p in one.named_parameters():
        torch.testing.assert_close(two[n], p.detach(), rtol=1e-4, atol=1e-5, msg=n)
        moved += int(not torch.equal(p, start.get_parameter(n)))
    assert moved  # both trained


def test_half_precision_model_trains_in_fp32_and_comes_back_in_its_dtype() -> None:
    model = tiny_llama(seed=0).to(torch.bfloat16)
    recipe = [{"method": "magnitude", "sparsity": 0.5}, {**FAST, "kl": 1.0}]
    model, result = llmpress.compress(model, recipe, IDS, progress=False)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    for name, r in result.state.layers.items():
        w = model.get_submodule(name).weight
        assert torch.equal(w[~r.mask], torch.zeros_like(w[~r.mask]))


@pytest.mark.parametrize("score", ["magnitude", "fisher"])
def test_gradual_pruning_schedule_reaches_its_sparsity(score: str) -> None:
    stage = {**FAST, "kl": 1.0, "schedule": {"from": 0.0, "to": 0.5, "every": 2, "score": score}}
    model, result = llmpress.compress(
        tiny_llama(seed=0), {"stages": [{**stage, "targets": ["mlp"]}]}, IDS, progress=False
    )
    names = [n for n in result.modules if ".mlp." in n]
    assert names and set(result.modules) == set(names)
    for name in names:
        w, keep = model.get_submodule(name).weight, result.state.layers[name].mask
        assert torch.equal(keep.sum(1), torch.full((w.shape[0],), w.shape[1] // 2))  # 50 % of each row
        assert torch.equal(w[~keep], torch.zeros_like(w[~keep]))
        assert result.modules[name].sparsity == pytest.approx(0.5)
    attn = model.get_submodule("model.layers.0.self_attn.q_proj").weight
    assert (attn != 0).all()  # not a target: dense


def test_schedule_keeps_an_earlier_stage_mask() -> None:
    recipe = [
        {"method": "magnitude", "sparsity": 0.3},
        {**FAST, "kl": 1.0, "schedule": {"from": 0.3, "to": 0.6, "every": 4}},
    ]
    _, first = llmpress.compress(tiny_llama(seed=0), recipe[:1], IDS, progress=False)
    model, result = llmpress.compress(tiny_llama(seed=0), recipe, IDS, progress=False)
    for name, r in result.state.layers.items():
        old = first.state.layers[name].mask
        assert not (r.mask & ~old).any()  # pruned once, pruned for good
        assert result.modules[name].sparsity == pytest.approx(0.6, abs=0.02)


def test_gradient_checkpointing_gives_the_same_training() -> None:
    recipe = [{"method": "magnitude", "sparsity": 0.5}, {**FAST, "kl": 1.0, "ce": 1.0}]
    plain, _ = llmpress.compress(tiny_llama(seed=0), recipe, IDS, progress=False)
    recipe[1] = {**recipe[1], "gradient_checkpointing": True}
    ckpt, _ = llmpress.compress(tiny_llama(seed=0), recipe, IDS, progress=False)
    pruned, _ = llmpress.compress(tiny_llama(seed=0), recipe[:1], IDS, progress=False)
    assert any(not torch.equal(a, b) for a, b in zip(ckpt.parameters(), pruned.parameters()))  # it trained
    for (n, a), (_, b) in zip(plain.named_parameters(), ckpt.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=n)


def test_fisher_scores_leave_the_gradients_alone() -> None:
    """Accumulating the diagonal Fisher must not change the gradient the optimizer sees."""
    from llmpress.train.schedule import GradualPruning, PruneSchedule

    w = torch.nn.Parameter(torch.randn(4, 8, generator=torch.Generator().manual_seed(0)))
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    (x @ w.t()).pow(2).sum().backward()
    expected = w.grad.clone()
    w.grad = None
    pruning = GradualPruning(PruneSchedule(0.5, 0.7, 1, "fisher"), {"w": (w, torch.ones_like(w))})
    (x @ w.t()).pow(2).sum().backward()
    assert torch.equal(w.grad, expected)
    assert torch.equal(pruning.fisher["w"], expected.pow(2))


def test_distilled_2_4_int4_model_exports_to_compressed_tensors(tmp_path: Path) -> None:
    """SparseGPT 2:4, GPTQ 4-bit symmetric, then distill: the compressed-tensors export keeps the
    2:4 zeros and the grid, and transformers' own reader gives our logits."""
    pytest.importorskip("compressed_tensors")
    from safetensors import safe_open

    from llmpress.quant.packing import unpack_int32

    recipe = [
        {"method": "sparsegpt", "pattern": "2:4"},
        {"method": "gptq", "bits": 4, "group_size": 32, "symmetric": True},
        {**FAST, "preset": "sparse-finetune"},
    ]
    model, result = llmpress.compress(tiny_llama(seed=0), recipe, IDS, progress=False)
    save_result(model, tmp_path / "ct", report=result, fmt="compressed-tensors", dtype=torch.float32)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(input_ids=IDS[:2]).logits, model(input_ids=IDS[:2]).logits, atol=1e-4, rtol=0
        )
    with safe_open(str(tmp_path / "ct" / "model.safetensors"), framework="pt") as f:
        for name, r in result.state.layers.items():
            assert r.quant is not None and r.mask is not None
            codes = unpack_int32(f.get_tensor(f"{name}.weight_packed"), 4, r.quant.codes.shape[1])
            assert torch.equal(codes, r.quant.codes)  # the distilled codes, as stored
            assert torch.equal(codes[~r.mask], torch.full_like(codes[~r.mask], 8))  # zeros stay zero
