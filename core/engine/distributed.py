"""Data- and module-parallel compression over ``torch.distributed`` processes.

Every rank builds the same calibration ids and keeps its share (:func:`shard`); the sum and
max statistics of each layer input are all-reduced before any layer is solved
(:func:`reduce_stats`), so all ranks solve on the same statistics. The target layers of a
block are spread over the ranks by cost (:func:`assign`); each result is computed on its
owner rank and broadcast (:func:`broadcast_result`), so every rank commits the identical
compressed block before re-running it. Without an initialized process group every helper is
a no-op for one process.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from llmpress.errors import CalibrationError, LlmpressError

log = logging.getLogger(__name__)

#: the variables ``torchrun`` and ``accelerate launch`` set in every process
_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def is_initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if is_initialized() else 1


def local_rank() -> int:
    """This process's index on its machine (``LOCAL_RANK`` of the launcher, else the rank)."""
    return int(os.environ.get("LOCAL_RANK", rank()))


def is_main() -> bool:
    """True on rank 0 (and in a single process): the one that writes files."""
    return rank() == 0


def launched() -> bool:
    """True when a launcher (torchrun, accelerate launch) started this process as one of several."""
    return all(v in os.environ for v in _LAUNCH_VARS) and int(os.environ["WORLD_SIZE"]) > 1


def init_from_env(device: str) -> str:
    """Join the process group a launcher describes (nccl for CUDA, else gloo) unless already
    joined; returns this rank's compute device (``cuda`` becomes ``cuda:LOCAL_RANK``)."""
    import torch.distributed as dist

    cuda = torch.device(device).type == "cuda"
    if launched() and not is_initialized():
        if not dist.is_available():
            raise LlmpressError("this torch has no torch.distributed; run in one process (without torchrun)")
        backend = "nccl" if cuda else "gloo"
        if cuda and torch.cuda.device_count() < 1:
            raise LlmpressError(f"--device {device} under torchrun needs CUDA GPUs; use --device cpu (gloo)")
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=60))
        log.info("joined %s process group: rank %d of %d", backend, rank(), world_size())
    if cuda and is_initialized() and torch.device(device).index is None:
        device = f"cuda:{local_rank() % max(torch.cuda.device_count(), 1)}"
        torch.cuda.set_device(torch.device(device))
    return device


def bind(device: torch.device) -> None:
    """Make ``device`` this rank's current CUDA device (nccl collectives of objects use it)."""
    if is_initialized() and device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)


def barrier() -> None:
    import torch.distributed as dist

    if is_initialized():
        dist.barrier()


def comm_device() -> torch.device:
    """Where collectives run: this rank's GPU with nccl, CPU with gloo."""
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def shard(ids: torch.Tensor) -> torch.Tensor:
    """This rank's contiguous share of the calibration sequences ``ids`` [n, L]."""
    n, ws = int(ids.shape[0]), world_size()
    if ws == 1:
        return ids
    if n < ws:
        raise CalibrationError(
            f"{n} calibration sequences cannot be shared by {ws} processes; use --nsamples {ws} or more"
        )
    return torch.tensor_split(ids, ws)[rank()]


def all_reduce_sum(tensors: Iterable[torch.Tensor]) -> None:
    """Sum tensors over ranks, in place (e.g. weight gradients of each rank's share)."""
    import torch.distributed as dist

    if world_size() == 1:
        return
    for t in tensors:
        dev = comm_device()
        buf = t if t.device == dev else t.to(dev)
        dist.all_reduce(buf)
        if buf is not t:
            t.copy_(buf)


def reduce_stats(stats: dict[str, Any]) -> None:
    """All-reduce every distinct :class:`~llmpress.engine.stats.LayerStats` of ``stats`` (layers that
    share an input share one object) with each statistic's merge rule, in a rank-independent
    order (sorted names: the order the layers ran in can differ between ranks, as MoE experts
    do)."""
    if world_size() == 1:
        return
    seen: set[int] = set()
    for name in sorted(stats):
        s = stats.get(name)
        if s is None or id(s) in seen:
            continue
        seen.add(id(s))
        s.all_reduce()


