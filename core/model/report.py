"""What a compression run reports: per-module sparsity and methods, totals, timings.

:class:`CompressionReport` is one pydantic model, in memory and on disk
(``llmpress_report.json`` is written with :meth:`CompressionReport.write` and read with
:meth:`CompressionReport.read`). :class:`CompressionResult` is what ``compress`` returns: the
report plus the run's :class:`llmpress.model.results.CompressionState` (per-layer results and
KV-cache scales), which the savers read and which is never serialized.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, model_serializer, model_validator

from llmpress.model.results import CompressionState


def stored_base(base_model: str | None) -> str | None:
    """``base_model`` as the report stores it: a local folder as an absolute path (so that
    ``llmpress eval --baseline`` finds it from any folder), a Hub id as it is."""
    if base_model and Path(base_model).expanduser().is_dir():
        return os.path.abspath(Path(base_model).expanduser())
    return base_model


class ModuleReport(BaseModel):
    """One compressed layer: its methods, shape and measured sparsity.

    On disk the entry is keyed by ``name`` (not repeated inside), ``losses`` is stored as
    ``loss`` and empty ``info``/``losses`` and a ``None`` ``bits`` are left out.
    """

    name: str
    methods: list[str]
    shape: tuple[int, int]
    sparsity: float = 0.0
    info: dict[str, float] = Field(default_factory=dict)
    #: reconstruction loss per method, as the reference OBS code reports it
    losses: dict[str, float] = Field(default_factory=dict)
    #: the bit width of a quantized layer's codes (``None``: not quantized)
    bits: int | None = None
    #: how the layer's inputs are quantized at run time (W8A8, W4A8, W4A4: an activation scheme
    #: of :data:`llmpress.quant.activations.SCHEMES`), ``None``: weight-only
    activations: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _from_disk(cls, data: Any) -> Any:  # noqa: ANN401 - pydantic's raw input
        if isinstance(data, dict) and "loss" in data and "losses" not in data:
            data = {**data, "losses": data["loss"]}
            data.pop("loss")
        return data

    @model_serializer(mode="plain")
    def _to_disk(self) -> dict[str, object]:
        return {
            "methods": self.methods,
            "shape": list(self.shape),
            "sparsity": round(self.sparsity, 6),
            **({"loss": {k: float(f"{v:.6g}") for k, v in self.losses.items()}} if self.losses else {}),
            **({"info": self.info} if self.info else {}),
            **({"bits": self.bits} if self.bits is not None else {}),
            **({"activations": self.activations} if self.activations is not None else {}),
        }

    def to_dict(self) -> dict[str, object]:
        """The entry as ``llmpress_report.json`` stores it."""
        return self.model_dump()


class CompressionReport(BaseModel):
    """Summary of a :func:`llmpress.compress` run (saved as ``llmpress_report.json``).

    On disk it also holds the derived ``overall_sparsity`` and ``average_bits`` (ignored when
    read back: they are recomputed), ``base_model`` as :func:`stored_base` gives it and
    ``devices`` defaulting to ``[device]``; empty ``structure`` and a ``None`` ``allocation``
    or ``kv_cache`` are left out.
    """

    model_config = ConfigDict(extra="ignore")

    recipe: dict[str, Any]
    #: where the uncompressed model came from (Hub id or folder), for model cards; ``model`` in
    #: reports of early versions
    base_model: str | None = Field(default=None, validation_alias=AliasChoices("base_model", "model"))
    modules: dict[str, ModuleReport] = Field(default_factory=dict)
    calibration: dict[str, Any] = Field(default_factory=dict)
    device: str = "cpu"
    #: processes of a ``torch.distributed`` run (1: a single process) and each one's device
    world_size: int = 1
    devices: list[str] = Field(default_factory=list)
    wall_time_s: float = 0.0
    versions: dict[str, str] = Field(default_factory=dict)
    #: block-level (structured) changes: the blocks' parameter counts before and after, and
    #: per block the widths (heads, kv_heads, neurons) as ``[before, after]``
    structure: dict[str, Any] = Field(default_factory=dict)
    #: an allocation search's choice and its course (method, per-unit levels, fitness curve)
    allocation: dict[str, Any] | None = None
    #: a recovery (training) stage's course: tokens, steps, loss curve, evaluations
    recovery: dict[str, Any] | None = None
    #: a transform stage's summary (rotations fused offline, online transforms, run-time cost)
    transforms: dict[str, Any] | None = None

    #: the quantized KV cache, as the run simulates and stores it: ``{"dtype": "int4", "group_size": 64,
    #: "rounding": ...}`` (FP8: its dtype and the number of calibrated layers); ``None``: not quantized
    kv_cache: dict[str, Any] | None = None

    @model_validator(mode="before")
    @classmethod
    def _names_from_keys(cls, data: Any) -> Any:  # noqa: ANN401 - pydantic's raw input
        """On disk a module's name is its key: put it back into the entry."""
        if isinstance(data, dict) and isinstance(data.get("modules"), dict):
            modules = {
                k: {**v, "name": k} if isinstance(v, dict) and "name" not in v else v
                for k, v in data["modules"].items()
            }
            data = {**data, "modules": modules}
        return data

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

    @property
    def stored_bits(self) -> float | None:
        """Stored bits per weight (codes, statistics, outliers) of the layers whose method
        reports them (``info["avg_bits"]``, e.g. SpQR), weighted by layer size; else ``None``."""
        sized = [
            (m.info["avg_bits"], m.shape[0] * m.shape[1])
            for m in self.modules.values()
            if "avg_bits" in m.info
        ]
        total = sum(n for _, n in sized)
        return sum(b * n for b, n in sized) / total if total else None

    @model_serializer(mode="plain")
    def _to_disk(self) -> dict[str, object]:
        bits = self.average_bits
        return {
            "base_model": stored_base(self.base_model),
            "recipe": self.recipe,
            "overall_sparsity": round(self.overall_sparsity, 6),
            **({"average_bits": round(bits, 6)} if bits is not None else {}),
            "modules": {k: v.model_dump() for k, v in self.modules.items()},
            "calibration": self.calibration,
            "device": self.device,
            "world_size": self.world_size,
            "devices": self.devices or [self.device],
            "wall_time_s": round(self.wall_time_s, 3),
            "versions": self.versions,
            **({"structure": self.structure} if self.structure else {}),
            **({"allocation": self.allocation} if self.allocation is not None else {}),
            **({"recovery": self.recovery} if self.recovery is not None else {}),
            **({"transforms": self.transforms} if self.transforms is not None else {}),
            **({"kv_cache": self.kv_cache} if self.kv_cache is not None else {}),
        }

    def to_dict(self) -> dict[str, object]:
        """The report as ``llmpress_report.json`` stores it."""
        return self.model_dump()

    def to_json(self) -> str:
        """The text of ``llmpress_report.json``."""
        return json.dumps(self.model_dump(), indent=2)

    def write(self, path: str | Path) -> Path:
        """Write the report as JSON to ``path``."""
        Path(path).write_text(self.to_json(), encoding="utf-8")
        return Path(path)

    @classmethod
    def read(cls, path: str | Path) -> CompressionReport:
        """Read a report written by :meth:`write` (pydantic's ``ValidationError`` if it is not one)."""
        return cls.model_validate_json(Path(path).read_text(encoding="utf-8"))


class CompressionResult(CompressionReport):
    """What a compression run returns: its report plus ``state``, the committed per-layer
    results and KV-cache scales the savers read (in memory only: never serialized)."""

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="ignore")

    state: CompressionState = Field(default_factory=CompressionState, exclude=True)

    @classmethod
    def of(cls, report: CompressionReport, state: CompressionState) -> CompressionResult:
        """``report`` with ``state`` attached (the same field values, no copy of tensors)."""
        fields = {name: getattr(report, name) for name in CompressionReport.model_fields}
        return cls.model_construct(**fields, state=state)
