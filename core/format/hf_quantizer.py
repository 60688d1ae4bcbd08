"""transformers integration: ``quant_method: "llmpress"`` in config.json.

:func:`register` (run on ``import llmpress``, idempotent) adds :class:`LlmpressConfig` and
:class:`LlmpressHfQuantizer` to transformers' quantizer tables. On ``from_pretrained`` the
quantizer swaps every packed layer for a :class:`llmpress.format.runtime.LlmpressLinear` with
buffers of the stored shapes *before* the weights load, so the packed tensors load as they
are, bit for bit.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from llmpress.errors import CheckpointError
from llmpress.format.checkpoint import (
    VERIFY_ENV,
    check_tensors,
    check_values,
    config_checksum,
    module_formats,
    read_headers,
    unreadable,
    validate_quantization_config,
    verify_checksums,
)
from llmpress.format.formats import FORMAT_VERSION, ModuleFormat
from llmpress.format.loading import check_shard_index
from llmpress.format.runtime import replace_module, select_kernels
from llmpress.format.transforms import attach_transforms
from llmpress.kernels.registry import KernelSource
from llmpress.model.results import CompressionState
from llmpress.versions import package_version

log = logging.getLogger(__name__)
QUANT_METHOD = "llmpress"
NOTE = "load with: pip install llmpress, then `import llmpress` before from_pretrained"


class LlmpressConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of an llmpress checkpoint (round-trips through JSON).

    ``modules``: qualified layer name -> :class:`ModuleFormat` dict; ``recipe``: the recipe
    that produced it; ``format_version``: layout version (a newer one is refused);
    ``checksums``/``config_checksum``: recorded at save time, verified at load; ``state``: a
    loaded model's :class:`CompressionState` (in memory only). The whole dict is validated against :class:`llmpress.format.checkpoint.QuantizationConfigSchema`.
    """

    def __init__(
        self,
        modules: dict[str, dict[str, Any]] | None = None,
        recipe: dict[str, Any] | None = None,
        format_version: int = FORMAT_VERSION,
        llmpress_version: str | None = None,
        **kwargs: Any,
    ) -> None:
        self.quant_method = QUANT_METHOD  # type: ignore[assignment]  # transformers types this as its enum
        self.format_version = format_version
        self.llmpress_version = llmpress_version or package_version("llmpress")
        self.modules = dict(modules or {}) if isinstance(modules, dict) or modules is None else modules
        self.recipe = recipe if recipe is not None else {}
        self.note = kwargs.pop("note", NOTE)
        self.checksums = kwargs.pop("checksums", None)
        self.checksum_algorithm = kwargs.pop("checksum_algorithm", None)
        self.config_checksum = kwargs.pop("config_checksum", None)
        self.kv_cache = kwargs.pop("kv_cache", None)
        self.attributes = kwargs.pop("attributes", None)
        self.experts = kwargs.pop("experts", None)
        self.transforms = kwargs.pop("transforms", None)
        kwargs.pop("quant_method", None)
        #: a loaded model's compression state (its KV-cache scales), kept here for a re-save round
        #: trip (:func:`llmpress.format.save.saved_state`); in memory only, never in ``to_dict``
        self.state: CompressionState | None = None
        self._unknown = kwargs  # refused by the schema in post_init
        self.post_init()

    def post_init(self) -> None:
        self.schema = validate_quantization_config({**self.to_dict(), **self._unknown})

    def module_formats(self) -> dict[str, ModuleFormat]:
        return module_formats(self.schema)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "quant_method": QUANT_METHOD,
            "format_version": self.format_version,
            "llmpress_version": self.llmpress_version,
            "note": self.note,
            "recipe": self.recipe,
            "modules": self.modules,
        }
        if self.kv_cache is not None:
            d["kv_cache"] = self.kv_cache
        if self.checksums is not None:
            d["checksums"] = self.checksums
        if self.checksum_algorithm is not None:
            d["checksum_algorithm"] = self.checksum_algorithm
        if self.config_checksum is not None:
            d["config_checksum"] = self.config_checksum
        if self.attributes is not None:
            d["attributes"] = self.attributes
        if self.experts is not None:
            d["experts"] = self.experts
        if self.transforms is not None:
            d["transforms"] = self.transforms
        return d


