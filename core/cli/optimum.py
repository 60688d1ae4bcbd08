"""An ``optimum`` quantizer front end for people used to optimum's API.

from llmpress.cli.optimum import LlmpressQuantizer
q = LlmpressQuantizer.from_pretrained("model-id-or-dir")            # or a loaded model
q.quantize("out_dir", recipe={"stages": [{"method": "gptq", "bits": 4}]},
           calibration="calib.txt", nsamples=128, seqlen=2048)
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from llmpress.model.report import CompressionResult

from optimum.quantization_base import OptimumQuantizer

from llmpress.format.loading import load_model


class LlmpressQuantizer(OptimumQuantizer):
    """Wraps :func:`llmpress.compress` and the llmpress save formats."""

    def __init__(self, model: Any, tokenizer: Any = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        #: the last :meth:`quantize` run's result (report and per-layer state)
        self.result: CompressionResult | None = None

    @classmethod
    def from_pretrained(
        cls, model_or_path: str | Path | Any, file_name: str | None = None, **load_kwargs: Any
    ) -> LlmpressQuantizer:
        """From a Hub id, a local folder or an already loaded model (``file_name`` is unused)."""
        if isinstance(model_or_path, (str, Path)):
            model, tok = load_model(model_or_path, **load_kwargs)
            return cls(model, tok)
        return cls(model_or_path, load_kwargs.get("tokenizer"))

    def quantize(self, save_dir: str | Path, file_prefix: str | None = None, **kwargs: Any) -> Path:
        """Compress with ``recipe=`` (required) and ``calibration=`` (when the methods need
        data), then save to ``save_dir``. Other keywords go to :func:`llmpress.compress`, plus
        ``format`` ("llmpress" or "compressed-tensors"), ``sparse_format`` and ``overwrite``."""
        from llmpress.format.save import save_result
        from llmpress.pipeline.compress import compress

        recipe = kwargs.pop("recipe", None)
        if recipe is None:
            raise ValueError("quantize() needs recipe=, e.g. {'stages': [{'method': 'gptq', 'bits': 4}]}")
        calibration = kwargs.pop("calibration", None)
        save_kw: dict[str, Any] = {
            k: kwargs.pop(k) for k in ("format", "sparse_format", "overwrite", "dtype") if k in kwargs
        }
        if "format" in save_kw:
            save_kw["fmt"] = save_kw.pop("format")
        kwargs.setdefault("tokenizer", self.tokenizer)
        self.model, self.result = compress(self.model, recipe, calibration, **kwargs)
        return save_result(self.model, save_dir, report=self.result, tokenizer=self.tokenizer, **save_kw)
