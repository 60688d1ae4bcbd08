"""The level database: every target layer compressed at every level, from one calibration pass.

For each block the statistics its stage asks for are collected once (on the *dense* model's
activations, so every level of every layer sees the same inputs), then the stage's own
plugins (score -> mask -> update) run once per level with the level's sparsity or bit width.
The results are never committed: they are kept apart, in memory or on disk as one
safetensors file per layer holding all its levels (read memory-mapped with ``safe_open``).

On disk the database is resumable (a layer's file appears only once all its levels are
written) and reusable by later searches; ``manifest.json`` holds its fingerprint (model
weights and config, recipe stage, level sets, calibration tokens), and a database built for
anything else is refused with an :class:`~llmpress.errors.AllocationError`. It is a cache:
the manifest also records each layer file's size and ``sha256`` when written, every file is
checked on reuse, and a damaged one (truncated, bytes changed, no checksum recorded) is named
in a warning and that layer alone rebuilt; so is every layer when the manifest itself is
damaged. ``LLMPRESS_VERIFY_CHECKSUMS=0`` checks sizes only (hashing reads every file once).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from llmpress.allocation.level_sets import LevelSet
from llmpress.errors import AllocationError
from llmpress.format.checkpoint import VERIFY_ENV, file_checksum
from llmpress.format.output import atomic_file
from llmpress.model.modules import get_weight
from llmpress.model.results import LayerResult, QuantState
from llmpress.quant.packing import pack_bitmask, unpack_bitmask

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
DB_VERSION = 1


def _sha(data: Any) -> str:
    h = hashlib.sha256()
    if isinstance(data, torch.Tensor):
        t = data.detach().cpu().contiguous()
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    else:
        h.update(json.dumps(data, sort_keys=True, default=str).encode())
    return h.hexdigest()


def fingerprint(
    model: nn.Module, units: Sequence[str], stage: dict[str, Any], levels: LevelSet, ids: torch.Tensor
) -> dict[str, str]:
    """Hashes of what a database depends on: ``model`` (config and the target weights),
    ``recipe`` (the stage, without its budget: ``sparsity``/``bits`` only pick the levels),
    ``levels`` (their values) and ``calibration`` (the token ids)."""
    cfg = getattr(model, "config", None)
    cfg_d = {k: v for k, v in (cfg.to_dict() if cfg is not None else {}).items() if not k.startswith("_")}
    cfg_d.pop("name_or_path", None)
    h = hashlib.sha256(_sha(cfg_d).encode())
    for name in units:
        h.update(name.encode())
        h.update(_sha(get_weight(model.get_submodule(name))).encode())
    return {
        "model": h.hexdigest(),
        "recipe": _sha(stage),
        "levels": _sha(levels.values),  # the level values only: searches of other budgets share it
        "calibration": _sha(ids.long()),
    }


def entry_bytes(numel: int, kind: str, elem: int) -> int:
    """Approximate stored bytes of one level of a layer of ``numel`` weights."""
    return numel + numel // 32 if kind == "bits" else numel * elem + numel // 8


class LayerFileRecord(BaseModel):
    """A layer file's size and sha256, recorded in the manifest when the file was written."""

    model_config = ConfigDict(frozen=True)

    sha256: str
    size: int


class Manifest(BaseModel):
    """``manifest.json`` of an on-disk level database, in memory and on disk: the format
    ``version``, the ``fingerprint`` (model, recipe, levels, calibration), the units and each
    layer file's record (``None``: written by an llmpress that recorded none)."""

    version: int | None = None
    fingerprint: dict[str, str] = Field(default_factory=dict)
    units: list[str] = Field(default_factory=list)
    files: dict[str, LayerFileRecord] | None = None


