"""EoRA (Liu et al., 2024): training-free low-rank compensation of a compressed layer's error
in the eigenspace of its input activations.

With ``W`` the layer's weight before the run compressed it and ``W_hat`` the compressed weight
now in the model, the error ``dW = W - W_hat`` is projected on the eigenspace of the input
covariance ``X^T X / n = Q L Q^T`` (float64; eigenvalues below ``eig_cutoff`` times the largest
are dropped), ``dW Q L^1/2 = U S V^T`` is truncated to rank ``r``, and the layer computes
``W_hat x + B (A x)`` with ``B = U_r S_r`` [out, r] and ``A = V_r^T L^-1/2 Q^T`` [r, in]. This is
the rank-``r`` minimiser of the output error on the calibration inputs, ``||(dW - B A) X||_F``.
``basis: identity`` is the plain-SVD baseline (rank-``r`` SVD of ``dW``; the Frobenius minimiser
of the weight error), to measure what the eigenspace adds.

Written from the paper's math (the reference code is under a non-commercial licence). The stage
runs in the block pass after the compression stages (its statistic is ``X^T X`` of the inputs of
the *compressed* model); the original weights come from the run's record
(:attr:`llmpress.engine.record.RunRecord.originals`, kept when a stage sets
``needs_original_weights``). Layers resized by structured pruning are compensated for the
per-layer stages after the resize only (the record keeps the weight at a layer's first per-layer
commit; removed rows and columns have no place in the smaller layer).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Annotated, ClassVar, Literal

import torch
from pydantic import Field

from llmpress import hookimpl
from llmpress.engine.layer_stage import LayerUpdate
from llmpress.engine.stage import BlockStep, BlockwiseStage, BoundStage, StageExecutor
from llmpress.errors import ModelError, RecipeError
from llmpress.format.lowrank import attach_lowrank
from llmpress.model.modules import get_weight
from llmpress.model.results import LayerResult
from llmpress.recipe.config import MethodConfig, PositiveInt

log = logging.getLogger(__name__)


@torch.no_grad()
def eora_factors(
    delta: torch.Tensor, rank: int, xtx: torch.Tensor | None = None, eig_cutoff: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A [r, in], B [out, r])``, float32, with ``B A`` the best rank-``rank`` approximation of
    ``delta`` [out, in]: in the eigenspace of ``xtx`` (``X^T X``, any positive scale: the
    minimiser of ``||(delta - B A) X||_F``), or, without it, in the plain Frobenius norm (SVD).

    Computed in float64. Eigenvalues of ``xtx`` at or below ``eig_cutoff * max eigenvalue`` are
    dropped (directions the inputs do not reach; ``L^-1/2`` would blow them up). When fewer than
    ``rank`` directions are left, the factors are padded with zeros to ``rank``.
    """
    out_f, in_f = delta.shape
    d = delta.detach().to(torch.float64)
    if xtx is None:
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
        a, b = vh[:rank], u[:, :rank] * s[:rank]
    else:
        h = xtx.detach().to(device=d.device, dtype=torch.float64)
        lam, q = torch.linalg.eigh((h + h.t()) / 2)
        keep = lam > eig_cutoff * lam.max().clamp_min(0)
        lam, q = lam[keep], q[:, keep]  # [k], [in, k]
        root = lam.sqrt()
        u, s, vh = torch.linalg.svd((d @ q) * root, full_matrices=False)  # dW Q L^1/2
        a, b = (vh[:rank] / root) @ q.t(), u[:, :rank] * s[:rank]  # V_r^T L^-1/2 Q^T, U_r S_r
    if a.shape[0] < rank:  # fewer directions than the rank: the rest of the path is zero
        a = torch.cat([a, a.new_zeros(rank - a.shape[0], in_f)])
        b = torch.cat([b, b.new_zeros(out_f, rank - b.shape[1])], dim=1)
    return a.float(), b.float()


