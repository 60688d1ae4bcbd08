"""Runtime modules that compute with packed weights.

:class:`LlmpressLinear` holds a layer's packed tensors as buffers (the names the checkpoint
uses) and computes ``x @ W^T + b``. Its weight is decoded by a *backend*: the pure-torch
fallback below (dequantize, then matmul) runs anywhere; faster backends (Triton kernels)
register themselves with :func:`register_backend` and are picked per device and format.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from llmpress.formats import ModuleFormat, unpack_module

#: backend(module, x) -> y or None (None: cannot handle this input, try the next)
Backend = Callable[["LlmpressLinear", torch.Tensor], "torch.Tensor | None"]
_BACKENDS: list[tuple[str, Backend]] = []


def register_backend(name: str, fn: Backend) -> None:
    """Add a compute backend, tried before the torch fallback (later registrations first)."""
    _BACKENDS.insert(0, (name, fn))


class LlmpressLinear(nn.Module):
    """A linear layer stored in one of llmpress's packed formats (see :mod:`llmpress.formats`)."""

    def __init__(
        self, fmt: ModuleFormat, bias: bool = False, device: torch.device | str | None = None
    ) -> None:
        super().__init__()
        self.fmt = fmt
        self.in_features = fmt.in_features
        self.out_features = fmt.out_features
        for suffix, (shape, dtype) in fmt.tensor_shapes().items():
            self.register_buffer(suffix, torch.zeros(shape, dtype=dtype, device=device))
        if bias:
            self.bias = nn.Parameter(
                torch.zeros(fmt.out_features, dtype=fmt.torch_dtype, device=device), requires_grad=False
            )
        else:
            self.register_parameter("bias", None)
        self._dense_cache: torch.Tensor | None = None

    def packed(self) -> dict[str, torch.Tensor]:
        """The stored tensors of this layer (without bias)."""
        return {k: v for k, v in self._buffers.items() if v is not None}

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense weight [out, in] this layer computes with."""
        if self._dense_cache is not None:
            return self._dense_cache if dtype is None else self._dense_cache.to(dtype)
        return unpack_module(self.fmt, self.packed(), dtype or self.fmt.torch_dtype)

    def cache_dense(self, enabled: bool = True) -> None:
        """Keep the decoded weight in memory (fast CPU inference at the dense model's size)."""
        self._dense_cache = self.dequantized_weight() if enabled else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _, backend in _BACKENDS:
            y = backend(self, x)
            if y is not None:
                return y
        w = self.dequantized_weight(x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        f = self.fmt
        q = f", bits={f.bits}, group_size={f.group_size}, symmetric={f.symmetric}" if f.quantized else ""
        return f"in_features={f.in_features}, out_features={f.out_features}, format={f.format}{q}"


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` at the qualified ``name`` inside ``model``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
