"""Compression over several processes (torch.distributed, gloo on CPU) and of offloaded models."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _dist_workers import worker
from models import tiny_llama

import llmpress
from llmpress.stats import LayerStats

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed gloo is unavailable"
)

GPTQ = {"stages": [{"method": "gptq", "bits": 4, "group_size": 16}]}
SPARSEGPT = {"stages": [{"method": "sparsegpt", "sparsity": 0.5}]}


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
    recipes = {"gptq": GPTQ, "sparsegpt": SPARSEGPT}
    mp.spawn(worker, args=(2, _port(), _x(), _ids(), recipes, out), nprocs=2)
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


@pytest.mark.parametrize("name", ["gptq", "sparsegpt"])
def test_two_processes_compress_like_one(two_ranks: Path, name: str) -> None:
    recipe = {"gptq": GPTQ, "sparsegpt": SPARSEGPT}[name]
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
