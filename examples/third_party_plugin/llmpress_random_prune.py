"""An example third-party llmpress plugin: the ``random`` pruning method.

It registers a method named ``random`` whose config has one option of its own, ``seed``,
and scores every weight with seeded uniform noise. llmpress's built-in ``masking`` plugin
then prunes the lowest scores (per output row, or ``N:M``) and zeroes them, exactly as for
magnitude or Wanda. Useful as a sanity baseline: any real method should beat it.

Recipe::

    stages:
      - method: random
        sparsity: 0.5
        seed: 1
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import ClassVar

import torch
from torch import nn

import llmpress
from llmpress.model.modules import get_weight
from llmpress.recipe.config import NonNegativeInt, PruningConfig


@dataclasses.dataclass(frozen=True)
class RandomPruneConfig(PruningConfig):
    """Random pruning. ``seed``: seed of the scores (the same seed gives the same masks)."""

    method: ClassVar[str] = "random"
    needs_calibration: ClassVar[bool] = False  # no calibration data, so no statistics
    seed: NonNegativeInt = 0  # the type is checked (by pydantic) when the config is built


@llmpress.hookimpl
def llmpress_register_methods(register) -> None:  # noqa: ANN001
    register(RandomPruneConfig)


@llmpress.hookimpl
def llmpress_score_importance(module: nn.Module, stats: object, config: RandomPruneConfig) -> torch.Tensor:
    # dispatch is by config type: this hook only ever sees RandomPruneConfig
    w = get_weight(module)  # [out, in]
    # mix the layer shape into the seed so layers of different shapes get unrelated scores
    g = torch.Generator().manual_seed(config.seed * 1_000_003 + zlib.crc32(str(tuple(w.shape)).encode()))
    return torch.rand(tuple(w.shape), generator=g).to(w.device)  # [out, in]
