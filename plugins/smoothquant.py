"""SmoothQuant (``method: smoothquant``): migrate activation outliers into the weights before
INT8 W8A8 quantization, through the core's function-preserving ``ScaleChannels`` change."""

from __future__ import annotations

import dataclasses
import logging
from typing import Annotated, ClassVar

from pydantic import Field

from llmpress import hookimpl
from llmpress.errors import ModelError
from llmpress.model.modules import get_weight
from llmpress.quant.smoothing import smooth_scales, smoothing_pairs
from llmpress.structure.block_stage import BlockMethodConfig
from llmpress.structure.blocks import BlockContext, ScaleChannels

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SmoothQuantConfig(BlockMethodConfig):
    """``alpha`` in [0, 1]: the share of the activations' range moved into the weights."""

    method: ClassVar[str] = "smoothquant"
    display_name: ClassVar[str] = "SmoothQuant"
    stats: ClassVar[frozenset[str]] = frozenset({"absmax"})
    citation: ClassVar[str] = """@inproceedings{xiao2023smoothquant,
      title     = {{SmoothQuant}: Accurate and Efficient Post-Training Quantization for Large Language Models},
      author    = {Xiao, Guangxuan and Lin, Ji and Seznec, Mickael and Wu, Hao and Demouth, Julien and Han, Song},
      booktitle = {International Conference on Machine Learning},
      year      = {2023}
    }"""

    alpha: Annotated[float, Field(ge=0, le=1)] = 0.5

    def describe(self) -> str:
        return f"SmoothQuant (alpha {self.alpha}): activation outliers moved into the weights, the model's function unchanged"


@hookimpl
def llmpress_register_methods(register) -> None:  # noqa: ANN001
    register(SmoothQuantConfig)


@hookimpl
def llmpress_change_block(block: BlockContext, config: SmoothQuantConfig) -> list[ScaleChannels]:
    pairs = smoothing_pairs(block.module, set(block.stats))
    if not pairs:
        raise ModelError(
            f"{block.name}: smoothquant found no norm/linear feeding the target layers "
            f"(known layouts: Llama, Qwen2/3, Mistral, OPT); restrict 'targets' or use another method"
        )
    changes = []
    for src, consumers in pairs:
        weights = [get_weight(block.linear(c)) for c in consumers]
        s = smooth_scales(block.stats[consumers[0]].absmax, weights, float(config.alpha))
        changes.append(ScaleChannels(src, consumers, s))
        log.debug("%s.%s: smoothing %s, max s %.3g", block.name, src, consumers, float(s.max()))
    return changes
