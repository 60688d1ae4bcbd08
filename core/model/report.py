"""What a compression run reports: per-module sparsity and methods, totals, timings."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from llmpress.model.results import CompressionState


def stored_base(base_model: str | None) -> str | None:
    """``base_model`` as the report stores it: a local folder as an absolute path (so that
    ``llmpress eval --baseline`` finds it from any folder), a Hub id as it is."""
    if base_model and Path(base_model).expanduser().is_dir():
        return os.path.abspath(Path(base_model).expanduser())
    return base_model


@dataclasses.dataclass
class ModuleReport:
    """One compressed layer: its methods, shape and measured sparsity."""

    name: str
    methods: list[str]
    shape: tuple[int, int]
    sparsity: float = 0.0
    info: dict[str, float] = dataclasses.field(default_factory=dict)
    #: reconstruction loss per method, as the reference OBS code reports it
    losses: dict[str, float] = dataclasses.field(default_factory=dict)
    #: the bit width of a quantized layer's codes (``None``: not quantized)
    bits: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "methods": self.methods,
            "shape": list(self.shape),
            "sparsity": round(self.sparsity, 6),
            **({"loss": {k: float(f"{v:.6g}") for k, v in self.losses.items()}} if self.losses else {}),
            **({"info": self.info} if self.info else {}),
            **({"bits": self.bits} if self.bits is not None else {}),
        }


@dataclasses.dataclass
class CompressionReport:
    """Summary of a :func:`llmpress.compress` run (``to_dict()`` is saved as JSON)."""

    recipe: dict[str, Any]
    #: where the uncompressed model came from (Hub id or folder), for model cards
    base_model: str | None = None
    modules: dict[str, ModuleReport] = dataclasses.field(default_factory=dict)
    calibration: dict[str, Any] = dataclasses.field(default_factory=dict)
    device: str = "cpu"
    #: processes of a ``torch.distributed`` run (1: a single process) and each one's device
    world_size: int = 1
    devices: list[str] = dataclasses.field(default_factory=list)
    wall_time_s: float = 0.0
    versions: dict[str, str] = dataclasses.field(default_factory=dict)
    #: block-level (structured) changes: the blocks' parameter counts before and after, and
    #: per block the widths (heads, kv_heads, neurons) as ``[before, after]``
    structure: dict[str, Any] = dataclasses.field(default_factory=dict)
    #: an allocation search's choice and its course (method, per-unit levels, fitness curve)
    allocation: dict[str, Any] | None = None

    @property
    def overall_sparsity(self) -> float:
        """Fraction of zeros over all compressed layers' weights."""
        total = sum(m.shape[0] * m.shape[1] for m in self.modules.values())
        zeros = sum(m.sparsity * m.shape[0] * m.shape[1] for m in self.modules.values())
        return zeros / total if total else 0.0

    @property
    def average_bits(self) -> float | None:
        """Bits per weight of the quantized layers' codes, weighted by layer size (scales and
        zero points not counted); ``None`` when no layer is quantized."""
        sized = [(m.bits, m.shape[0] * m.shape[1]) for m in self.modules.values() if m.bits is not None]
        total = sum(n for _, n in sized)
        return sum(b * n for b, n in sized) / total if total else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "base_model": stored_base(self.base_model),
            "recipe": self.recipe,
            "overall_sparsity": round(self.overall_sparsity, 6),
            **({"average_bits": round(self.average_bits, 6)} if self.average_bits is not None else {}),
            "modules": {k: v.to_dict() for k, v in self.modules.items()},
            "calibration": self.calibration,
            "device": self.device,
            "world_size": self.world_size,
            "devices": self.devices or [self.device],
            "wall_time_s": round(self.wall_time_s, 3),
            "versions": self.versions,
            **({"structure": self.structure} if self.structure else {}),
            **({"allocation": self.allocation} if self.allocation is not None else {}),
        }


@dataclasses.dataclass
class CompressionResult(CompressionReport):
    """What :func:`llmpress.compress` returns with the model: the report plus ``state``, each
    layer's committed result (masks, quantization state) and the KV-cache scales, which the
    savers read. ``state`` is not part of ``to_dict()``."""

    state: CompressionState = dataclasses.field(default_factory=CompressionState)
