"""What a saved llmpress folder says about itself: config, report, evaluation and tensor sizes.

Sizes are read from the safetensors headers with ``safetensors.safe_open`` (no tensor is
loaded): every tensor's dtype, shape and byte length. A compressed module (a name in
``llmpress_report.json``) owns every tensor under its prefix (``q_proj.weight``, or packed
``q_proj.qweight`` + ``q_proj.scales``); its *logical* parameter count is ``out * in``
(+ bias) whatever the storage, so bits per parameter = ``8 * bytes / logical params`` is
comparable before and after packing.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from llmpress.cli.eval_harness import EVAL_FILE
from llmpress.format.checkpoint import SAFETENSORS_DTYPES, TensorHeader, read_header
from llmpress.model.report import CompressionReport

log = logging.getLogger(__name__)

REPORT_FILE = "llmpress_report.json"
PLOT_FILE = "llmpress_allocation.png"
CARD_FILE = "README.md"

_DTYPE_BITS = {
    "float64": 64,
    "float32": 32,
    "float16": 16,
    "bfloat16": 16,
    "float8_e4m3fn": 8,
    "float8_e5m2": 8,
}
_BLOCK_INDEX = re.compile(r"\.(\d+)\.")


def weight_files(folder: Path) -> list[Path]:
    """The ``*.safetensors`` files of a checkpoint folder (sorted)."""
    return sorted(p for p in folder.glob("*.safetensors") if p.is_file())


@dataclasses.dataclass(frozen=True)
class ModuleStats:
    """A compressed layer: logical parameters, stored bytes, sparsity and nominal bits."""

    name: str
    shape: tuple[int, int]
    methods: tuple[str, ...]
    sparsity: float
    params: int
    nbytes: int
    nominal_bits: int | None = None
    #: reconstruction loss per method (OBS methods), from the report
    losses: tuple[tuple[str, float], ...] = ()

    @property
    def bits_per_param(self) -> float:
        return 8.0 * self.nbytes / self.params if self.params else 0.0

    @property
    def block(self) -> int | None:
        """Index of the repeated block holding the layer (``model.layers.3.mlp`` -> 3)."""
        m = _BLOCK_INDEX.search(f".{self.name}.")
        return int(m.group(1)) if m else None

    @property
    def kind(self) -> str:
        """The name relative to its block (``self_attn.q_proj``)."""
        m = _BLOCK_INDEX.search(f".{self.name}.")
        return f".{self.name}."[m.end() : -1] if m else self.name


@dataclasses.dataclass(frozen=True)
class SizeStats:
    """Parameters and bytes of a checkpoint (measured from files or estimated).

    ``nbytes`` counts whole files; ``data_bytes`` only tensor data (no headers), which is
    what bits per parameter are computed from (``nbytes`` when unknown).
    """

    params: int
    nbytes: int
    measured: bool = True
    data_bytes: int | None = None

    @property
    def bits_per_param(self) -> float:
        data = self.data_bytes if self.data_bytes is not None else self.nbytes
        return 8.0 * data / self.params if self.params else 0.0


@dataclasses.dataclass
class FolderInfo:
    """Everything the card needs from a saved folder (see :func:`read_folder`)."""

    path: Path
    config: dict[str, Any]
    #: ``llmpress_report.json`` read through :class:`CompressionReport` (``None``: absent or invalid)
    report: CompressionReport | None
    evaluation: dict[str, Any] | None
    tensors: dict[str, TensorHeader]
    file_bytes: int

    @property
    def quantization_config(self) -> dict[str, Any] | None:
        q = self.config.get("quantization_config")
        return q if isinstance(q, dict) else None

    @property
    def stages(self) -> list[dict[str, Any]]:
        recipe = self.report.recipe if self.report is not None else {}
        return [s for s in recipe.get("stages", []) if isinstance(s, dict)]

    @property
    def packed(self) -> bool:
        """Layers stored in llmpress's packed format (``quant_method: llmpress``): loading needs
        ``import llmpress``."""
        q = self.quantization_config
        return q is not None and q.get("quant_method") == "llmpress"

    @property
    def quantizes_activations(self) -> bool:
        """Layers that quantize their inputs at run time (W8A8): ``activations`` in an llmpress
        module entry, or ``input_activations`` in a compressed-tensors config group."""
        q = self.quantization_config or {}
        entries = [
            e for key in ("modules", "config_groups") if isinstance(q.get(key), dict) for e in q[key].values()
        ]
        return any(
            isinstance(e, dict) and (e.get("activations") or e.get("input_activations")) for e in entries
        )

    @property
    def quantized(self) -> bool:
        """Quantized weights: a recipe stage with ``bits``, an ``int`` packed layer, or another
        library's quantization config (compressed-tensors). Sparse-only packing is not."""
        q = self.quantization_config
        if any("bits" in s for s in self.stages):
            return True
        if q is None:
            return False
        if q.get("quant_method") != "llmpress":
            return True
        mods = q.get("modules")
        return isinstance(mods, dict) and any(isinstance(e, dict) and e.get("bits") for e in mods.values())

    @property
    def dtype_bits(self) -> int:
        """Bits of the checkpoint's float dtype from config.json (16 when unknown)."""
        dtype = str(self.config.get("dtype") or self.config.get("torch_dtype") or "float16")
        return _DTYPE_BITS.get(dtype.removeprefix("torch."), 16)

    def modules(self) -> list[ModuleStats]:
        """Per compressed layer statistics, in the report's order."""
        if self.report is None:
            return []
        out = []
        for name, m in self.report.modules.items():
            shape = m.shape
            owned = _owned(self.tensors, name)
            bias = sum(t.numel for t in owned if t.name == f"{name}.bias")
            params = shape[0] * shape[1] + bias
            nbytes = sum(t.nbytes for t in owned) or params * self.dtype_bits // 8
            methods = tuple(m.methods)
            out.append(
                ModuleStats(
                    name=name,
                    shape=shape,
                    methods=methods,
                    sparsity=m.sparsity,
                    params=params,
                    nbytes=nbytes,
                    nominal_bits=self.nominal_bits(name, methods),
                    losses=tuple(m.losses.items()),
                )
            )
        return out

    def nominal_bits(self, name: str, methods: Iterable[str] = ()) -> int | None:
        """Quantization bits of a layer: its ``quantization_config`` entry, else its recipe stage."""
        q = self.quantization_config
        if q is not None:
            entry = q.get("modules", {}).get(name) if isinstance(q.get("modules"), dict) else None
            if isinstance(entry, dict) and isinstance(entry.get("bits"), int):  # llmpress packed format
                return int(entry["bits"])
            if isinstance(q.get("bits"), int):
                return int(q["bits"])
            groups = q.get("config_groups")
            for g in groups.values() if isinstance(groups, dict) else ():  # compressed-tensors
                bits = (g.get("weights") or {}).get("num_bits") if isinstance(g, dict) else None
                if isinstance(bits, int):
                    return bits
        bits = [s["bits"] for s in self.stages if s.get("method") in set(methods) and "bits" in s]
        return int(min(bits)) if bits else None

    def size(self) -> SizeStats:
        """Logical parameters and file bytes of this checkpoint."""
        mods = self.modules()
        owned = {t.name for m in mods for t in _owned(self.tensors, m.name)}
        params = sum(t.numel for n, t in self.tensors.items() if n not in owned) + sum(m.params for m in mods)
        data = sum(t.nbytes for t in self.tensors.values())
        return SizeStats(params=params, nbytes=self.file_bytes, measured=bool(self.tensors), data_bytes=data)


