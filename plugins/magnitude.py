"""Magnitude pruning: drop the weights of smallest ``|W|`` (no calibration data).

By default one threshold per layer, as in the Wanda authors' magnitude baseline;
``group: row`` prunes each output row to the same sparsity.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal

import torch
from torch import nn

from llmpress import hookimpl
from llmpress.engine.stats import LayerStats
from llmpress.math.targets import SparsityTarget
from llmpress.model.modules import get_weight
from llmpress.recipe.config import PruningConfig


@dataclasses.dataclass(frozen=True)
class MagnitudeConfig(PruningConfig):
    """``group``: ``"layer"`` (one threshold per layer) or ``"row"`` (per output row)."""

    method: ClassVar[str] = "magnitude"
    needs_calibration: ClassVar[bool] = False
    stats: ClassVar[frozenset[str]] = frozenset()
    citation: ClassVar[str] = """@inproceedings{han2015learning,
      title     = {Learning both Weights and Connections for Efficient Neural Networks},
      author    = {Han, Song and Pool, Jeff and Tran, John and Dally, William J.},
      booktitle = {Advances in Neural Information Processing Systems},
      year      = {2015}
    }"""
    group: Literal["layer", "row"] = "layer"

    def sparsity_target(self) -> SparsityTarget:
        return dataclasses.replace(super().sparsity_target(), group=self.group)


@hookimpl
def llmpress_register_methods(register) -> None:  # noqa: ANN001
    register(MagnitudeConfig)


@hookimpl
def llmpress_score_importance(
    module: nn.Module, stats: LayerStats | None, config: MagnitudeConfig
) -> torch.Tensor:
    return get_weight(module).detach().abs().float()  # [out, in]