def verify_safetensors(path: str | Path) -> None:
    """Raise :class:`CheckpointError` naming ``path`` if it is truncated or its header is
    corrupt (``safe_open`` checks that the header's offsets cover the file exactly)."""
    p = Path(path)
    if p.suffix != ".safetensors":
        return
    try:
        with safe_open(str(p), framework="pt"):
            pass
    except (SafetensorError, OSError) as e:
        raise unreadable(p, e) from None


def _tied_names(model: Any) -> set[str]:
    """State-dict names a checkpoint may leave out because they are tied to another tensor."""
    out: set[str] = set()
    tied = getattr(model, "all_tied_weights_keys", None) or getattr(model, "_tied_weights_keys", None)
    if isinstance(tied, (dict, list, tuple, set)):
        out |= set(tied)
    return out


class LlmpressHfQuantizer(HfQuantizer):
    """Loads llmpress checkpoints (pre-quantized only).

    The modules it rebuilds compute in the dtype ``from_pretrained`` resolved (``dtype=``,
    ``"auto"`` or the default), which transformers passes to :meth:`update_dtype`.
    """

    requires_calibration = True
    #: the model's dtype for this load (set by transformers through update_dtype)
    compute_dtype: torch.dtype | None = None

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        return None

    def update_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """Record the dtype ``from_pretrained`` resolved; llmpress keeps it."""
        self.compute_dtype = dtype
        return dtype

    update_torch_dtype = update_dtype  # its name before transformers 5

    def _process_model_before_weight_loading(
        self, model: Any, checkpoint_files: list[str] | None = None, **kwargs: Any
    ) -> Any:
        cfg = self.quantization_config
        assert isinstance(cfg, LlmpressConfig)
        self._unfuse_experts(model, cfg.schema.experts or {})
        # the model is built under its dtype (transformers sets the default dtype meanwhile)
        dtype = self.compute_dtype or torch.get_default_dtype()
        log.debug("llmpress: rebuilding %d modules in %s", len(cfg.module_formats()), dtype)
        known = dict(model.named_modules())
        for name, fmt in cfg.module_formats().items():
            if name not in known:
                raise CheckpointError(
                    f"quantization_config names module {name!r}, which this {type(model).__name__} does not have; "
                    f"the checkpoint does not match its config.json"
                )
            old = known[name]
            w = getattr(old, "weight", None)
            if fmt.format != "dropped" and not fmt.resized:
                shape = tuple(w.shape) if isinstance(w, torch.Tensor) else None
                if shape not in ((fmt.out_features, fmt.in_features), (fmt.in_features, fmt.out_features)):
                    raise CheckpointError(
                        f"module {name!r} has weight shape {shape}, but the checkpoint stores "
                        f"{fmt.out_features}x{fmt.in_features}"
                    )
            dev = w.device if isinstance(w, torch.Tensor) else None
            bias = isinstance(getattr(old, "bias", None), torch.Tensor) if fmt.bias is None else fmt.bias
            replace_module(model, name, fmt.spec.runtime(fmt, bias, dev, dtype))
        for name, attrs in (cfg.schema.attributes or {}).items():  # head counts of pruned attention
            if name not in known:
                raise CheckpointError(
                    f"quantization_config.attributes names module {name!r}, which this model lacks"
                )
            for attr, value in attrs.items():
                setattr(known[name], attr, value)
        attach_transforms(model, cfg.schema.transforms or [])  # online rotations (QuaRot's R4)
        if checkpoint_files:
            self._check_files(model, [str(f) for f in checkpoint_files])
        return model

    @staticmethod
    def _unfuse_experts(model: Any, experts: dict[str, str]) -> None:
        """MoE experts stored unfused: replace those fused modules before the weights load."""
        from llmpress.model.moe_model import fused_experts, unfuse_model

        if not experts:
            return
        found = fused_experts(model)
        for name, layout in experts.items():
            if name not in found:
                raise CheckpointError(
                    f"quantization_config.experts names {name!r}, which is not a fused experts module of this "
                    f"{type(model).__name__}; the checkpoint does not match its config.json"
                )
            got = found[name]
            if got is None or got.name != layout:
                raise CheckpointError(
                    f"{name}: the checkpoint stores experts of layout {layout!r}, but this "
                    f"{type(model).__name__} builds {'an unknown layout' if got is None else repr(got.name)}; "
                    f"load it with the transformers version it was saved with"
                )
        unfuse_model(model, list(experts), allow_meta=True)

    def update_weight_conversions(self, weight_conversions: list[Any], model: Any) -> list[Any]:
        """Drop transformers' conversions into parameters the model no longer has (per-expert
        checkpoint names merged into fused experts tensors, for experts llmpress unfused)."""
        import re

        from transformers.core_model_loading import WeightConverter

        weight_conversions = super().update_weight_conversions(weight_conversions, model)
        cfg = self.quantization_config
        if not isinstance(cfg, LlmpressConfig) or not cfg.schema.experts:
            return weight_conversions
        params = "\n".join(n for n, _ in model.named_parameters())
        kept = []
        for conv in weight_conversions:
            targets = getattr(conv, "_original_target_patterns", None) or []
            if (
                isinstance(conv, WeightConverter)
                and any("experts" in t for t in targets)
                and not any(re.search(re.escape(t.lstrip(".")) + "$", params, re.MULTILINE) for t in targets)
            ):
                log.debug("llmpress: no %s in the model (unfused experts); conversion dropped", targets)
                continue
            kept.append(conv)
        return kept

    def _check_files(self, model: Any, files: list[str]) -> None:
        """Every tensor of ``files`` against the model just built, then the checksums."""
        cfg = self.quantization_config
        assert isinstance(cfg, LlmpressConfig)
        packed = {n for n, f in cfg.module_formats().items() if f.spec.packed}
        expected: dict[str, tuple[tuple[int, ...], torch.dtype | None]] = {}
        for k, t in model.state_dict().items():
            owner = k.rpartition(".")[0]
            exact = owner in packed and not k.endswith(".bias")
            expected[k] = (tuple(t.shape), t.dtype if exact else None)
        check_shard_index(Path(files[0]).parent)  # transformers refuses '..' and absolute, not links out
        found = read_headers(files)
        check_tensors(expected, found, optional=_tied_names(model))
        check_values(cfg.module_formats(), found)
        if cfg.checksums is not None:
            verify_checksums(files, cfg.checksums, found, cfg.schema.checksum_algorithm)
        saved_config = Path(files[0]).parent / "config.json"
        if cfg.config_checksum is not None and saved_config.is_file():
            try:
                raw = json.loads(saved_config.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{saved_config} is not valid JSON ({e})") from None
            if config_checksum(raw) != cfg.config_checksum and os.environ.get(VERIFY_ENV, "") != "0":
                raise CheckpointError(
                    f"{saved_config} was changed after llmpress saved it (its checksum differs); re-download "
                    f"the checkpoint, or set {VERIFY_ENV}=0 to load it anyway at your own risk"
                )

    def _process_model_after_weight_loading(self, model: Any, **kwargs: Any) -> Any:
        """Choose each packed layer's kernel once, now that its tensors are in place."""
        chosen = select_kernels(model, kernels=_kernels)
        if chosen:
            log.info("llmpress kernels: %s", ", ".join(sorted(set(chosen.values()))))
        qc = self.quantization_config
        if not isinstance(qc, LlmpressConfig):
            return model
        kv = qc.schema.kv_cache
        if kv is not None:
            from llmpress.format import kv_cache

            kv_cache.enable_state(model, kv.model_dump(exclude_none=True))
        transforms = qc.schema.transforms
        if kv is not None or transforms:
            # kept for a re-save (llmpress.format.save.saved_state): the config object is the model's
            qc.state = CompressionState(
                kv_cache=None if kv is None else kv.model_dump(exclude_none=True),
                transforms=[t.model_dump() for t in transforms] if transforms else None,
            )
        return model

    def is_serializable(self, safe_serialization: Any = None) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


#: where loaded layers find their kernels: injected by :func:`register` (``import llmpress``
#: passes the plugins' kernels); ``None``: the format layer's installed source
_kernels: KernelSource | None = None


def register(kernels: KernelSource | None = None) -> None:
    """Register the config and quantizer with transformers (idempotent); ``kernels``: the
    kernel source loaded models choose their kernels from."""
    from transformers.quantizers import auto

    global _kernels
    if kernels is not None:
        _kernels = kernels
    if QUANT_METHOD not in auto.AUTO_QUANTIZATION_CONFIG_MAPPING:
        auto.AUTO_QUANTIZATION_CONFIG_MAPPING[QUANT_METHOD] = LlmpressConfig
    if QUANT_METHOD not in auto.AUTO_QUANTIZER_MAPPING:
        auto.AUTO_QUANTIZER_MAPPING[QUANT_METHOD] = LlmpressHfQuantizer
