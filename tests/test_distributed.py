"""Compression over several processes (torch.distributed, gloo on CPU) and of offloaded models."""

from __future__ import annotations

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
from _dist_workers import compress_worker, stats_worker
from models import DATA_DIR, tiny_llama

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


def test_statistics_reduced_over_two_ranks_equal_one_process(tmp_path: Path) -> None:
    x = torch.randn(2, 12, 5, 16, generator=torch.Generator().manual_seed(1)).flatten(0, 1)  # 24 sequences
    mp.spawn(stats_worker, args=(2, _port(), x, tmp_path / "s.pt"), nprocs=2)
    got = torch.load(tmp_path / "s.pt")
    ref = LayerStats(16, torch.device("cpu"), {"hessian", "mean_var", "absmax", "token_norms"})
    for batch in x.split(3):
        ref.add(batch)
    assert got["nsamples"] == ref.nsamples == 24 * 5
    assert got["acc"].keys() == ref.acc.keys()
    for name, acc in ref.acc.items():
        torch.testing.assert_close(got["acc"][name], acc, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("recipe", [GPTQ, SPARSEGPT], ids=["gptq", "sparsegpt"])
def test_two_processes_compress_like_one(tmp_path: Path, recipe: dict) -> None:
    ids = _ids()
    mp.spawn(compress_worker, args=(2, _port(), recipe, ids, tmp_path / "r.pt"), nprocs=2)
    got = torch.load(tmp_path / "r.pt", weights_only=False)
    model, report = llmpress.compress(tiny_llama(seed=0), recipe, ids, batch_size=2, progress=False)
    for other in got["others"]:  # rank 1 holds the very same model as rank 0
        for k, v in got["state"].items():
            assert torch.equal(v, other[k]), k
    for k, v in model.state_dict().items():
        torch.testing.assert_close(got["state"][k], v, rtol=0, atol=2e-5, msg=k)
    assert got["report"]["world_size"] == 2 and got["report"]["devices"] == ["cpu", "cpu"]
    assert report.to_dict()["world_size"] == 1
    assert got["report"]["modules"].keys() == report.to_dict()["modules"].keys()
