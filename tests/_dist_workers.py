"""Workers of tests/test_distributed.py, run in ``torch.multiprocessing.spawn`` processes
(a module of their own so that the spawned processes can import them)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch


def init(rank: int, world: int, port: int) -> None:
    """Join a gloo process group of ``world`` CPU processes on localhost."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)


def worker(
    rank: int, world: int, port: int, x: torch.Tensor, ids: torch.Tensor, recipes: dict, out: Path
) -> None:
    """One process group for every check: reduced statistics, then each recipe's compression."""
    import torch.distributed as dist

    init(rank, world, port)
    try:
        stats(rank, x, out / "stats.pt")
        for name, recipe in recipes.items():
            compress(rank, world, recipe, ids, out / f"{name}.pt")
    finally:
        dist.destroy_process_group()


def stats(rank: int, x: torch.Tensor, out: Path) -> None:
    """Each rank accumulates its rows of ``x``; the reduced statistics go to ``out`` (rank 0)."""
    from llmpress.engine import distributed
    from llmpress.engine.stats import LayerStats

    needs = {"hessian", "mean_var", "absmax", "token_norms"}
    s = LayerStats(x.shape[-1], torch.device("cpu"), needs)
    for batch in distributed.shard(x).split(3):
        s.add(batch)
    shared = {"q": s, "k": s}  # layers fed the same input share one object: reduced once
    distributed.reduce_stats(shared)
    if rank == 0:
        torch.save({"acc": s.acc, "nsamples": s.nsamples}, out)


def compress(rank: int, world: int, recipe: Any, ids: torch.Tensor, out: Path) -> None:
    """Compress the tiny Llama on ``world`` ranks; rank 0 saves its weights and report."""
    import torch.distributed as dist
    from models import tiny_llama

    import llmpress

    model, report = llmpress.compress(tiny_llama(seed=0), recipe, ids, batch_size=2, progress=False)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    gathered = [None] * world
    dist.all_gather_object(gathered, sd)  # every rank holds the same compressed model
    if rank == 0:
        torch.save({"state": sd, "others": gathered[1:], "report": report.to_dict()}, out)


def distill_worker(rank: int, world: int, port: int, ids: torch.Tensor, recipe: list, out: Path) -> None:
    """A recovery run over ``world`` gloo processes (accelerate reads the usual launcher
    variables); rank 0 saves the trained weights to ``out``."""
    import torch.distributed as dist
    from models import tiny_llama

    import llmpress

    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world)
    )
    init(rank, world, port)
    try:
        model, _ = llmpress.compress(tiny_llama(seed=0), recipe, ids, progress=False)
        if rank == 0:
            torch.save({n: p.detach() for n, p in model.named_parameters()}, out)
    finally:
        dist.destroy_process_group()
