"""Checkpoint validation: the ``quantization_config`` schema, every tensor against it, checksums.

Loading an llmpress checkpoint checks, before any weight is read into the model:

1. ``quantization_config`` against a schema (types, ranges, enumerations). Unknown fields are
   refused (a field this llmpress does not know may change what the tensors mean), except in
   a checkpoint from a newer format version, which is refused first with the version to
   upgrade to.
2. Every tensor of every file against the model being built: each tensor the model needs is
   present once, with its exact shape and, for packed layers, its exact dtype; no tensor is
   unexpected.
3. The values of the small tensors each format constrains (scales finite and positive, zero
   points on the grid; :attr:`llmpress.format.formats.FormatSpec.values`), at every load.
4. Checksums: a digest of each tensor (dtype, shape and bytes; ``checksum_algorithm``,
   :data:`DEFAULT_CHECKSUM` when saved by this llmpress, ``sha256`` in older checkpoints) and
   the ``sha256`` of the model config, recorded at save time, so that even two same-size
   tensors whose offsets were swapped, or an edited ``config.json``, are caught.
   ``LLMPRESS_VERIFY_CHECKSUMS=0`` skips this, ``=1`` forces it; by default it always runs,
   except for ``sha256`` checksums (older checkpoints) above :data:`AUTO_VERIFY_BYTES` of
   tensor data (sha256 costs more than the load; see ``examples/benchmarks/checksum_speed.py``).

Every failure is a :class:`llmpress.errors.CheckpointError` naming the file, tensor or field
and the fix.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import mmap
import os
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from safetensors import SafetensorError, safe_open

from llmpress.errors import CheckpointError
from llmpress.format.formats import FORMAT_VERSION, ModuleFormat, Values
from llmpress.format.transforms import OnlineTransform

log = logging.getLogger(__name__)

VERIFY_ENV = "LLMPRESS_VERIFY_CHECKSUMS"
#: ``sha256`` checksums (checkpoints saved before ``checksum_algorithm``) are verified by default
#: up to this much tensor data (bytes); faster algorithms always are
AUTO_VERIFY_BYTES = 4 << 30
#: digests :func:`tensor_checksum` can record (``checksum_algorithm``; absent: ``sha256``, what
#: llmpress recorded before the field existed). ``xxh3_128`` is not cryptographic: checksums catch
#: damaged, truncated or edited files, not an attacker who can also rewrite ``config.json``.
ChecksumAlgorithm = Literal["sha256", "blake3", "xxh3_128"]
CHECKSUM_ALGORITHMS: tuple[str, ...] = get_args(ChecksumAlgorithm)
#: what :func:`record_checksums` records: cryptographic and fast enough to verify at every load
#: (2 CPUs, files cached: 7-9 GiB/s against 1.1-1.3 for sha256; 7 % of a 3.3 GiB fp8
#: from_pretrained, sha256 26 %; ``examples/benchmarks/checksum_speed.py``)
DEFAULT_CHECKSUM = "blake3"
#: config.json keys that do not change what the model computes (left out of its checksum)
_VOLATILE_CONFIG_KEYS = frozenset(
    {"quantization_config", "transformers_version", "dtype", "torch_dtype", "_name_or_path", "use_cache"}
)
#: every safetensors dtype code: (bits per element, the torch dtype llmpress reads it as, or
#: ``None`` for codes it never stores). The one table for headers, sizes and checksums.
SAFETENSORS_DTYPES: dict[str, tuple[int, torch.dtype | None]] = {
    "F64": (64, torch.float64),
    "I64": (64, torch.int64),
    "U64": (64, None),
    "C64": (64, None),
    "F32": (32, torch.float32),
    "I32": (32, torch.int32),
    "U32": (32, None),
    "F16": (16, torch.float16),
    "BF16": (16, torch.bfloat16),
    "I16": (16, torch.int16),
    "U16": (16, None),
    "F8_E4M3": (8, torch.float8_e4m3fn),
    "F8_E5M2": (8, torch.float8_e5m2),
    "F8_E8M0": (8, None),
    "F8_E4M3FNUZ": (8, None),
    "F8_E5M2FNUZ": (8, None),
    "I8": (8, torch.int8),
    "U8": (8, torch.uint8),
    "BOOL": (8, torch.bool),
    "F6_E2M3": (6, None),
    "F6_E3M2": (6, None),
    "F4": (4, None),
}


@dataclasses.dataclass(frozen=True)
class TensorHeader:
    """One tensor of a safetensors file, from its header (no data read)."""

    file: str
    name: str
    dtype: str  # the safetensors code, e.g. "F16"
    shape: tuple[int, ...]

    @property
    def torch_dtype(self) -> torch.dtype | None:
        """The torch dtype llmpress reads it as (``None``: a code llmpress never stores)."""
        return SAFETENSORS_DTYPES.get(self.dtype, (0, None))[1]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of its data (sub-byte codes are packed)."""
        return math.ceil(self.numel * dtype_bits(self.dtype) / 8)