def _owned(tensors: dict[str, TensorHeader], module: str) -> list[TensorHeader]:
    prefix = module + "."
    return [t for n, t in tensors.items() if n.startswith(prefix) and "." not in n[len(prefix) :]]


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        log.warning("ignoring %s: not valid JSON (%s)", path, e)
        return None
    return data if isinstance(data, dict) else None


def _read_report(path: Path) -> CompressionReport | None:
    if not path.is_file():
        return None
    try:
        return CompressionReport.read(path)
    except ValidationError as e:  # invalid JSON too
        log.warning("ignoring %s: not an llmpress report (%s)", path, e.errors()[0]["msg"])
        return None


def read_folder(folder: str | Path) -> FolderInfo:
    """Read config.json, ``llmpress_report.json``, ``llmpress_eval.json`` and safetensors headers."""
    from llmpress.errors import CheckpointError

    path = Path(folder)
    config = _read_json(path / "config.json")
    if config is None:
        raise CheckpointError(f"{path} is not a saved model folder: no readable config.json")
    tensors: dict[str, TensorHeader] = {}
    files = weight_files(path)
    for f in files:
        tensors.update(read_header(f))
    if not files:
        log.warning("%s has no *.safetensors files; sizes are estimated", path)
    return FolderInfo(
        path=path,
        config=config,
        report=_read_report(path / REPORT_FILE),
        evaluation=_read_json(path / EVAL_FILE),
        tensors=tensors,
        file_bytes=sum(f.stat().st_size for f in files),
    )


def local_size(folder: str | Path) -> SizeStats | None:
    """Parameters and bytes of a local dense checkpoint folder, or ``None`` if it has no safetensors."""
    files = weight_files(Path(folder))
    if not files:
        return None
    tensors = [t for f in files for t in read_header(f).values()]
    return SizeStats(
        params=sum(t.numel for t in tensors),
        nbytes=sum(f.stat().st_size for f in files),
        data_bytes=sum(t.nbytes for t in tensors),
    )


def hub_size(repo_id: str, api: Any) -> SizeStats | None:
    """Parameters and bytes of a Hub model's safetensors (header range requests), or ``None``."""
    try:
        meta = api.get_safetensors_metadata(repo_id)
        counts = [fm.parameter_count for fm in meta.files_metadata.values()]
        params = sum(n for c in counts for n in c.values())
        data = sum(
            n * SAFETENSORS_DTYPES.get(dtype, (16, None))[0] // 8 for c in counts for dtype, n in c.items()
        )
        info = api.model_info(repo_id, files_metadata=True)
        nbytes = sum(s.size or 0 for s in info.siblings or [] if s.rfilename.endswith(".safetensors"))
    except Exception as e:  # any failure (offline, no safetensors, no access) -> estimate instead
        log.info("could not read the size of %s from the Hub (%s); estimating it", repo_id, type(e).__name__)
        return None
    return SizeStats(params=params, nbytes=nbytes, data_bytes=data) if params and nbytes else None
