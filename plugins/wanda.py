"""Wanda (Sun et al., 2023): prune by ``|W_ij| * ||X_j||_2``, compared within each output row."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from torch import nn

from llmpress import hookimpl
from llmpress.engine.stats import LayerStats
from llmpress.model.modules import get_weight
from llmpress.recipe.config import PruningConfig


@dataclasses.dataclass(frozen=True)
class WandaConfig(PruningConfig):
    """Wanda: no weight update; the comparison group is the output row (the paper's choice)."""

    method: ClassVar[str] = "wanda"
    display_name: ClassVar[str] = "Wanda"
    stats: ClassVar[frozenset[str]] = frozenset({"sq_norms"})
    citation: ClassVar[str] = """@inproceedings{sun2024simple,
      title     = {A Simple and Effective Pruning Approach for Large Language Models},
      author    = {Sun, Mingjie and Liu, Zhuang and Bair, Anna and Kolter, J. Zico},
      booktitle = {International Conference on Learning Representations},
      year      = {2024}
    }"""


def wanda_scores(weight: torch.Tensor, col_norms: torch.Tensor) -> torch.Tensor:
    """weight: [out, in], col_norms: [in] -> scores [out, in] = |W| * ||X_j||."""
    return weight.abs().float() * col_norms.float().unsqueeze(0)


@hookimpl
def llmpress_register_methods(register) -> None:  # noqa: ANN001
    register(WandaConfig)


@hookimpl
def llmpress_score_importance(module: nn.Module, stats: LayerStats, config: WandaConfig) -> torch.Tensor:
    w = get_weight(module).detach()
    return wanda_scores(w, stats.col_norms.to(w.device))
