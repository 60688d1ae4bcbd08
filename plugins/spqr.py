"""SpQR (Dettmers et al., 2023): GPTQ's OBS sweep with tiny groups, quantized statistics and
unstructured fp16 outliers.

Options: ``bits`` (codes, default 3), ``group_size`` (β1, default 16: inputs sharing a scale
and zero), ``stat_bits`` (default 3; ``null``: plain 16-bit statistics) and
``stat_group_size`` (β2, default 16: output rows sharing one fp16 second-level scale and
minimum), ``outlier_threshold`` (τ, default 0.2: a weight whose OBS error ``((w - q) /
U_jj)^2`` exceeds τ times the layer's mean ``var(W_j) / U_jj^2`` is kept in fp16 as a sparse
residual; ``.inf``: no outliers), ``act_order`` (static groups, as GPTQ's), ``blocksize``,
``percdamp``. Groups are fitted without the likely outliers (leave-one-out error reduction
above the threshold), then the sweep quantizes each column, keeps its outliers and spreads
the rest of the error over later columns (:func:`llmpress.math.obs.obs_sweep`).
Storage and the average-bits arithmetic: :mod:`llmpress.quant.spqr`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Annotated, Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from llmpress import hookimpl
from llmpress.engine.stats import LayerStats
from llmpress.errors import LlmpressError, ModelError, RecipeError
from llmpress.format.runtime import LlmpressLinear
from llmpress.format.spqr_format import spqr_parts
from llmpress.kernels import cpu_int, triton_int
from llmpress.kernels.registry import Kernel, KernelRegistrar
from llmpress.math.linalg import cached_inverse_cholesky
from llmpress.math.obs import obs_sweep
from llmpress.model.modules import get_weight
from llmpress.model.results import LayerResult, QuantState
from llmpress.quant.grid import IntCodes, QuantSpec, compute_qparams
from llmpress.quant.spqr import CsrOutliers, SpqrExtra, StatCodes, decode_weight, quantize_stat, spqr_bits
from llmpress.recipe.config import BitWidth, OBSConfig, PositiveInt

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SpQRConfig(OBSConfig):
    """SpQR: small groups, quantized statistics, sparse fp16 outliers."""

    method: ClassVar[str] = "spqr"
    quantizes: ClassVar[bool] = True
    citation: ClassVar[str] = """@inproceedings{dettmers2024spqr,
      title     = {{SpQR}: A Sparse-Quantized Representation for Near-Lossless {LLM} Weight Compression},
      author    = {Dettmers, Tim and Svirschevski, Ruslan and Egiazarian, Vage and Kuznedelev, Denis and
                   Frantar, Elias and Ashkboos, Saleh and Borzunov, Alexander and Hoefler, Torsten and
                   Alistarh, Dan},
      booktitle = {International Conference on Learning Representations},
      year      = {2024}
    }"""
    bits: BitWidth = 3
    group_size: PositiveInt = 16
    stat_bits: BitWidth | None = 3
    stat_group_size: PositiveInt = 16
    outlier_threshold: Annotated[float, Field(allow_inf_nan=True)] = 0.2
    act_order: bool = True
    true_sequential: bool = False

    def validate(self) -> None:
        super().validate()
        tau = float(self.outlier_threshold)
        if not tau > 0:  # NaN too
            raise RecipeError(
                f"method 'spqr': outlier_threshold must be in (0, inf], got {self.outlier_threshold!r}; "
                f"use e.g. 0.2, or .inf for no outliers"
            )

    def sequential(self) -> bool:
        return bool(self.true_sequential)

    def check_module(self, name: str, in_features: int, out_features: int) -> None:
        if in_features % self.group_size:
            raise ModelError(
                f"module {name!r}: group_size (β1) {self.group_size} does not divide in_features "
                f"{in_features}; pick a divisor such as 16, or exclude the module with 'ignore'"
            )
        if out_features % self.stat_group_size:
            raise ModelError(
                f"module {name!r}: stat_group_size (β2) {self.stat_group_size} does not divide "
                f"out_features {out_features}; pick a divisor such as 16, or exclude the module with 'ignore'"
            )

    def options(self) -> SpqrOptions:
        return SpqrOptions(
            self.bits, self.group_size, self.stat_bits, self.stat_group_size, float(self.outlier_threshold)
        )


@dataclasses.dataclass(frozen=True)
class SpqrOptions:
    """The sweep's settings. ``stat_dtype``: how plain statistics are rounded (float16, as
    stored; float32 reproduces GPTQ's in-memory grid exactly)."""

    bits: int = 3
    group_size: int = 16
    stat_bits: int | None = 3
    stat_group: int = 16
    tau: float = 0.2
    stat_dtype: torch.dtype = torch.float16


