"""Calibration statistics of layer inputs, collected once per block and shared.

Layers fed the very same input tensor (``q/k/v_proj``, ``gate/up_proj``) share one
:class:`LayerStats`, so ``X^T X`` is accumulated once per distinct input.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from llmpress.modules import in_out_features

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


class LayerStats:
    """Running statistics of a layer input ``X`` ([tokens, in_features]).

    ``xtx``: ``X^T X`` (float32 [in, in]) when the Hessian is asked for; ``sq_norms``: sum
    of squares of each input column (float32 [in]); ``nsamples``: number of token rows.
    """

    def __init__(self, in_features: int, device: torch.device, hessian: bool) -> None:
        self.in_features = in_features
        self.nsamples = 0
        self.xtx: torch.Tensor | None = (
            torch.zeros(in_features, in_features, dtype=torch.float32, device=device) if hessian else None
        )
        self._sq_norms = None if hessian else torch.zeros(in_features, dtype=torch.float32, device=device)
        #: derived tensors shared by the layers fed this input (e.g. an inverse Cholesky factor)
        self.cache: dict[str, Any] = {}

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        """Accumulate a batch of inputs x: [..., in_features]."""
        x = x.reshape(-1, self.in_features)  # [tokens, in]
        if self.xtx is not None:
            exact_tf32 = x.is_cuda and x.dtype in (torch.float16, torch.bfloat16)
            with _exact_tf32(exact_tf32):
                for xc in x.split(_CHUNK):
                    xf = xc.float()  # [chunk, in]
                    self.xtx.addmm_(xf.t(), xf)  # [in, in]
        else:
            assert self._sq_norms is not None
            self._sq_norms += torch.linalg.vector_norm(x, dim=0, dtype=torch.float32).square()
        self.nsamples += x.shape[0]

    @property
    def hessian(self) -> torch.Tensor:
        """Mean ``X^T X / n`` (float32 [in, in], a new tensor)."""
        if self.xtx is None:
            raise RuntimeError(
                "no Hessian: this stage's config did not list 'hessian' in its stats, or it was "
                "consumed by take_xtx() (use the cached factor in stats.cache)"
            )
        return self.xtx / max(self.nsamples, 1)

    def take_xtx(self) -> torch.Tensor:
        """Hand over ``X^T X`` itself (no copy) to a caller that overwrites it; column norms
        stay available, ``hessian`` does not."""
        if self.xtx is None:
            raise RuntimeError("the Hessian was not collected or was already taken")
        xtx, self.xtx = self.xtx, None
        self._sq_norms = torch.diagonal(xtx).clone()
        return xtx

    @property
    def sq_norms(self) -> torch.Tensor:
        """Per-input-column ``||X_j||^2`` (float32 [in])."""
        if self.xtx is not None:
            return torch.diagonal(self.xtx).clone()
        if self._sq_norms is None:
            raise RuntimeError("no statistics collected")
        return self._sq_norms

    @property
    def col_norms(self) -> torch.Tensor:
        """Per-input-column ``||X_j||_2`` (float32 [in]), Wanda's activation norm."""
        return self.sq_norms.sqrt()


class StatsCollector:
    """Forward hooks that fill :class:`LayerStats` for a set of layers.

    Use as a context manager around the block forwards; call :meth:`new_batch` before each
    forward so input sharing is detected per batch.
    """

    def __init__(self, modules: dict[str, nn.Module], needs: Iterable[str]) -> None:
        self.modules = modules
        self.hessian = "hessian" in set(needs)
        self.stats: dict[str, LayerStats] = {}
        #: layer names in the order their forward first ran
        self.order: list[str] = []
        self._seen: list[tuple[torch.Tensor, str]] = []  # inputs of this batch (kept alive)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> StatsCollector:
        for name, mod in self.modules.items():
            self._handles.append(mod.register_forward_pre_hook(self._make_hook(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._seen.clear()

    def new_batch(self) -> None:
        self._seen.clear()

    def _make_hook(self, name: str):  # noqa: ANN202
        def hook(mod: nn.Module, args: tuple) -> None:
            x = args[0]
            if name not in self.order:
                self.order.append(name)
            for prev, owner in self._seen:
                if prev is x or (prev.data_ptr() == x.data_ptr() and prev.shape == x.shape):
                    # same input as an earlier layer: share its stats, accumulate once
                    self.stats.setdefault(name, self.stats[owner])
                    return
            if name not in self.stats:
                self.stats[name] = LayerStats(in_out_features(mod)[0], x.device, self.hessian)
            self._seen.append((x, name))
            self.stats[name].add(x.detach())

        return hook


def input_groups(collector: StatsCollector) -> list[list[str]]:
    """Layers grouped by shared input, groups in execution order (q/k/v, o, gate/up, down)."""
    groups: dict[int, list[str]] = {}
    for name in collector.order:
        groups.setdefault(id(collector.stats[name]), []).append(name)
    return list(groups.values())