def dtype_bits(code: str) -> int:
    """Bits per element of a safetensors dtype code; an unknown code is a :class:`CheckpointError`."""
    if code not in SAFETENSORS_DTYPES:
        raise CheckpointError(f"safetensors dtype {code!r} is unknown to llmpress; upgrade llmpress")
    return SAFETENSORS_DTYPES[code][0]


def read_header(path: str | Path) -> dict[str, TensorHeader]:
    """Tensor name -> :class:`TensorHeader` of one safetensors file, through ``safe_open``
    (which checks the header against the file); an unreadable file is a :class:`CheckpointError`."""
    out: dict[str, TensorHeader] = {}
    try:
        with safe_open(str(path), framework="pt") as st:
            for k in st.keys():  # noqa: SIM118
                s = st.get_slice(k)
                out[k] = TensorHeader(str(path), k, s.get_dtype(), tuple(int(d) for d in s.get_shape()))
    except (SafetensorError, OSError) as e:
        raise unreadable(path, e) from None
    return out


#: one module's entry of ``quantization_config.modules``: :class:`ModuleFormat` itself
ModuleEntry = ModuleFormat


class KVCacheEntry(BaseModel):
    """``quantization_config.kv_cache``: the KV cache's format; FP8: each attention layer's
    (key, value) scales; ``int8``/``int4`` (rounded per token, dynamic): the channels of a head
    sharing a scale (``group_size``; absent: the head dimension)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    dtype: Literal["float8_e4m3fn", "int8", "int4"]
    scales: dict[str, list[float]] | None = None
    group_size: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _fields_of_dtype(self) -> KVCacheEntry:
        if self.dtype == "float8_e4m3fn" and (self.scales is None or self.group_size is not None):
            raise ValueError("an FP8 kv_cache has per-layer 'scales' and no 'group_size'")
        if self.dtype != "float8_e4m3fn" and self.scales is not None:
            raise ValueError(f"a {self.dtype} kv_cache is dynamic and stores no 'scales'")
        return self

    @field_validator("scales")
    @classmethod
    def _positive(cls, v: dict[str, list[float]] | None) -> dict[str, list[float]] | None:
        for name, pair in (v or {}).items():
            if len(pair) != 2 or not all(math.isfinite(x) and x > 0 for x in pair):
                raise ValueError(
                    f"kv_cache scales of {name} must be two finite positive numbers (key, value), got {pair}"
                )
        return v


class QuantizationConfigSchema(BaseModel):
    """The ``quantization_config`` of an llmpress checkpoint."""

    model_config = ConfigDict(extra="forbid", strict=True)

    quant_method: Literal["llmpress"]
    format_version: int = Field(ge=1, le=FORMAT_VERSION)
    llmpress_version: str | None = None
    note: str | None = None
    recipe: dict[str, Any] = Field(default_factory=dict)
    modules: dict[str, ModuleFormat]
    kv_cache: KVCacheEntry | None = None
    #: tensor name -> digest of its dtype, shape and bytes (:func:`tensor_checksum`)
    checksums: dict[str, str] | None = None
    #: the algorithm of ``checksums``; absent in checkpoints saved before it was recorded
    checksum_algorithm: ChecksumAlgorithm = "sha256"
    #: sha256 of the model config (see :func:`config_checksum`)
    config_checksum: str | None = None
    #: per-module head counts of structurally pruned attention modules, set at load
    attributes: (
        dict[str, dict[Literal["num_key_value_groups", "num_heads", "num_key_value_heads"], int]] | None
    ) = None

    #: mixture-of-experts modules stored unfused (one linear per expert projection) -> their
    #: fused layout (:data:`llmpress.model.moe.LAYOUTS`); unfused before the weights load
    experts: dict[str, str] | None = None
    #: online transforms rebuilt at load (QuaRot's R4: a Hadamard before each down_proj)
    transforms: list[OnlineTransform] | None = None

    @field_validator("attributes")
    @classmethod
    def _positive(cls, v: dict[str, dict[str, int]] | None) -> dict[str, dict[str, int]] | None:
        for name, attrs in (v or {}).items():
            if any(x < 1 for x in attrs.values()):
                raise ValueError(f"{name}: head counts must be >= 1")
        return v


def validate_quantization_config(data: Any, where: str = "config.json") -> QuantizationConfigSchema:
    """Validate a ``quantization_config`` dict; raise :class:`CheckpointError` naming the field."""
    if not isinstance(data, dict):
        raise CheckpointError(
            f"{where}: quantization_config must be a JSON object, got {type(data).__name__}"
        )
    version = data.get("format_version")
    if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
        from llmpress.versions import package_version

        newer = data.get("llmpress_version")
        raise CheckpointError(
            f"{where}: this checkpoint uses llmpress format version {version}, newer than this llmpress "
            f"({package_version('llmpress')}) reads ({FORMAT_VERSION}); upgrade llmpress"
            + (f" to {newer} or later (pip install -U 'llmpress>={newer}')" if isinstance(newer, str) else "")
        )
    try:
        return QuantizationConfigSchema.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(_describe(err) for err in e.errors())
        raise CheckpointError(
            f"{where}: invalid quantization_config: {problems}; the file was edited or damaged: "
            f"re-download the checkpoint or save it again with llmpress"
        ) from None


def _describe(err: Any) -> str:
    where = ".".join(str(p) for p in err["loc"]) or "quantization_config"
    got = "" if err["type"] == "missing" else f" (got {err.get('input')!r:.80})"
    return f"{where}: {err['msg']}{got}"


# ------------------------------------------------------------------------------ tensors


def _hasher(algorithm: str) -> Any:
    """A new hash object of ``algorithm`` (one of :data:`CHECKSUM_ALGORITHMS`)."""
    if algorithm == "sha256":
        return hashlib.sha256()
    try:
        if algorithm == "blake3":
            import blake3

            return blake3.blake3(max_threads=blake3.blake3.AUTO)
        if algorithm == "xxh3_128":
            import xxhash

            return xxhash.xxh3_128()
    except ImportError as e:
        raise CheckpointError(
            f"checksum_algorithm {algorithm!r} needs the {e.name} package: pip install {e.name}"
        ) from None
    raise CheckpointError(
        f"unknown checksum_algorithm {algorithm!r}; this llmpress reads {list(CHECKSUM_ALGORITHMS)}"
    )


def _digest(algorithm: str, dtype: str, shape: list[int], data: Any) -> str:
    h = _hasher(algorithm)
    h.update(f"{dtype}:{shape}:".encode())
    h.update(data)
    return str(h.hexdigest())


def tensor_checksum(t: torch.Tensor, algorithm: str = "sha256") -> str:
    """Digest of a tensor's dtype, shape and bytes (hex); ``algorithm`` from
    :data:`CHECKSUM_ALGORITHMS`."""
    data = t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
    return _digest(algorithm, str(t.dtype).removeprefix("torch."), list(t.shape), data)


def file_checksum(path: str | Path, chunk: int = 1 << 22) -> str:
    """``sha256`` of a file's bytes (hex), read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def config_checksum(config: dict[str, Any]) -> str:
    """``sha256`` of the model config without keys that do not change the computation."""
    core = {k: v for k, v in config.items() if k not in _VOLATILE_CONFIG_KEYS}
    return hashlib.sha256(json.dumps(core, sort_keys=True, default=str).encode()).hexdigest()


