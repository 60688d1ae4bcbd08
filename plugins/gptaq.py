"""GPTAQ (Li et al., ICML 2025): GPTQ fitted to the dense model's output.

GPTQ minimises ``||W X~ - Q X~||`` on the inputs ``X~`` of the model quantized so far, so the
error the earlier layers made is never corrected. GPTAQ minimises ``||W X - Q X~||`` against
the dense model's inputs ``X`` (asymmetric calibration). The sweep is GPTQ's with one extra
term: with ``dXX^T = (X - X~)^T X~`` over tokens, ``U`` the upper Cholesky factor of the
damped ``(X~^T X~)^-1`` and ``P = alpha * triu(dXX^T U^T, 1) U``, quantizing column ``i``
updates ``W[:, i:] -= err * U[i, i:] - w * P[i, i:]``. ``alpha`` (0.25, the reference's)
scales the correction; 0 is GPTQ.

The engine provides ``dXX^T`` (statistic ``dense_cross``: a second stream of block inputs
through the dense blocks; the cost is in :mod:`llmpress.engine.stats`). ``H`` and ``dXX^T``
are both sums over the same tokens (one implementation averaged ``dXX^T`` over samples and
``H`` over tokens, which scales ``P`` by the sequence length). Act-order and static groups
work as in GPTQ; dead inputs zero their ``dXX^T`` columns; q/k/v share one ``H``, one
``dXX^T`` and one ``P``. Reference: the GPTAQ repository's ``fake_quant/gptaq_utils.py``.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from torch import nn

from llmpress import hookimpl
from llmpress.engine.stats import LayerStats
from llmpress.errors import RecipeError
from llmpress.kernels.gptq_sweep import act_order_perm, gptq_quantize
from llmpress.math.linalg import cached_asymmetric_correction, cached_inverse_cholesky
from llmpress.model.modules import get_weight
from llmpress.model.results import LayerResult
from llmpress.recipe.config import OBSConfig, QuantConfig

CITATION = """@inproceedings{li2025gptaq,
      title     = {{GPTAQ}: Efficient Finetuning-Free Quantization for Asymmetric Calibration},
      author    = {Li, Yuhang and Yin, Ruokai and Lee, Donghyun and Xiao, Shiting and Panda, Priyadarshini},
      booktitle = {International Conference on Machine Learning},
      year      = {2025}
    }"""


def check_alpha(method: str, alpha: float) -> None:
    """Raise :class:`RecipeError` unless ``0 <= alpha <= 1``."""
    if not 0.0 <= float(alpha) <= 1.0:  # also refuses NaN
        raise RecipeError(
            f"method {method!r}: alpha {alpha} is outside [0, 1]; it scales GPTAQ's correction "
            "toward the dense model's output (0.25 as in the paper; 0 gives plain GPTQ)"
        )


@dataclasses.dataclass(frozen=True)
class GPTAQConfig(OBSConfig, QuantConfig):
    """GPTAQ: GPTQ's options plus ``alpha``, the weight of the asymmetric correction."""

    method: ClassVar[str] = "gptaq"
    citation: ClassVar[str] = CITATION
    stats: ClassVar[frozenset[str]] = frozenset({"hessian", "dense_cross"})
    act_order: bool = False
    true_sequential: bool = False
    alpha: float = 0.25

    def validate(self) -> None:
        super().validate()
        check_alpha(self.method, self.alpha)

    def sequential(self) -> bool:
        return bool(self.true_sequential)


@hookimpl
def llmpress_register_methods(register) -> None:  # noqa: ANN001
    register(GPTAQConfig)


@hookimpl
def llmpress_update_weights(
    module: nn.Module, mask: torch.Tensor | None, stats: LayerStats, config: GPTAQConfig
) -> LayerResult:
    w = get_weight(module).detach()
    perm = act_order_perm(stats).to(w.device) if config.act_order else None
    percdamp = float(config.percdamp)
    P = cached_asymmetric_correction(stats, percdamp, float(config.alpha), perm)
    U = cached_inverse_cholesky(stats, percdamp, perm)
    keep = None if mask is None else mask.to(w.device)
    new, state, loss = gptq_quantize(w, U, config, perm, keep, int(config.blocksize), use_triton=False, P=P)
    return LayerResult(weight=new.to(w.dtype), mask=mask, quant=state, loss=loss)
