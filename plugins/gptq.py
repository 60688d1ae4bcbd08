"""GPTQ (Frantar et al., 2023): quantize columns one by one, spreading each rounding error
over the not-yet-quantized columns with the inverse-Hessian Cholesky factor (OBS).

Options: ``act_order`` (process columns by decreasing Hessian diagonal; groups stay
*static*, i.e. defined on the original column order and fixed before the sweep, so no
reordering is needed at run time), ``true_sequential`` (quantize q/k/v, then o, then
gate/up, then down, each seeing the already-quantized layers' outputs), ``blocksize``,
``percdamp``. A weight pruned by an earlier stage keeps the zero point's code: exactly 0.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from torch import nn

from llmpress import hookimpl
from llmpress.engine.stats import LayerStats
from llmpress.kernels.gptq_sweep import act_order_perm, gptq_quantize
from llmpress.math.linalg import cached_inverse_cholesky
from llmpress.model.modules import get_weight
from llmpress.model.results import LayerResult
from llmpress.recipe.config import OBSConfig, QuantConfig

__all__ = ["GPTQConfig", "act_order_perm", "gptq_quantize"]


@dataclasses.dataclass(frozen=True)
class GPTQConfig(OBSConfig, QuantConfig):
    """GPTQ: quantization grid options plus the OBS sweep's."""

    method: ClassVar[str] = "gptq"
    display_name: ClassVar[str] = "GPTQ"
    citation: ClassVar[str] = """@inproceedings{frantar2023gptq,
      title     = {{GPTQ}: Accurate Post-Training Quantization for Generative Pre-trained Transformers},
      author    = {Frantar, Elias and Ashkboos, Saleh and Hoefler, Torsten and Alistarh, Dan},
      booktitle = {International Conference on Learning Representations},
      year      = {2023}
    }"""
    act_order: bool = False
    true_sequential: bool = False

    def sequential(self) -> bool:
        return bool(self.true_sequential)


@hookimpl
def llmpress_register_methods(register) -> None:  # noqa: ANN001
    register(GPTQConfig)


@hookimpl
def llmpress_update_weights(
    module: nn.Module, mask: torch.Tensor | None, stats: LayerStats, config: GPTQConfig
) -> LayerResult:
    w = get_weight(module).detach()
    perm = act_order_perm(stats).to(w.device) if config.act_order else None
    U = cached_inverse_cholesky(stats, float(config.percdamp), perm)
    keep = None if mask is None else mask.to(w.device)
    new, state, loss = gptq_quantize(w, U, config, perm, keep, int(config.blocksize))
    return LayerResult(weight=new.to(w.dtype), mask=mask, quant=state, loss=loss)
