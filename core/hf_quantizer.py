"""transformers integration: ``quant_method: "llmpress"`` in config.json.

:func:`register` (run on ``import llmpress``, idempotent) adds :class:`LlmpressConfig` and
:class:`LlmpressHfQuantizer` to transformers' quantizer tables. On ``from_pretrained`` the
quantizer swaps every packed layer for a :class:`llmpress.runtime.LlmpressLinear` with
buffers of the stored shapes *before* the weights load, so the packed tensors load as they
are, bit for bit.
"""

from __future__ import annotations

import logging
import struct
from pathlib import Path
from typing import Any

from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from llmpress.errors import CheckpointError
from llmpress.formats import FORMAT_VERSION, ModuleFormat
from llmpress.runtime import LlmpressLinear, replace_module
from llmpress.versions import package_version

log = logging.getLogger(__name__)
QUANT_METHOD = "llmpress"


class LlmpressConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of an llmpress checkpoint (round-trips through JSON).

    ``modules``: qualified layer name -> :class:`ModuleFormat` dict; ``recipe``: the recipe
    that produced it; ``format_version``: layout version (a newer one is refused).
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
        self.format_version = int(format_version)
        self.llmpress_version = llmpress_version or package_version("llmpress")
        self.modules = dict(modules or {})
        self.recipe = recipe or {}
        self.note = kwargs.pop(
            "note", "load with: pip install llmpress, then `import llmpress` before from_pretrained"
        )
        self.post_init()

    def post_init(self) -> None:
        if self.format_version > FORMAT_VERSION:
            raise CheckpointError(
                f"this checkpoint uses llmpress format version {self.format_version}, newer than this "
                f"llmpress ({package_version('llmpress')}) reads ({FORMAT_VERSION}); upgrade llmpress"
            )
        for name, spec in self.modules.items():
            ModuleFormat.from_dict(spec, name)  # validates every entry

    def module_formats(self) -> dict[str, ModuleFormat]:
        return {n: ModuleFormat.from_dict(s, n) for n, s in self.modules.items()}

    def to_dict(self) -> dict[str, Any]:
        return {
            "quant_method": QUANT_METHOD,
            "format_version": self.format_version,
            "llmpress_version": self.llmpress_version,
            "note": self.note,
            "recipe": self.recipe,
            "modules": self.modules,
        }


def verify_safetensors(path: str | Path) -> None:
    """Raise :class:`CheckpointError` naming ``path`` if it is truncated or its header is corrupt."""
    p = Path(path)
    if p.suffix != ".safetensors":
        return
    size = p.stat().st_size
    try:
        with p.open("rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise ValueError(f"header length {n} exceeds the file")
            import json

            header = json.loads(f.read(n))
    except (struct.error, ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(
            f"{p} is not a valid safetensors file ({e}); re-download or re-save it"
        ) from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise CheckpointError(
            f"{p} is truncated: its header describes {8 + n + end} bytes but the file has {size}; re-download it"
        )


class LlmpressHfQuantizer(HfQuantizer):
    """Loads llmpress checkpoints (pre-quantized only)."""

    requires_calibration = True

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        return None

    def _process_model_before_weight_loading(
        self, model: Any, checkpoint_files: list[str] | None = None, **kwargs: Any
    ) -> Any:
        for f in checkpoint_files or []:
            verify_safetensors(f)
        cfg = self.quantization_config
        assert isinstance(cfg, LlmpressConfig)
        known = dict(model.named_modules())
        for name, fmt in cfg.module_formats().items():
            if name not in known:
                raise CheckpointError(
                    f"quantization_config names module {name!r}, which this {type(model).__name__} does not have; "
                    f"the checkpoint does not match its config.json"
                )
            old = known[name]
            w = getattr(old, "weight", None)
            shape = tuple(w.shape) if w is not None else None
            if shape not in ((fmt.out_features, fmt.in_features), (fmt.in_features, fmt.out_features)):
                raise CheckpointError(
                    f"module {name!r} has weight shape {shape}, but the checkpoint stores {fmt.out_features}x{fmt.in_features}"
                )
            dev = w.device if w is not None else None
            replace_module(
                model, name, LlmpressLinear(fmt, bias=getattr(old, "bias", None) is not None, device=dev)
            )
        return model

    def _process_model_after_weight_loading(self, model: Any, **kwargs: Any) -> Any:
        return model

    def is_serializable(self, safe_serialization: Any = None) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def register() -> None:
    """Register the config and quantizer with transformers (idempotent)."""
    from transformers.quantizers import auto

    if QUANT_METHOD not in auto.AUTO_QUANTIZATION_CONFIG_MAPPING:
        auto.AUTO_QUANTIZATION_CONFIG_MAPPING[QUANT_METHOD] = LlmpressConfig
    if QUANT_METHOD not in auto.AUTO_QUANTIZER_MAPPING:
        auto.AUTO_QUANTIZER_MAPPING[QUANT_METHOD] = LlmpressHfQuantizer
