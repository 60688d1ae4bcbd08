"""Compression over several processes (torch.distributed, gloo on CPU) and of offloaded models."""

from __future__ import annotations

import functools
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _dist_workers import worker
from models import DATA_DIR, tiny_llama

import llmpress
from llmpress.engine.stats import LayerStats

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed gloo is unavailable"
)

GPTQ = {"stages": [{"method": "gptq", "bits": 4, "group_size": 16}]}
SPARSEGPT = {"stages": [{"method": "sparsegpt", "sparsity": 0.5}]}
EVO = {"method": "evopress", "generations": 3, "offspring": 4, "tokens": [64, 256], "survivors": [2]}
EVOPRESS = {"stages": [{"method": "sparsegpt", "sparsity": 0.5, "allocation": EVO}]}
ADMM_DSNOT = {"stages": [{"method": "admm", "pattern": "2:4", "dsnot": {"update_threshold": 0.0}}]}
RECIPES = {"gptq": GPTQ, "sparsegpt": SPARSEGPT, "evopress": EVOPRESS, "admm_dsnot": ADMM_DSNOT}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ids(n: int = 8) -> torch.Tensor:
    return torch.randint(0, 128, (n, 32), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One 2-process gloo run (spawning is the slow part): statistics, then GPTQ and SparseGPT."""
    out = tmp_path_factory.mktemp("two-ranks")
    mp.spawn(worker, args=(2, _port(), _x(), _ids(), RECIPES, out), nprocs=2)
    return out


def _x() -> torch.Tensor:
    return torch.randn(24, 5, 16, generator=torch.Generator().manual_seed(1))  # 24 sequences of 5 tokens


def test_statistics_reduced_over_two_ranks_equal_one_process(two_ranks: Path) -> None:
    got = torch.load(two_ranks / "stats.pt")
    ref = LayerStats(16, torch.device("cpu"), {"hessian", "mean_var", "absmax", "token_norms"})
    for batch in _x().split(3):
        ref.add(batch)
    assert got["nsamples"] == ref.nsamples == 24 * 5
    assert got["acc"].keys() == ref.acc.keys()
    for name, acc in ref.acc.items():
        torch.testing.assert_close(got["acc"][name], acc, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(RECIPES))
def test_two_processes_compress_like_one(two_ranks: Path, name: str) -> None:
    """Statistics reduced, solves spread over ranks; an EvoPress search scores its offspring on
    both ranks (each half) and finds the same allocation as one process."""
    recipe = RECIPES[name]
    got = torch.load(two_ranks / f"{name}.pt", weights_only=False)
    model, report = llmpress.compress(tiny_llama(seed=0), recipe, _ids(), batch_size=2, progress=False)
    for other in got["others"]:  # rank 1 holds the very same model as rank 0
        for k, v in got["state"].items():
            assert torch.equal(v, other[k]), k
    for k, v in model.state_dict().items():
        torch.testing.assert_close(got["state"][k], v, rtol=0, atol=2e-5, msg=k)
    assert got["report"]["world_size"] == 2 and got["report"]["devices"] == ["cpu", "cpu"]
    assert report.to_dict()["world_size"] == 1
    assert got["report"]["modules"].keys() == report.to_dict()["modules"].keys()
    if name == "evopress":
        assert got["report"]["allocation"]["levels"] == report.allocation["levels"]
        assert got["report"]["allocation"]["evaluations"] == report.allocation["evaluations"]


def test_torchrun_cli_two_processes(tiny_model_dir: Path, tmp_path: Path) -> None:
    """``torchrun --nproc-per-node 2 -m llmpress compress``: rank 0 alone writes the folder, whose
    weights match a 1-process run; the report and the model card record the 2 processes."""
    from safetensors.torch import load_file

    from llmpress.cli.main import main
    from llmpress.hub.card import build_card

    recipe = tmp_path / "r.yaml"
    recipe.write_text("stages:\n  - method: gptq\n    bits: 4\n    group_size: 16\n", encoding="utf-8")
    common = [
        "--recipe",
        str(recipe),
        "--calib",
        str(DATA_DIR / "calib.txt"),
        "--nsamples",
        "8",
        "--seqlen",
        "32",
    ]
    runs = tmp_path / "runs"
    runs.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "LLMPRESS_DISABLE_PLUGINS"} | {"OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        str(_port()),
    ]
    r = subprocess.run(
        [*cmd, "-m", "llmpress", "compress", str(tiny_model_dir), "--out", str(runs / "two"), *common],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("compressed 14 layers") == 1  # rank 0 reports, rank 1 only waits
    assert main(["compress", str(tiny_model_dir), "--out", str(runs / "one"), *common]) == 0
    assert sorted(p.name for p in runs.iterdir()) == ["one", "two"]  # no temporary folder left over
    two, one = runs / "two", runs / "one"
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    a, b = load_file(two / "model.safetensors"), load_file(one / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k].float(), b[k].float(), rtol=0, atol=1e-3, msg=k)  # fp16 storage
    report = json.loads((two / "llmpress_report.json").read_text())
    assert report["world_size"] == 2 and report["devices"] == ["cpu", "cpu"]
    assert json.loads((one / "llmpress_report.json").read_text())["world_size"] == 1
    assert "by 2 processes (torch.distributed; devices cpu, cpu)" in build_card(two).text


@functools.cache
def _in_memory() -> torch.nn.Module:
    return llmpress.compress(tiny_llama(seed=0), GPTQ, _ids(), batch_size=2, progress=False)[0]


@pytest.mark.parametrize("kind", ["cpu", "disk"])
def test_offloaded_model_compresses_like_in_memory(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model whose weights accelerate keeps on ``meta`` (CPU or disk storage) compresses to the
    same weights, written back to that storage, and saves (streamed in shards) the same files."""
    from accelerate import cpu_offload, disk_offload
    from safetensors.torch import load_file

    from llmpress.format.save import save_compressed
    from llmpress.model.offload import module_tensors

    ref = _in_memory()
    model = tiny_llama(seed=0)
    if kind == "cpu":
        cpu_offload(model, execution_device=torch.device("cpu"))
    else:
        disk_offload(model, tmp_path / "offload", execution_device=torch.device("cpu"))
    assert model.model.layers[0].self_attn.q_proj.weight.device.type == "meta"
    llmpress.compress(model, GPTQ, _ids(), batch_size=2, progress=False)
    assert model.model.layers[0].self_attn.q_proj.weight.device.type == "meta"  # still offloaded
    got = dict(module_tensors(model))
    assert got.keys() == ref.state_dict().keys()
    for k, v in ref.state_dict().items():
        assert torch.equal(got[k], v), k
    with torch.no_grad():
        torch.testing.assert_close(model(_ids(2)).logits, ref(_ids(2)).logits)
    monkeypatch.setattr("llmpress.format.shards.MAX_SHARD_BYTES", 20_000)  # several shards and an index
    save_compressed(model, tmp_path / "a", dtype=torch.float16)
    save_compressed(ref, tmp_path / "b", dtype=torch.float16)
    index = json.loads((tmp_path / "a" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    a = {k: v for s in shards for k, v in load_file(tmp_path / "a" / s).items()}
    b = {k: v for s in shards for k, v in load_file(tmp_path / "b" / s).items()}
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_solves_spread_by_cost() -> None:
    from llmpress.engine.distributed import assign

    assert assign([4.0, 1.0, 1.0, 1.0, 1.0], 2) == [0, 1, 1, 1, 1]
    assert assign([1.0, 1.0, 1.0], 1) == [0, 0, 0]


def test_max_gpu_memory_user_errors(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from llmpress.cli.main import main

    recipe = tmp_path / "r.yaml"
    recipe.write_text("stages:\n  - method: magnitude\n    sparsity: 0.5\n", encoding="utf-8")
    base = ["compress", str(tiny_model_dir), "--recipe", str(recipe), "--out", str(tmp_path / "o")]
    assert main([*base, "--max-gpu-memory", "lots"]) == 2
    assert "error: --max-gpu-memory 'lots' is not a size" in capsys.readouterr().err
    assert main([*base, "--max-gpu-memory", "20GiB"]) == 2  # --device cpu
    assert "use it with --device cuda" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_memory_plan_of_an_8b_model() -> None:
    from transformers import LlamaConfig

    from llmpress.cli.budget import parse_memory, plan_memory
    from llmpress.errors import LlmpressError

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, vocab_size=128256)
    assert parse_memory("20GiB") == 20 * 2**30 and parse_memory("1.5GB") == 1_500_000_000
    plan = plan_memory(cfg, parse_memory("20GiB"), nsamples=128, seqlen=2048, param_bytes=2)
    assert not plan.offload_activations  # 2 x 128 x 2048 x 4096 bf16 = 4 GiB: on the GPU
    assert 0 < plan.weights < 16 * 2**30 and plan.weights + plan.working_set == 20 * 2**30
    tight = plan_memory(cfg, parse_memory("8GiB"), nsamples=512, seqlen=2048, param_bytes=2)
    assert tight.offload_activations  # 16 GiB of activations: on CPU
    halves = plan_memory(cfg, parse_memory("8GiB"), nsamples=512, seqlen=2048, param_bytes=2, world=4)
    assert not halves.offload_activations  # a quarter of the sequences per process fits
    with pytest.raises(LlmpressError, match="less than one block's working set"):
        plan_memory(cfg, parse_memory("1GiB"), nsamples=128, seqlen=2048, param_bytes=2)


@pytest.mark.parametrize(
    "recipe",
    [GPTQ, SPARSEGPT, {"stages": [{"method": "wanda", "sparsity": 0.5}]}, {"method": "flap", "ratio": 0.2}],
    ids=["gptq", "sparsegpt", "wanda", "flap"],
)
def test_offloaded_statistics_compress_like_resident_ones(recipe: dict) -> None:
    """offload_stats: accumulators on the CPU, each batch's part computed where the block runs
    and folded in (the same path a GPU run takes), statistics back on the device for a solve."""
    ref, _ = llmpress.compress(tiny_llama(seed=0), recipe, _ids(), batch_size=2, progress=False)
    got, _ = llmpress.compress(
        tiny_llama(seed=0), recipe, _ids(), batch_size=2, offload_stats=True, progress=False
    )
    for (k, a), b in zip(ref.state_dict().items(), got.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5, msg=k)


def test_offloaded_statistics_of_every_expert() -> None:
    from models import tiny_mixtral

    ref, _ = llmpress.compress(tiny_mixtral(), GPTQ, _ids(), batch_size=2, progress=False)
    got, _ = llmpress.compress(tiny_mixtral(), GPTQ, _ids(), batch_size=2, offload_stats=True, progress=False)
    for (k, a), b in zip(ref.state_dict().items(), got.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5, msg=k)


def test_a_many_expert_model_plans_its_statistics_on_the_cpu() -> None:
    from transformers import LlamaConfig, MixtralConfig

    from llmpress.cli.budget import parse_memory, plan_memory

    moe = MixtralConfig(hidden_size=4096, intermediate_size=14336, num_local_experts=8, num_hidden_layers=32)
    plan = plan_memory(moe, parse_memory("16GiB"), nsamples=128, seqlen=2048, param_bytes=2)
    assert plan.offload_stats  # 8 experts x (4096^2 + 14336^2) fp32 = 7 GiB of X^T X per block
    dense = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, vocab_size=128256)
    assert not plan_memory(
        dense, parse_memory("20GiB"), nsamples=128, seqlen=2048, param_bytes=2
    ).offload_stats
