"""Streaming safetensors writer: shards are written as they fill, never the whole model at once.

A checkpoint is produced as a sequence of *units* (each a callable returning a few named
tensors: one packed layer, one cast weight). A unit's tensors are built only when the writer
reaches it, and a shard's tensors are dropped as soon as the shard is on disk, so saving holds
at most one shard (plus one unit) in host memory besides the model itself, also for models
whose weights are offloaded by accelerate. Names follow ``save_pretrained``:
``model.safetensors``, or ``model-0000k-of-0000n.safetensors`` with an index.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

log = logging.getLogger(__name__)

Unit = Callable[[], dict[str, torch.Tensor]]
MAX_SHARD_BYTES = 5 * 10**9  # save_pretrained's default "5GB"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def write_shards(
    folder: Path,
    units: Iterable[Unit],
    *,
    max_shard_bytes: int | None = None,
    convert: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
) -> list[Path]:
    """Write the tensors of ``units`` to safetensors shards in ``folder``; returns the files.

    ``convert`` maps each shard's tensors before writing (e.g. transformers' reverse weight
    conversion to the checkpoint's original names)."""
    limit = MAX_SHARD_BYTES if max_shard_bytes is None else max_shard_bytes
    written: list[tuple[Path, list[str]]] = []
    shard: dict[str, torch.Tensor] = {}
    size = total = 0

    def flush() -> None:
        nonlocal shard, size
        if not shard:
            return
        out = convert(shard) if convert is not None else shard
        path = folder / f".shard-{len(written):05d}.safetensors"
        save_file({k: v.contiguous() for k, v in out.items()}, str(path), metadata={"format": "pt"})
        written.append((path, list(out)))
        log.debug("wrote %s: %d tensors, %.1f MiB", path.name, len(out), size / 2**20)
        shard, size = {}, 0

    for unit in units:
        for name, t in unit().items():
            if shard and size + _nbytes(t) > limit:
                flush()
            shard[name] = t
            size += _nbytes(t)
            total += _nbytes(t)
    flush()
    return _finish(folder, written, total)


def _finish(folder: Path, written: list[tuple[Path, list[str]]], total: int) -> list[Path]:
    """Give the shards their final names and write the index of a sharded checkpoint."""
    if len(written) <= 1:
        final = folder / WEIGHTS
        if written:
            written[0][0].rename(final)
        else:
            save_file({}, str(final), metadata={"format": "pt"})
        return [final]
    n = len(written)
    weight_map: dict[str, str] = {}
    files = []
    for k, (path, names) in enumerate(written, 1):
        final = folder / f"model-{k:05d}-of-{n:05d}.safetensors"
        path.rename(final)
        files.append(final)
        weight_map.update({name: final.name for name in names})
    index: dict[str, Any] = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return files


def reverse_conversion(model: Any) -> Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None:
    """transformers' per-shard reversal of load-time weight conversions (renamed or fused
    tensors back to the checkpoint's names), if this transformers has one."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # pragma: no cover - older transformers convert nothing
        return None
    return lambda sd: revert_weight_conversion(model, sd)