def assign(costs: Sequence[float], ws: int | None = None) -> list[int]:
    """Owner rank of each job: longest first onto the least-loaded rank (deterministic)."""
    ws = world_size() if ws is None else ws
    load = [0.0] * ws
    owner = [0] * len(costs)
    for j in sorted(range(len(costs)), key=lambda j: (-costs[j], j)):
        r = min(range(ws), key=lambda r: (load[r], r))
        owner[j] = r
        load[r] += costs[j]
    return owner


def _flatten(obj: Any, path: str, out: list[tuple[str, torch.Tensor]]) -> Any:
    """``obj`` with every tensor replaced by its spec; the tensors go to ``out``."""
    if isinstance(obj, torch.Tensor):
        out.append((path, obj))
        return ("__tensor__", tuple(obj.shape), str(obj.dtype).replace("torch.", ""))
    if isinstance(obj, (tuple, list)):
        return ("__seq__", [_flatten(v, f"{path}.{k}", out) for k, v in enumerate(obj)])
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        fields = {
            f.name: _flatten(getattr(obj, f.name), f"{path}.{f.name}", out) for f in dataclasses.fields(obj)
        }
        return ("__dataclass__", type(obj), fields)
    return obj


def _rebuild(spec: Any, tensors: list[torch.Tensor]) -> Any:
    if isinstance(spec, tuple) and spec and spec[0] == "__tensor__":
        return tensors.pop(0)
    if isinstance(spec, tuple) and spec and spec[0] == "__dataclass__":
        _, cls, fields = spec
        return cls(**{k: _rebuild(v, tensors) for k, v in fields.items()})
    if isinstance(spec, tuple) and spec and spec[0] == "__seq__":
        return tuple(_rebuild(v, tensors) for v in spec[1])
    return spec


def broadcast_result(result: Any, src: int, device: torch.device) -> Any:
    """The owner's (``src``) result (a :class:`~llmpress.model.results.LayerResult`) on every rank:
    its structure by object broadcast, its tensors by tensor broadcast on ``device``."""
    import torch.distributed as dist

    if world_size() == 1:
        return result
    tensors: list[tuple[str, torch.Tensor]] = []
    box = [_flatten(result, "result", tensors) if rank() == src else None]
    dist.broadcast_object_list(box, src=src, device=comm_device())
    spec = box[0]
    shapes: list[tuple[tuple[int, ...], torch.dtype]] = []
    _collect_specs(spec, shapes)
    comm = comm_device()
    received: list[torch.Tensor] = []
    for k, (shape, dtype) in enumerate(shapes):
        wire = torch.uint8 if dtype == torch.bool else dtype
        if rank() == src:
            buf = tensors[k][1].detach()
            buf = (buf.view(torch.uint8) if dtype == torch.bool else buf).to(comm).contiguous()
        else:
            buf = torch.empty(shape, dtype=wire, device=comm)
        dist.broadcast(buf, src=src)
        received.append(buf.view(torch.bool) if dtype == torch.bool else buf)
    if rank() == src:
        return result
    return _rebuild(spec, [t.to(device) for t in received])


def _collect_specs(spec: Any, out: list[tuple[tuple[int, ...], torch.dtype]]) -> None:
    if isinstance(spec, tuple) and spec and spec[0] == "__tensor__":
        out.append((spec[1], getattr(torch, spec[2])))
    elif isinstance(spec, tuple) and spec and spec[0] == "__dataclass__":
        for v in spec[2].values():
            _collect_specs(v, out)
    elif isinstance(spec, tuple) and spec and spec[0] == "__seq__":
        for v in spec[1]:
            _collect_specs(v, out)


def gather_objects(obj: Any) -> list[Any]:
    """``obj`` of every rank, in rank order (on every rank)."""
    import torch.distributed as dist

    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def describe() -> dict[str, Any]:
    """``{"world_size": N, "backend": ...}`` for the report."""
    import torch.distributed as dist

    return {"world_size": world_size(), "backend": dist.get_backend() if is_initialized() else None}