def file_checksums(files: Iterable[str | Path], algorithm: str = "sha256") -> dict[str, str]:
    """Checksums of every tensor in ``files``: :func:`tensor_checksum` of each, computed over
    the mapped file's bytes (no copy; the files must be valid safetensors)."""
    out: dict[str, str] = {}
    for f in files:
        with open(f, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            (n,) = struct.unpack("<Q", mm[:8])
            header = json.loads(mm[8 : 8 + n])
            view = memoryview(mm)
            try:
                for k, e in header.items():
                    if k == "__metadata__":
                        continue
                    begin, end = (8 + n + int(x) for x in e["data_offsets"])
                    dtype = SAFETENSORS_DTYPES.get(e["dtype"], (0, None))[1]
                    if dtype is None:  # a dtype llmpress does not store: as torch names it
                        with safe_open(str(f), framework="pt") as st:
                            out[k] = tensor_checksum(st.get_tensor(k), algorithm)
                        continue
                    shape = [int(d) for d in e["shape"]]
                    out[k] = _digest(algorithm, str(dtype).removeprefix("torch."), shape, view[begin:end])
            finally:
                view.release()
    return out


def unreadable(path: str | Path, err: Exception) -> CheckpointError:
    """The error for a safetensors file ``safe_open`` refused (it checks that the header's
    offsets cover the file exactly, so truncation and padding show up here)."""
    p = Path(path)
    if "incomplete metadata" in str(err) or "not fully covered" in str(err):
        return CheckpointError(
            f"{p} is truncated or padded: its header does not describe the file's {p.stat().st_size} "
            f"bytes ({err}); re-download it"
        )
    return CheckpointError(f"{p} is not a valid safetensors file ({err}); re-download or re-save it")


def read_headers(files: Iterable[str | Path]) -> dict[str, tuple[str, torch.dtype | None, tuple[int, ...]]]:
    """Tensor name -> (file, dtype, shape) over every file; a tensor stored twice is an error."""
    out: dict[str, tuple[str, torch.dtype | None, tuple[int, ...]]] = {}
    for f in files:
        for k, h in read_header(f).items():
            if k in out:
                raise CheckpointError(f"tensor {k!r} is stored twice: in {out[k][0]} and {f}; re-save it")
            out[k] = (h.file, h.torch_dtype, h.shape)
    return out


def check_tensors(
    expected: dict[str, tuple[tuple[int, ...], torch.dtype | None]],
    found: dict[str, tuple[str, torch.dtype | None, tuple[int, ...]]],
    optional: Iterable[str] = (),
) -> None:
    """Every expected tensor present with its shape (and dtype when given), nothing else.

    ``expected``: name -> (shape, exact dtype or ``None`` for any floating dtype).
    ``optional``: names that may be absent (tied weights, non-persistent buffers).
    """
    skip = set(optional)
    for name, (shape, dtype) in expected.items():
        if name not in found:
            if name in skip:
                continue
            raise CheckpointError(
                f"tensor {name!r} is missing from the checkpoint files; the checkpoint is incomplete or does "
                f"not match its config.json: re-download it or save it again"
            )
        f, got_dtype, got_shape = found[name]
        if got_shape != tuple(shape):
            raise CheckpointError(
                f"{f}: tensor {name!r} has shape {list(got_shape)}, the config says {list(shape)}; "
                f"the file does not match config.json: re-download it or save it again"
            )
        if got_dtype is None or (dtype is not None and got_dtype != dtype):
            raise CheckpointError(
                f"{f}: tensor {name!r} is stored as {got_dtype}, expected {dtype}; the file was re-saved or "
                f"damaged: re-download it or save it again with llmpress"
            )
        if dtype is None and not got_dtype.is_floating_point:
            raise CheckpointError(f"{f}: tensor {name!r} is stored as {got_dtype}, expected a floating dtype")
    unexpected = sorted(set(found) - set(expected))
    if unexpected:
        f = found[unexpected[0]][0]
        raise CheckpointError(
            f"{f}: unexpected tensor(s) {unexpected[:5]} that this model and its quantization_config do not "
            f"describe; the checkpoint does not match config.json: re-download it or save it again"
        )


def check_values(
    formats: dict[str, ModuleFormat],
    found: dict[str, tuple[str, torch.dtype | None, tuple[int, ...]]],
) -> None:
    """The values of the small tensors each module's format constrains (scales, input scales,
    zero points: :attr:`llmpress.format.formats.FormatSpec.values`), on every load whatever the
    checkpoint's size: a NaN, 0 or negative scale would load and give NaN or silently wrong
    outputs when checksums are not verified. Call after :func:`check_tensors`."""
    wanted: dict[str, dict[str, Values]] = {}  # file -> tensor -> rule
    for name, fmt in formats.items():
        for suffix, rule in fmt.spec.values(fmt).items():
            key = f"{name}.{suffix}"
            if key in found:
                wanted.setdefault(found[key][0], {})[key] = rule
    for f, rules in wanted.items():
        try:
            with safe_open(f, framework="pt") as st:
                problems = ((key, rule.problem(st.get_tensor(key))) for key, rule in rules.items())
                key, problem = next(((k, p) for k, p in problems if p), ("", None))
        except (SafetensorError, OSError) as e:
            raise unreadable(f, e) from None
        if problem:
            raise CheckpointError(
                f"{f}: tensor {key!r} {problem}; the file was damaged or edited: re-download the "
                f"checkpoint or save it again"
            )


def record_checksums(quantization_config: dict[str, Any], files: Iterable[str | Path]) -> None:
    """Record the checksums of every tensor of ``files`` (and their algorithm) in
    ``quantization_config``, for :func:`verify_checksums` at load."""
    quantization_config["checksum_algorithm"] = DEFAULT_CHECKSUM
    quantization_config["checksums"] = file_checksums(files, DEFAULT_CHECKSUM)


def verify_checksums(
    files: list[str],
    recorded: dict[str, str],
    found: dict[str, tuple[str, torch.dtype | None, tuple[int, ...]]],
    algorithm: str = "sha256",
) -> bool:
    """Compare each tensor's checksum with the recorded one; returns False when skipped."""
    mode = os.environ.get(VERIFY_ENV, "").strip()
    total = sum(Path(f).stat().st_size for f in files)
    too_big = algorithm == "sha256" and total > AUTO_VERIFY_BYTES
    if mode == "0" or (mode != "1" and too_big):
        log.warning(
            "checksums of %.1f GB of tensors not verified (%s=%s%s); set %s=1 to verify them",
            total / 1e9,
            VERIFY_ENV,
            mode or "auto",
            ", sha256 over 4 GiB: re-save the checkpoint to record faster checksums" if mode != "0" else "",
            VERIFY_ENV,
        )
        return False
    missing = sorted(set(found) - set(recorded))
    if missing:
        raise CheckpointError(
            f"{found[missing[0]][0]}: tensor(s) {missing[:5]} have no recorded checksum; the checkpoint was "
            f"changed after llmpress saved it: re-download it or save it again"
        )
    for name, digest in file_checksums(files, algorithm).items():
        if recorded.get(name) != digest:
            raise CheckpointError(
                f"{found[name][0]}: tensor {name!r} does not match its recorded checksum (its bytes, dtype, "
                f"shape or offsets were changed); re-download the checkpoint, or set {VERIFY_ENV}=0 to load it "
                f"anyway at your own risk"
            )
    return True


def module_formats(schema: QuantizationConfigSchema) -> dict[str, ModuleFormat]:
    """The validated entries (already :class:`ModuleFormat` objects)."""
    return dict(schema.modules)