@dataclasses.dataclass
class SpqrLayer:
    """What the sweep returns: the decoded weight [out, in] and its quantization state."""

    weight: torch.Tensor
    quant: QuantState
    loss: float


def _grid(w: torch.Tensor, bits: int, round_zero: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Min/max grid of each row of ``w`` [rows, cols] (0 inside the range, as GPTQ's):
    (scale [rows], zero [rows]); the zero is left real-valued unless ``round_zero``."""
    scale, zero = compute_qparams(w, QuantSpec(bits=bits, group_size=-1))
    if not round_zero:
        xmin = torch.clamp(w.min(dim=1).values, max=0.0)
        xmin = torch.where((xmin == 0) & (w.max(dim=1).values <= 0), -1.0, xmin)  # dead rows, as GPTQ's
        zero = (-xmin / scale[:, 0]).unsqueeze(1)
    return scale[:, 0], zero[:, 0]


def _dq(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    return scale * (torch.clamp(torch.round(w / scale + zero), 0, maxq) - zero)


def likely_outliers(gw: torch.Tensor, d: torch.Tensor, threshold: float, bits: int) -> torch.Tensor:
    """Bool [out, gs]: weights of the group ``gw`` [out, gs] whose leave-one-out removal cuts
    the row's OBS error ``sum(((w - q) / d)^2)`` by more than ``threshold``."""
    out_f, gs = gw.shape
    maxq = (1 << bits) - 1
    idx = torch.arange(gs, device=gw.device)
    loo = idx[1:] - (idx[:, None] >= idx[1:]).long()  # [gs, gs-1]: every column but one
    data = gw[:, loo].reshape(out_f * gs, gs - 1)  # [out*gs, gs-1]
    s, z = _grid(data, bits, False)
    err = ((_dq(data, s[:, None], z[:, None], maxq) - data) / d[loo].repeat(out_f, 1)).square().sum(1)
    s0, z0 = _grid(gw, bits, False)
    base = ((_dq(gw, s0[:, None], z0[:, None], maxq) - gw) / d).square().sum(1, keepdim=True)  # [out, 1]
    return (base - err.view(out_f, gs)) > threshold


class _Sweep:
    """The state of one layer's sweep (transposed: one row per input column)."""

    def __init__(self, W: torch.Tensor, U: torch.Tensor, opts: SpqrOptions, perm: torch.Tensor | None):
        self.o, out_f, in_f = opts, W.shape[0], W.shape[1]
        self.gs, self.maxq = opts.group_size, (1 << opts.bits) - 1
        order = perm if perm is not None else torch.arange(in_f, device=W.device)
        self.order, self.lazy = order.tolist(), perm is None
        self.WT = W.t()[order].contiguous()  # [in, out], processing order
        self.d = torch.diagonal(U).clone()  # [in], processing order
        outlier_scale = float((self.WT.var(dim=1) / self.d.square()).mean())
        self.threshold = opts.tau * outlier_scale if math.isfinite(opts.tau) else math.inf
        n_groups = in_f // self.gs
        self.scalesT = torch.zeros(n_groups, out_f, device=W.device)
        self.zerosT = torch.zeros(n_groups, out_f, device=W.device)
        self.stats: list[list[StatCodes | None]] = [[None] * n_groups, [None] * n_groups]
        self.codesT = torch.empty(in_f, out_f, dtype=torch.uint8, device=W.device)  # original order
        self.outT = torch.zeros(in_f, out_f, dtype=torch.bool, device=W.device)
        self.resT = torch.zeros(in_f, out_f, dtype=torch.float16, device=W.device)
        self.buf = torch.empty(out_f, device=W.device)
        if not self.lazy:  # static groups (act-order): fitted on the original weights
            d_orig = torch.empty_like(self.d)
            d_orig[order] = self.d
            Wf = W.float()
            for g in range(n_groups):
                cols = slice(g * self.gs, (g + 1) * self.gs)
                self.fit(g, Wf[:, cols], d_orig[cols])

    def fit(self, g: int, gw: torch.Tensor, d: torch.Tensor) -> None:
        """Fit group ``g``'s grid on its weights ``gw`` [out, gs] (likely outliers replaced by
        the row's mean of the others), then quantize the statistics."""
        o = self.o
        if math.isfinite(self.threshold):
            likely = likely_outliers(gw, d, self.threshold, o.bits)
            keep = (~likely).float()
            mean = (gw * keep).sum(1, keepdim=True) / keep.sum(1, keepdim=True).clamp_min(1)
            gw = torch.where(likely, mean, gw)
        s, z = _grid(gw, o.bits, round_zero=o.stat_bits is None)
        if o.stat_bits is None:
            s = s.to(o.stat_dtype).float().clamp_min(float(torch.finfo(o.stat_dtype).tiny))
        else:
            sq = quantize_stat(s[:, None], o.stat_bits, o.stat_group, positive=True)
            zq = quantize_stat(z[:, None], o.stat_bits, o.stat_group)
            self.stats[0][g], self.stats[1][g] = sq, zq
            s, z = sq.decode()[:, 0], zq.decode()[:, 0]
        self.scalesT[g], self.zerosT[g] = s, z

    def step(self, j: int, i: int, w: torch.Tensor, d_i: torch.Tensor, err: torch.Tensor) -> None:
        col = self.order[j]
        g = col // self.gs
        if self.lazy and col % self.gs == 0:  # the group starting here, with its updated weights
            self.fit(g, self.WT[j : j + self.gs].t(), self.d[j : j + self.gs])
        s, z, buf = self.scalesT[g], self.zerosT[g], self.buf
        torch.div(w, s, out=buf)
        if self.o.stat_bits is None:  # integer zero points: GPTQ's order of operations
            buf.round_().add_(z)
        else:  # real-valued zero points
            buf.add_(z).round_()
        buf.clamp_(0.0, float(self.maxq))  # codes as float
        self.codesT[col].copy_(buf)
        buf.sub_(z)
        torch.addcmul(w, s, buf, value=-1.0, out=err)  # w - q
        if math.isfinite(self.threshold):
            out = (err / d_i).square_() > self.threshold
            res = torch.where(out, err, 0.0).half()  # the outliers' residual, as stored
            self.outT[col], self.resT[col] = out, res
            err.sub_(res.float())  # outliers: (almost) no error left to spread
        err.div_(d_i)

    def result(self, loss: float) -> SpqrLayer:
        o = self.o
        codes = self.codesT.t().contiguous()  # [out, in]
        scales, zeros = self.scalesT.t().contiguous(), self.zerosT.t().contiguous()  # [out, G]
        mask = self.outT.t()
        outliers = CsrOutliers.from_dense(self.resT.t(), mask) if bool(mask.any()) else None
        stat_q = [None if o.stat_bits is None else _stack(s) for s in self.stats]
        extra = SpqrExtra(o.stat_bits, o.stat_group, stat_q[0], stat_q[1], outliers)
        quant = QuantState(codes, scales, zeros, o.bits, o.group_size, False, "spqr", "spqr", spqr=extra)
        return SpqrLayer(decode_weight(codes, scales, zeros, outliers), quant, loss)


def _stack(parts: list[StatCodes | None]) -> StatCodes:
    """Per-group statistics ([out, 1] each) side by side: [out, G]."""
    ps = [p for p in parts if p is not None]
    return StatCodes(*(torch.cat([getattr(p, f) for p in ps], dim=1) for f in ("codes", "scale", "low")))


@torch.no_grad()
def spqr_quantize(
    weight: torch.Tensor,
    U: torch.Tensor,
    opts: SpqrOptions,
    perm: torch.Tensor | None = None,
    blocksize: int = 128,
) -> SpqrLayer:
    """Quantize ``weight`` [out, in] with SpQR; ``U`` is the inverse-Hessian Cholesky factor in
    the processing order ``perm`` (``None``: natural order, groups fitted lazily as in GPTQ;
    else static groups fitted up front). The returned weight is what the stored layer decodes
    to, bit for bit."""
    sweep = _Sweep(weight.float(), U, opts, perm)
    loss = obs_sweep(sweep.WT, U, sweep.step, blocksize)
    return sweep.result(loss)


def layer_info(layer: SpqrLayer) -> dict[str, float]:
    """The report's numbers of one layer: average stored bits by part and outliers."""
    q = layer.quant
    assert q.spqr is not None
    out_f, in_f = q.codes.shape
    budget = spqr_bits(out_f, in_f, q.bits, q.group_size, q.spqr.stat_bits, q.spqr.stat_group, q.spqr.nnz)
    return {
        **budget.as_info(),
        "outliers": float(q.spqr.nnz),
        "outlier_fraction": q.spqr.nnz / (out_f * in_f),
    }


@hookimpl
def llmpress_register_methods(register) -> None:  # noqa: ANN001
    register(SpQRConfig)


@hookimpl
def llmpress_update_weights(
    module: nn.Module, mask: torch.Tensor | None, stats: LayerStats, config: SpQRConfig
) -> LayerResult:
    if mask is not None:
        raise LlmpressError(
            "method 'spqr' cannot keep a pruned layer's zeros (its zero points are real-valued); "
            "put spqr before the pruning stage or quantize pruned layers with gptq"
        )
    w = get_weight(module).detach()
    perm = None
    if config.act_order:
        perm = torch.sort(stats.sq_norms, descending=True, stable=True).indices.to(w.device)
    U = cached_inverse_cholesky(stats, float(config.percdamp), perm)
    layer = spqr_quantize(w, U, config.options(), perm, int(config.blocksize))
    return LayerResult(
        weight=layer.weight.to(w.dtype), quant=layer.quant, loss=layer.loss, info=layer_info(layer)
    )


# ------------------------------------------------------------------------------ runtime


def _int_kernel(q: IntCodes, device: torch.device) -> tuple[str, Any] | None:
    """The ``int`` kernel this grid fits on ``device`` (name, repacked weight), or ``None``."""
    k = q.codes.shape[1]
    if (
        device.type == "cuda"
        and triton_int.HAVE_TRITON
        and q.bits <= 4
        and triton_int.supports(4, q.group_size, k)
    ):
        return "triton-int", triton_int.repack_int(q.codes, q.scales, q.zeros, 4, q.group_size)
    if device.type == "cpu" and cpu_int.available() and cpu_int.supports(q.bits, q.group_size, k):
        return "cpu-int", cpu_int.repack(q)
    return None


def _prepare(module: LlmpressLinear) -> dict[Any, Any]:
    """Decode once: an ``int`` kernel's layout plus the sparse outliers where one fits the
    grid on this device, else the dense weight. Logs the choice."""
    fmt = module.fmt
    codes, scales, zeros, outliers = spqr_parts(fmt, module.packed())
    assert fmt.bits is not None
    chosen = _int_kernel(IntCodes(codes, scales, zeros, fmt.bits, fmt.group_width), codes.device)
    if chosen is not None:
        shape = (fmt.out_features, fmt.in_features)
        sparse = None if outliers is None else outliers.to_sparse(shape, torch.float32)
        logger.info(
            "spqr layer [%d, %d]: %s kernel + %d sparse outliers",
            fmt.out_features,
            fmt.in_features,
            chosen[0],
            fmt.nnz or 0,
        )
        return {"int": chosen, "sparse": sparse}
    logger.info("spqr layer [%d, %d]: decoded to a dense weight", fmt.out_features, fmt.in_features)
    w = decode_weight(codes, scales, zeros, outliers)  # float32, as the sweep computed it
    return {"dense": w, torch.float32: w}


def _forward(module: LlmpressLinear, state: dict[Any, Any], x: torch.Tensor) -> torch.Tensor:
    if "dense" in state:
        w = state.get(x.dtype)
        if w is None:  # another compute dtype: cast once from the float32 weight
            w = state[x.dtype] = state["dense"].to(x.dtype)
        return F.linear(x, w)
    name, packed = state["int"]
    y = triton_int.int_matmul(x, packed) if name == "triton-int" else cpu_int.matmul(x, packed)
    if state["sparse"] is not None:
        x2 = x.reshape(-1, x.shape[-1]).float()
        y = y + torch.sparse.mm(state["sparse"], x2.t()).t().reshape(y.shape).to(y.dtype)
    return y


SPQR_KERNEL = Kernel(
    "spqr",
    55,
    _prepare,
    _forward,
    "SpQR: int kernel + sparse outliers where the grid fits one, else decoded once to dense",
    formats=frozenset({"spqr"}),
)


@hookimpl
def llmpress_register_kernels(register: KernelRegistrar) -> None:
    register(SPQR_KERNEL)
