"""Calibration statistics of layer inputs: a registry of statistics, each with a merge rule.

A method's config lists the statistics it needs (``stats = {"hessian"}``); the engine
collects all of them for a block in one pass of forward pre-hooks. Layers fed the very same
input tensor (``q/k/v_proj``, ``gate/up_proj``) share one :class:`LayerStats`, so ``X^T X``
is accumulated once per distinct input. Every statistic is a sum or a max, so batches
merge with :meth:`LayerStats.merge` and processes with :meth:`LayerStats.all_reduce`.

Built-in statistics (name: accumulator, shape for an input of ``in`` features):

* ``hessian``: ``X^T X`` (float32 [in, in], sum)
* ``sq_norms``: per-column ``sum x^2`` (float32 [in], sum; derived from ``hessian`` when both)
* ``mean_var``: per-column ``sum x`` and ``sum x^2`` (float32 [2, in], sum) -> mean, variance
* ``absmax``: per-column ``max |x|`` (float32 [in], max)
* ``token_norms``: ``sum ||x_t||``, ``sum ||x_t||^2`` and ``max ||x_t||`` over tokens
  (float32 [3]; sum, sum, max)
* ``grad``: ``dL/dW`` of the layer's weight summed over calibration batches (float32
  [out, in], sum), from a backward pass of the whole model (see :mod:`llmpress.engine.gradients`)
* ``dense_cross``: ``(X - X~)^T X~`` over tokens (float32 [in, in], sum), with ``X~`` the
  layer's input in the model compressed so far and ``X`` its input in the *dense* model
  (GPTAQ's asymmetric calibration). The block pass keeps a second stream of block inputs
  for it, propagated through the dense weights of each block (see
  :class:`llmpress.engine.capture.DenseStream`). Cost, only when a stage asks for it: one
  more copy of the calibration activations (the dense stream, where the activations are
  stored), one dense copy of the current block's weights, and one more block forward per
  batch per statistics pass (four with ``true_sequential``) plus one per block to advance
  the dense stream: about twice the block forwards of GPTQ; the extra [in, in]
  accumulator is the size of the Hessian. Rows are paired token by token, so a layer whose
  tokens differ between the two models (routed MoE experts) cannot have it.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

from llmpress.errors import ModelError, RecipeError
from llmpress.model.modules import in_out_features

_CHUNK = 8192  # token rows per fp32 upcast, bounds the temporary memory


@contextlib.contextmanager
def _exact_tf32(enabled: bool) -> Iterator[None]:
    """Allow TF32 matmuls; exact for fp16/bf16 inputs (their mantissas fit TF32's 10 bits,
    products are exact in fp32 and accumulation stays fp32)."""
    if not enabled:
        yield
        return
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


@dataclasses.dataclass(frozen=True)
class Statistic:
    """One statistic of a layer input ``x`` [tokens, in].

    ``init(in_features, device)`` makes the zero accumulator; ``update(acc, x)`` adds a batch
    in place; ``merge`` is ``"sum"`` or ``"max"`` (or a tensor of per-row rules for mixed
    accumulators such as ``token_norms``). ``source`` is ``"input"`` (forward pre-hooks) or
    ``"grad"`` (a backward pass; the engine fills it) or ``"dense"`` (paired inputs:
    ``update(acc, x, x_dense)`` with the same layer's input in the dense model).
    """

    name: str
    init: Callable[[int, torch.device], torch.Tensor]
    update: Callable[..., None]
    merge: str | tuple[str, ...] = "sum"
    source: str = "input"


def _add_xtx(acc: torch.Tensor, x: torch.Tensor) -> None:
    exact_tf32 = x.is_cuda and x.dtype in (torch.float16, torch.bfloat16)
    with _exact_tf32(exact_tf32):
        for xc in x.split(_CHUNK):
            xf = xc.float()  # [chunk, in]
            acc.addmm_(xf.t(), xf)  # [in, in]


def _add_sq_norms(acc: torch.Tensor, x: torch.Tensor) -> None:
    acc += torch.linalg.vector_norm(x, dim=0, dtype=torch.float32).square()


def _add_mean_var(acc: torch.Tensor, x: torch.Tensor) -> None:
    for xc in x.split(_CHUNK):
        xf = xc.float()  # [chunk, in]
        acc[0] += xf.sum(0)
        acc[1] += xf.square().sum(0)


def _add_absmax(acc: torch.Tensor, x: torch.Tensor) -> None:
    torch.maximum(acc, x.abs().amax(0).float(), out=acc)


def _add_token_norms(acc: torch.Tensor, x: torch.Tensor) -> None:
    n = torch.linalg.vector_norm(x, dim=1, dtype=torch.float32)  # [tokens]
    acc[0] += n.sum()
    acc[1] += n.square().sum()
    acc[2] = torch.maximum(acc[2], n.max())


def _add_dense_cross(acc: torch.Tensor, x: torch.Tensor, x_dense: torch.Tensor) -> None:
    exact_tf32 = x.is_cuda and x.dtype in (torch.float16, torch.bfloat16)
    with _exact_tf32(exact_tf32):
        for xc, dc in zip(x.split(_CHUNK), x_dense.split(_CHUNK)):
            xf = xc.float()  # [chunk, in]
            acc.addmm_((dc.float() - xf).t(), xf)  # [in, in]: (X - X~)^T X~


def _no_update(acc: torch.Tensor, x: torch.Tensor) -> None:  # pragma: no cover - filled elsewhere
    raise RuntimeError("gradient statistics come from a backward pass, not from layer inputs")


STATISTICS: dict[str, Statistic] = {}


def register_statistic(stat: Statistic) -> None:
    """Add a statistic to the registry (a name can be registered once)."""
    if stat.name in STATISTICS and STATISTICS[stat.name] != stat:
        raise ValueError(f"statistic {stat.name!r} is already registered")
    STATISTICS[stat.name] = stat


for _s in (
    Statistic("hessian", lambda n, d: torch.zeros(n, n, device=d), _add_xtx),
    Statistic("sq_norms", lambda n, d: torch.zeros(n, device=d), _add_sq_norms),
    Statistic("mean_var", lambda n, d: torch.zeros(2, n, device=d), _add_mean_var),
    Statistic("absmax", lambda n, d: torch.zeros(n, device=d), _add_absmax, merge="max"),
    Statistic("token_norms", lambda n, d: torch.zeros(3, device=d), _add_token_norms, ("sum", "sum", "max")),
    Statistic("grad", lambda n, d: torch.zeros(0, device=d), _no_update, source="grad"),
    Statistic("dense_cross", lambda n, d: torch.zeros(n, n, device=d), _add_dense_cross, source="dense"),
):
    register_statistic(_s)


def check_statistics(names: Iterable[str], method: str) -> None:
    """Raise :class:`RecipeError` if a method asks for an unknown statistic."""
    unknown = sorted(set(names) - set(STATISTICS))
    if unknown:
        raise RecipeError(
            f"method {method!r} asks for unknown statistics {unknown}; known: {sorted(STATISTICS)}"
        )


def _merge_into(rule: str | tuple[str, ...], acc: torch.Tensor, other: torch.Tensor) -> None:
    rules = (rule,) if isinstance(rule, str) else rule
    rows = [acc] if isinstance(rule, str) else list(acc)
    others = [other] if isinstance(rule, str) else list(other)
    for r, a, o in zip(rules, rows, others):
        if r == "sum":
            a += o
        elif r == "max":
            torch.maximum(a, o, out=a)
        else:  # pragma: no cover - registry guards this
            raise ValueError(f"unknown merge rule {r!r}")


class LayerStats:
    """Running statistics of one layer input ``X`` ([tokens, in_features]).

    ``acc[name]`` holds each statistic's accumulator; ``nsamples`` counts token rows;
    ``cache`` holds derived tensors shared by the layers fed this input (an inverse
    Cholesky factor). The properties below read the common ones.
    """

    def __init__(
        self,
        in_features: int,
        device: torch.device,
        needs: Iterable[str],
        compute: torch.device | None = None,
    ) -> None:
        """Accumulators live on ``device``; with ``compute`` set (statistics offloaded, e.g. to
        CPU while the block runs on a GPU) each batch's part is computed there and folded into
        them, and the properties below hand tensors back on ``compute``."""
        self.in_features = in_features
        self.nsamples = 0
        self.compute = compute
        wanted = set(needs)
        if "hessian" in wanted:
            wanted.discard("sq_norms")  # the diagonal of X^T X
        self.acc: dict[str, torch.Tensor] = {
            n: STATISTICS[n].init(in_features, device)
            for n in sorted(wanted)
            if STATISTICS[n].source in ("input", "dense")
        }
        self.cache: dict[str, Any] = {}
        self._grad: torch.Tensor | None = None

    def with_grad(self, grad: torch.Tensor) -> LayerStats:
        """A view for one layer: the same shared input statistics plus that layer's own
        weight gradient (layers sharing an input have different weights)."""
        view = object.__new__(LayerStats)
        view.__dict__.update(self.__dict__)
        view._grad = grad
        return view

    @torch.no_grad()
    def add(self, x: torch.Tensor, dense: torch.Tensor | None = None) -> None:
        """Accumulate a batch of inputs x: [..., in_features]; ``dense``: the same layer's
        inputs in the dense model, token for token (needed by ``"dense"`` statistics)."""
        x = x.reshape(-1, self.in_features)  # [tokens, in]
        args: tuple[torch.Tensor, ...] = (x,)
        if any(STATISTICS[n].source == "dense" for n in self.acc):
            if dense is None or dense.numel() != x.numel():
                raise ModelError(
                    "statistic 'dense_cross' pairs each token's input with the dense model's: "
                    f"got {x.shape[0]} compressed-model rows and "
                    f"{'no' if dense is None else dense.numel() // self.in_features} dense rows "
                    "(routed MoE experts see different tokens; leave them out of this stage's targets)"
                )
            args = (x, dense.reshape(-1, self.in_features))
        for name, acc in self.acc.items():
            spec = STATISTICS[name]
            a = args if spec.source == "dense" else args[:1]
            if self.compute is None:
                spec.update(acc, *a)
                continue
            part = spec.init(self.in_features, x.device)  # offloaded: this batch's part, then folded in
            spec.update(part, *a)
            _merge_into(spec.merge, acc, part.to(acc.device, non_blocking=False))
        self.nsamples += x.shape[0]

    def merge(self, other: LayerStats) -> None:
        """Fold another batch's (or process's) statistics of the same input into these."""
        for name, acc in self.acc.items():
            _merge_into(STATISTICS[name].merge, acc, other.acc[name])
        self.nsamples += other.nsamples

    def all_reduce(self) -> None:
        """Reduce across ``torch.distributed`` processes with each statistic's merge rule."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return
        from llmpress.engine.distributed import comm_device

        comm = comm_device()  # offloaded (CPU) statistics travel through the backend's device
        for name, acc in self.acc.items():
            rule = STATISTICS[name].merge
            rules = (rule,) if isinstance(rule, str) else rule
            rows = [acc] if isinstance(rule, str) else list(acc)
            for r, row in zip(rules, rows):
                buf = row if row.device == comm else row.to(comm)
                dist.all_reduce(buf, op=dist.ReduceOp.SUM if r == "sum" else dist.ReduceOp.MAX)
                if buf is not row:
                    row.copy_(buf)
        n = torch.tensor([self.nsamples], dtype=torch.int64, device=comm)
        dist.all_reduce(n)
        self.nsamples = int(n.item())

    def _need(self, name: str, hint: str = "") -> torch.Tensor:
        if name not in self.acc:
            raise RuntimeError(
                f"statistic {name!r} was not collected: list it in the method config's 'stats'{hint}"
            )
        return self._out(self.acc[name])

    def _out(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.compute is None else t.to(self.compute)

    @property
    def hessian(self) -> torch.Tensor:
        """Mean ``X^T X / n`` (float32 [in, in], a new tensor)."""
        hint = " (or it was consumed by take_xtx(); use the cached factor in stats.cache)"
        return self._need("hessian", hint) / max(self.nsamples, 1)

    def take_xtx(self) -> torch.Tensor:
        """Hand over ``X^T X`` itself (no copy) to a caller that overwrites it; column norms
        stay available, ``hessian`` does not."""
        xtx = self.acc.pop("hessian", None)
        if xtx is None:
            raise RuntimeError("the Hessian was not collected or was already taken")
        self.acc["sq_norms"] = torch.diagonal(xtx).clone()
        return self._out(xtx)

    @property
    def sq_norms(self) -> torch.Tensor:
        """Per-input-column ``||X_j||^2`` (float32 [in])."""
        if "hessian" in self.acc:
            return self._out(torch.diagonal(self.acc["hessian"]).clone())
        return self._need("sq_norms")

    @property
    def col_norms(self) -> torch.Tensor:
        """Per-input-column ``||X_j||_2`` (float32 [in]), Wanda's activation norm."""
        return self.sq_norms.sqrt()

    @property
    def mean(self) -> torch.Tensor:
        """Per-input-column mean (float32 [in])."""
        return self._need("mean_var")[0] / max(self.nsamples, 1)

    @property
    def variance(self) -> torch.Tensor:
        """Per-input-column (population) variance (float32 [in])."""
        mv = self._need("mean_var")
        n = max(self.nsamples, 1)
        return (mv[1] / n - (mv[0] / n).square()).clamp_min(0.0)

    @property
    def absmax(self) -> torch.Tensor:
        """Per-input-column ``max |x|`` (float32 [in])."""
        return self._need("absmax")

    @property
    def token_norms(self) -> dict[str, float]:
        """Mean, root-mean-square and max of the per-token input norms."""
        t = self._need("token_norms")
        n = max(self.nsamples, 1)
        return {"mean": float(t[0]) / n, "rms": (float(t[1]) / n) ** 0.5, "max": float(t[2])}

    @property
    def dense_cross(self) -> torch.Tensor:
        """Mean ``(X - X~)^T X~ / n`` over tokens (float32 [in, in], a new tensor): ``X`` the
        dense model's inputs, ``X~`` the compressed model's (the scale of ``hessian``)."""
        return self._need("dense_cross") / max(self.nsamples, 1)

    @property
    def grad(self) -> torch.Tensor:
        """``dL/dW`` [out, in] summed over calibration batches (the layer's own weight)."""
        g = self._grad
        if g is None:
            raise RuntimeError("statistic 'grad' was not collected: list it in the method config's 'stats'")
        return g


class StatsCollector:
    """Forward hooks that fill :class:`LayerStats` for a set of layers.

    Use as a context manager around the block forwards; call :meth:`new_batch` before each
    forward so input sharing is detected per batch.
    """

    def __init__(
        self, modules: dict[str, nn.Module], needs: Iterable[str], store: torch.device | None = None
    ) -> None:
        """``store``: where the accumulators live (``None``: with the inputs; ``cpu`` offloads
        the statistics, e.g. many experts' ``X^T X``, off the GPU)."""
        self.modules = modules
        self.needs = frozenset(needs)
        self.store = store
        self.stats: dict[str, LayerStats] = {}
        #: layer names in the order their forward first ran
        self.order: list[str] = []
        self._seen: list[tuple[torch.Tensor, str]] = []  # inputs of this batch (kept alive)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        #: this batch's inputs of the layers in the dense model (``"dense"`` statistics)
        self.dense: dict[str, torch.Tensor] = {}
        #: False while another forward (the dense model's) runs through the same layers
        self.active = True

    def __enter__(self) -> StatsCollector:
        for name, mod in self.modules.items():
            self._handles.append(mod.register_forward_pre_hook(self._make_hook(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._seen.clear()

    def new_batch(self, dense: dict[str, torch.Tensor] | None = None) -> None:
        """Start a batch; ``dense``: its layer inputs in the dense model, by layer name."""
        self._seen.clear()
        self.dense = dense or {}

    def _make_hook(self, name: str):  # noqa: ANN202
        def hook(mod: nn.Module, args: tuple) -> None:
            if not self.active:
                return
            x = args[0]
            if name not in self.order:
                self.order.append(name)
            for prev, owner in self._seen:
                if prev is x or (prev.data_ptr() == x.data_ptr() and prev.shape == x.shape):
                    # same input as an earlier layer: share its stats, accumulate once
                    self.stats.setdefault(name, self.stats[owner])
                    return
            if name not in self.stats:
                if self.store is None:
                    self.stats[name] = LayerStats(in_out_features(mod)[0], x.device, self.needs)
                else:
                    self.stats[name] = LayerStats(in_out_features(mod)[0], self.store, self.needs, x.device)
            self._seen.append((x, name))
            self.stats[name].add(x.detach(), self.dense.get(name))

        return hook


def input_groups(collector: StatsCollector) -> list[list[str]]:
    """Layers grouped by shared input, groups in execution order (q/k/v, o, gate/up, down)."""
    groups: dict[int, list[str]] = {}
    for name in collector.order:
        groups.setdefault(id(collector.stats[name]), []).append(name)
    return list(groups.values())