class LevelDatabase:
    """Per unit (index into ``units``) and level index, a :class:`LayerResult`.

    ``path=None`` keeps everything in memory. Otherwise ``path`` is a folder: an existing one
    must carry the same fingerprint, else it is refused.
    """

    def __init__(
        self,
        units: Sequence[str],
        shapes: Sequence[tuple[int, int]],
        fp: dict[str, str],
        path: str | Path | None,
    ) -> None:
        self.units = list(units)
        self.shapes = list(shapes)
        self.fp = fp
        self.path = None if path is None else Path(path)
        self._mem: dict[int, list[LayerResult]] = {}
        self._norms: dict[int, torch.Tensor] = {}
        self._files: dict[int, Any] = {}
        #: layer file name -> its size and sha256 recorded when it was written
        self._sums: dict[str, LayerFileRecord] = {}
        #: units whose file on disk is damaged (rebuilt by the next build pass)
        self._stale: set[int] = set()
        if self.path is not None:
            self._open_dir()

    def _open_dir(self) -> None:
        assert self.path is not None
        man = self.path / MANIFEST
        if not man.is_file():
            if self.path.exists() and any(self.path.iterdir()):
                raise AllocationError(f"level database folder {self.path} is not empty and has no {MANIFEST}")
            self.path.mkdir(parents=True, exist_ok=True)
            self._write_manifest()
            return
        try:
            old = Manifest.model_validate_json(man.read_bytes())
        except (ValidationError, OSError) as e:  # invalid JSON or not a manifest
            # a cache: with its fingerprint and checksums gone, no layer file can be trusted
            self._rebuild_all(f"{MANIFEST} is damaged ({e})")
            return
        diff = [
            k for k in ("model", "recipe", "levels", "calibration") if old.fingerprint.get(k) != self.fp[k]
        ]
        if old.version != DB_VERSION or diff:
            raise AllocationError(
                f"level database {self.path} was built for another "
                f"{' / '.join(diff) or 'format version'} ({', '.join(diff)} differ); "
                f"use another folder, or delete it to rebuild"
            )
        if old.files is None:
            self._rebuild_all(f"{MANIFEST} records no layer checksums (an older llmpress built it)")
            return
        self._sums = dict(old.files)
        self._verify()

    def _rebuild_all(self, why: str) -> None:
        log.warning("level database %s: %s; rebuilding every layer", self.path, why)
        self._stale = set(range(len(self.units)))
        self._write_manifest()

    def _verify(self) -> None:
        """Check every layer file against its recorded size and checksum (files hashed in
        parallel threads); a damaged one is named in a warning and marked for rebuilding
        (``has`` is false until ``put``)."""
        t0 = time.perf_counter()
        found = {i: self._file(i) for i in range(len(self.units)) if self._file(i).is_file()}
        sizes = {i: f.stat().st_size for i, f in found.items()}
        problems: dict[int, str] = {}
        for i, f in found.items():
            rec = self._sums.get(f.name)
            if rec is None:
                problems[i] = "no checksum recorded: an interrupted build or an older llmpress wrote it"
            elif sizes[i] != rec.size:
                problems[i] = f"truncated or extended: {sizes[i]} bytes, {rec.size} when written"
        hashed = [i for i in found if i not in problems]
        if os.environ.get(VERIFY_ENV, "").strip() == "0":
            hashed = []
        with ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as pool:  # hashlib releases the GIL
            for i, digest in zip(hashed, pool.map(file_checksum, [found[i] for i in hashed])):
                if digest != self._sums[found[i].name].sha256:
                    problems[i] = "its checksum differs from the one recorded when written: its bytes changed"
        for i in sorted(problems):
            log.warning(
                "level database %s: layer file %s (%s) is damaged (%s); rebuilding that layer",
                self.path,
                found[i].name,
                self.units[i],
                problems[i],
            )
        self._stale |= set(problems)
        log.info(
            "level database %s: %d layer files, %d checksums (%.1f MiB) checked in %.2fs",
            self.path,
            len(found),
            len(hashed),
            sum(sizes[i] for i in hashed) / 2**20,
            time.perf_counter() - t0,
        )

    def _write_manifest(self) -> None:
        assert self.path is not None
        data = Manifest(version=DB_VERSION, fingerprint=self.fp, units=self.units, files=self._sums)
        with atomic_file(self.path / MANIFEST) as tmp:
            tmp.write_text(json.dumps(data.model_dump(), indent=1))

    def _file(self, i: int) -> Path:
        assert self.path is not None
        return self.path / f"unit_{i:05d}.safetensors"

    def has(self, i: int) -> bool:
        """Whether unit ``i`` is stored (on disk: its file is there and was not found damaged)."""
        return i in self._mem if self.path is None else i not in self._stale and self._file(i).is_file()

    def put(self, i: int, results: Sequence[LayerResult], sq_norms: torch.Tensor | None) -> None:
        """Store all levels of unit ``i`` (atomically on disk, its checksum in the manifest)."""
        if self.path is None:
            # quantized levels keep only their codes; the weight is decoded when asked for
            self._mem[i] = [
                (dataclasses.replace(r, weight=None) if r.quant is not None else r).to("cpu") for r in results
            ]
            if sq_norms is not None:
                self._norms[i] = sq_norms.detach().cpu()
            return
        tensors: dict[str, torch.Tensor] = {}
        meta: list[dict[str, Any]] = []
        for k, r in enumerate(results):
            m: dict[str, Any] = {"loss": r.loss}
            if r.quant is not None:
                q = r.quant
                tensors[f"{k}.codes"], tensors[f"{k}.scales"] = q.codes.cpu(), q.scales.cpu()
                tensors[f"{k}.zeros"] = q.zeros.cpu()
                m.update(bits=q.bits, group_size=q.group_size, symmetric=q.symmetric, method=q.method)
            elif r.weight is not None:
                tensors[f"{k}.weight"] = r.weight.detach().cpu().contiguous()
            if r.mask is not None:
                tensors[f"{k}.mask"] = pack_bitmask(r.mask.cpu())
            meta.append(m)
        if sq_norms is not None:
            tensors["sq_norms"] = sq_norms.detach().cpu().float()
        f = self._file(i)
        self._files.pop(i, None)
        with atomic_file(f) as tmp:
            save_file(tensors, str(tmp), metadata={"levels": json.dumps(meta), "unit": self.units[i]})
            self._sums[f.name] = LayerFileRecord(sha256=file_checksum(tmp), size=tmp.stat().st_size)
        self._stale.discard(i)
        self._write_manifest()

    def _handle(self, i: int) -> Any:
        f = self._files.get(i)
        if f is None:
            if not self.has(i):
                raise AllocationError(f"level database has no entry for {self.units[i]}")
            try:
                f = self._files[i] = safe_open(str(self._file(i)), framework="pt")
            except (SafetensorError, OSError) as e:
                raise AllocationError(
                    f"level database {self.path}: layer file {self._file(i).name} ({self.units[i]}) became "
                    f"unreadable after it was verified ({e}); run again: a damaged layer file is rebuilt"
                ) from None
        return f

    def get(self, i: int, level: int, dtype: torch.dtype | None = None) -> LayerResult:
        """Unit ``i`` at ``level``: a result whose ``weight`` is set (dequantized for bits)."""
        if self.path is None:
            r = self._mem[i][level]
        else:
            f = self._handle(i)
            meta = json.loads(f.metadata()["levels"])[level]
            keys = set(f.keys())
            mask = None
            if f"{level}.mask" in keys:
                mask = unpack_bitmask(f.get_tensor(f"{level}.mask"), self.shapes[i][1])
            quant = None
            weight = f.get_tensor(f"{level}.weight") if f"{level}.weight" in keys else None
            if f"{level}.codes" in keys:
                quant = QuantState(
                    f.get_tensor(f"{level}.codes"),
                    f.get_tensor(f"{level}.scales"),
                    f.get_tensor(f"{level}.zeros"),
                    int(meta["bits"]),
                    int(meta["group_size"]),
                    bool(meta["symmetric"]),
                    str(meta.get("method", "")),
                )
            r = LayerResult(weight=weight, mask=mask, quant=quant, loss=meta.get("loss"))
        if r.quant is not None and (self.path is not None or r.weight is None):
            r = dataclasses.replace(r, weight=r.quant.dequantize())
        if dtype is not None and r.weight is not None:
            r = dataclasses.replace(r, weight=r.weight.to(dtype))
        return r

    def sq_norms(self, i: int) -> torch.Tensor | None:
        """Per-input-column ``||X_j||^2`` of unit ``i``'s calibration input (Wanda's norm)."""
        if self.path is None:
            return self._norms.get(i)
        f = self._handle(i)
        return f.get_tensor("sq_norms") if "sq_norms" in set(f.keys()) else None


def log_size_estimate(
    shapes: Sequence[tuple[int, int]], levels: LevelSet, kind: str, elem: int, where: str
) -> int:
    """Log (and return) the database's approximate size before building it."""
    total = sum(entry_bytes(o * i, kind, elem) * len(lv) for (o, i), lv in zip(shapes, levels.values))
    n = sum(len(v) for v in levels.values)
    log.info(
        "level database: %d layers x %d levels in all, about %.1f MiB (%s)",
        len(shapes),
        n,
        total / 2**20,
        where,
    )
    return total


def progress_bar(total: int, enabled: bool) -> tqdm:
    return tqdm(total=total, desc="level database (layers x levels)", disable=not enabled)