class EoraStage(BlockwiseStage):
    """Adds a low-rank path to every target layer that an earlier stage of the run compressed."""

    def check(self, model: torch.nn.Module, stages: list[BoundStage], ids: torch.Tensor | None) -> None:
        pos = next(i for i, s in enumerate(stages) if s is self.stage)
        before, after = stages[:pos], stages[pos + 1 :]
        if not any(issubclass(s.config.kind, LayerUpdate) for s in before):
            raise RecipeError(
                f"{self.stage.name}: eora compensates the error of a per-layer compression stage before it "
                f"(quantization or pruning), and there is none; put eora after e.g. a gptq or sparsegpt stage"
            )
        later = [s.name for s in after if issubclass(s.config.kind, LayerUpdate)]
        if later:
            raise RecipeError(
                f"{self.stage.name}: {', '.join(later)} would change the weights after eora computed their "
                f"compensation; put eora after the last compression stage"
            )

    def process_block(self, step: BlockStep) -> None:
        mods = step.targets(self.stage)
        cfg: EoraConfig = self.config  # type: ignore[assignment]
        stats = step.statistics(self.stage, mods) if cfg.basis == "activations" else {}
        for rel, mod in mods.items():
            name = f"{step.name}.{rel}"
            original = self.record.originals.get(name)
            if original is None:  # not compressed in this run: nothing to compensate
                continue
            w_hat = get_weight(mod).detach()
            if tuple(original.shape) != tuple(w_hat.shape):
                raise ModelError(
                    f"{self.stage.name}: {name} is {list(w_hat.shape)} now but was {list(original.shape)} "
                    f"when first compressed; eora cannot compensate a layer resized after that"
                )
            t0 = time.perf_counter()
            xtx = None
            if cfg.basis == "activations":
                st = stats.get(rel)
                if st is None or st.nsamples == 0:
                    raise ModelError(f"{self.stage.name}: {name} saw no calibration inputs")
                xtx = st.hessian / st.nsamples
            a, b = eora_factors(
                original.to(w_hat.device).float() - w_hat.float(), cfg.rank, xtx, cfg.eig_cutoff
            )
            info = {"eora_rank": float(cfg.rank), "eora_params": float(a.numel() + b.numel())}
            self.record.commit(name, mod, LayerResult(lowrank=(a, b), info=info), cfg.method)
            attach_lowrank(mod, a.to(w_hat.device), b.to(w_hat.device))
            self.record.modules[name].info["eora_time_s"] = round(time.perf_counter() - t0, 4)


@dataclasses.dataclass(frozen=True)
class EoraConfig(MethodConfig):
    """EoRA: ``rank`` of the low-rank path of each target layer; ``basis``: ``activations``
    (EoRA: the eigenspace of the layer's inputs) or ``identity`` (plain SVD of the error);
    ``eig_cutoff``: eigenvalues at or below this fraction of the largest are dropped."""

    method: ClassVar[str] = "eora"
    display_name: ClassVar[str] = "EoRA"
    kind: ClassVar[type[StageExecutor]] = EoraStage
    stats: ClassVar[frozenset[str]] = frozenset({"hessian"})
    needs_original_weights: ClassVar[bool] = True
    adds_lowrank: ClassVar[bool] = True
    citation: ClassVar[str] = """@article{liu2024eora,
      title   = {{EoRA}: Fine-tuning-free Compensation for Compressed {LLM} with Eigenspace Low-Rank Approximation},
      author  = {Liu, Shih-Yang and Khadkevich, Maksim and Fung, Nai Chit and Sakr, Charbel and Yang, Chao-Han Huck
                 and Wang, Chien-Yi and Muralidharan, Saurav and Yin, Hongxu and Cheng, Kwang-Ting and Kautz, Jan
                 and Wang, Yu-Chiang Frank and Molchanov, Pavlo and Chen, Min-Hung},
      journal = {arXiv preprint arXiv:2410.21271},
      year    = {2024}
    }"""
    rank: PositiveInt = 8
    basis: Literal["activations", "identity"] = "activations"
    eig_cutoff: Annotated[float, Field(ge=0, lt=1)] = 1e-6

    def statistics(self) -> frozenset[str]:
        return frozenset(type(self).stats) if self.basis == "activations" else frozenset()

    def calibrated(self) -> bool:
        return self.basis == "activations"

    def check_module(self, name: str, in_features: int, out_features: int) -> None:
        if self.rank > min(in_features, out_features):
            raise ModelError(
                f"method 'eora': rank {self.rank} exceeds min(in, out) = {min(in_features, out_features)} "
                f"of {name} [{out_features}x{in_features}]; use a rank of at most that, or leave the layer "
                f"out with 'ignore'"
            )

    def describe(self) -> str:
        how = "in the input activations' eigenspace" if self.basis == "activations" else "by plain SVD"
        return f"EoRA low-rank compensation of rank {self.rank} {how}"


@hookimpl
def llmpress_register_methods(register) -> None:  # noqa: ANN001
    register(EoraConfig)
