"""transformers integration: ``quant_method: "llmpress"`` in config.json.

:func:`register` (run on ``import llmpress``, idempotent) adds :class:`LlmpressConfig` and
:class:`LlmpressHfQuantizer` to transformers' quantizer tables. On ``from_pretrained`` the
quantizer swaps every packed layer for a :class:`llmpress.runtime.LlmpressLinear` with
buffers of the stored shapes *before* the weights load, so the packed tensors load as they
are, bit for bit.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from llmpress.errors import CheckpointError
from llmpress.formats import FORMAT_VERSION, ModuleFormat
from llmpress.runtime import replace_module, select_kernels
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
    """Raise :class:`CheckpointError` naming ``path`` if it is truncated or its header is
    corrupt (``safe_open`` checks that the header's offsets cover the file exactly)."""
    p = Path(path)
    if p.suffix != ".safetensors":
        return
    try:
        with safe_open(str(p), framework="pt"):
            pass
    except (SafetensorError, OSError) as e:
        if "incomplete metadata" in str(e) or "not fully covered" in str(e):
            raise CheckpointError(
                f"{p} is truncated or padded: its header does not describe the file's {p.stat().st_size} "
                f"bytes ({e}); re-download it"
            ) from None
        raise CheckpointError(
            f"{p} is not a valid safetensors file ({e}); re-download or re-save it"
        ) from None


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
            if fmt.format != "dropped" and not fmt.resized:
                shape = tuple(w.shape) if isinstance(w, torch.Tensor) else None
                if shape not in ((fmt.out_features, fmt.in_features), (fmt.in_features, fmt.out_features)):
                    raise CheckpointError(
                        f"module {name!r} has weight shape {shape}, but the checkpoint stores "
                        f"{fmt.out_features}x{fmt.in_features}"
                    )
            dev = w.device if isinstance(w, torch.Tensor) else None
            bias = isinstance(getattr(old, "bias", None), torch.Tensor)
            replace_module(model, name, fmt.spec.runtime(fmt, bias, dev))
        return model

    def _process_model_after_weight_loading(self, model: Any, **kwargs: Any) -> Any:
        """Choose each packed layer's kernel once, now that its tensors are in place."""
        chosen = select_kernels(model)
        if chosen:
            log.info("llmpress kernels: %s", ", ".join(sorted(set(chosen.values()))))
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
