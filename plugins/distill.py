"""Recovery by distillation (``method: distill``): fine-tuning after compression that keeps
the masks, shapes and quantization grids exactly (:mod:`llmpress.train`)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from llmpress import hookimpl
from llmpress.engine.stage import StageExecutor
from llmpress.train.config import RecoveryConfig
from llmpress.train.stage import Distill


@dataclasses.dataclass(frozen=True)
class DistillConfig(RecoveryConfig):
    """Distillation fine-tuning; presets ``sparse-finetune`` (CE 1 + SquareHead 1, Kurtic et
    al.) and ``minitron`` (KL 1, Muralidharan et al.). See :class:`RecoveryConfig` for options."""

    method: ClassVar[str] = "distill"
    kind: ClassVar[type[StageExecutor]] = Distill
    needs_teacher: ClassVar[bool] = True
    needs_calibration: ClassVar[bool] = True
    stats: ClassVar[frozenset[str]] = frozenset()
    citation: ClassVar[str] = """@article{kurtic2023sparse,
      title   = {Sparse Fine-tuning for Inference Acceleration of Large Language Models},
      author  = {Kurtic, Eldar and Kuznedelev, Denis and Frantar, Elias and Goin, Michael and Alistarh, Dan},
      journal = {arXiv preprint arXiv:2310.06927},
      year    = {2023}
    }
    @article{muralidharan2024minitron,
      title   = {Compact Language Models via Pruning and Knowledge Distillation},
      author  = {Muralidharan, Saurav and Sreenivas, Sharath Turuvekere and Joshi, Raviraj and
                 Chochowski, Marcin and Patwary, Mostofa and Shoeybi, Mohammad and Catanzaro, Bryan
                 and Kautz, Jan and Molchanov, Pavlo},
      journal = {arXiv preprint arXiv:2407.14679},
      year    = {2024}
    }"""


@hookimpl
def llmpress_register_methods(register) -> None:  # noqa: ANN001
    register(DistillConfig)
