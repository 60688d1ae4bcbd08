"""Runtime modules that compute with packed weights.

:class:`LlmpressLinear` holds a layer's packed tensors as buffers (the names the checkpoint
uses) and computes ``x @ W^T + b`` with a kernel chosen once (:mod:`llmpress.kernels.registry`):
at load time by the transformers quantizer, or on the first call for a module built in memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from llmpress.format.formats import LOWRANK_A, LOWRANK_B, ModuleFormat, unpack_module
from llmpress.kernels.registry import Kernel, KernelSource, choose_kernel
from llmpress.quant.activations import fake_quantize


class LlmpressLinear(nn.Module):
    """A linear layer stored in one of llmpress's packed formats (see :mod:`llmpress.format.formats`).

    The packed tensors are buffers in their stored dtypes; the bias (a parameter) is in
    ``dtype``, the model's compute dtype (default: the storage dtype).
    """

    def __init__(
        self,
        fmt: ModuleFormat,
        bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.fmt = fmt
        self.in_features = fmt.in_features
        self.out_features = fmt.out_features
        for suffix, (shape, stored) in fmt.tensor_shapes().items():
            self.register_buffer(suffix, torch.zeros(shape, dtype=stored, device=device))
        if bias:
            self.bias = nn.Parameter(
                torch.zeros(fmt.out_features, dtype=dtype or fmt.torch_dtype, device=device),
                requires_grad=False,
            )
        else:
            self.register_parameter("bias", None)
        self.kernel: Kernel | None = None
        self._kernel_state: Any = None

    def packed(self) -> dict[str, torch.Tensor]:
        """The stored tensors of this layer's weight (without bias, input scale and low-rank path)."""
        skip = ("input_scale", LOWRANK_A, LOWRANK_B)
        return {k: v for k, v in self._buffers.items() if v is not None and k not in skip}

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense weight [out, in] this layer stands for."""
        return unpack_module(self.fmt, self.packed(), dtype or self.fmt.torch_dtype)

    def set_kernel(
        self, prefer: str | Sequence[str] | None = None, kernels: KernelSource | None = None
    ) -> Kernel:
        """Choose the kernel for this layer's format and device, and let it repack once.

        ``kernels``: where candidates come from (default: the source ``import llmpress`` installs).
        """
        device = next(iter(self.packed().values())).device
        kernel = choose_kernel(self.fmt, device, prefer, kernels)
        self._kernel_state = kernel.prepare(self)
        self.kernel = kernel
        return kernel

    def _apply(self, fn: Any, recurse: bool = True) -> LlmpressLinear:
        out = super()._apply(fn, recurse)
        self.kernel, self._kernel_state = None, None  # moved or cast: choose again on next use
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is None:
            self.set_kernel()
        assert self.kernel is not None
        if self.fmt.activations is not None and not self.kernel.quantizes_activations:
            x = fake_quantize(x, self.fmt.activations, self._buffers.get("input_scale"))
        y = self.kernel.forward(self, self._kernel_state, x)
        a, b = self._buffers.get(LOWRANK_A), self._buffers.get(LOWRANK_B)
        if a is not None and b is not None:  # EoRA: W x + B (A x), in the input's dtype
            y = y + lowrank_delta(x, a, b).to(y.dtype)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        f = self.fmt
        q = f", bits={f.bits}, group_size={f.group_size}, symmetric={f.symmetric}" if f.quantized else ""
        q += f", activations={f.activations}" if f.activations else ""
        q += f", lowrank={f.lowrank}" if f.lowrank else ""
        k = f", kernel={self.kernel.name}" if self.kernel is not None else ""
        return f"in_features={f.in_features}, out_features={f.out_features}, format={f.format}{q}{k}"


def lowrank_delta(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``B (A x)`` for inputs ``x`` [..., in], ``a`` [r, in], ``b`` [out, r], in ``x``'s dtype."""
    return torch.nn.functional.linear(torch.nn.functional.linear(x, a.to(x.dtype)), b.to(x.dtype))


def select_kernels(
    model: nn.Module, prefer: str | Sequence[str] | None = None, kernels: KernelSource | None = None
) -> dict[str, str]:
    """Choose (again) the kernel of every packed layer of ``model``; returns name -> kernel.

    ``prefer``: kernel names in order of preference (default ``$LLMPRESS_KERNEL``, else the
    fastest offered for each layer's device); ``kernels``: the kernel source (default: the
    installed one).
    """
    return {
        n: m.set_kernel(prefer, kernels).name
        for n, m in model.named_modules()
        if isinstance(m, LlmpressLinear)
    }


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` at the qualified ``name`` inside ``model``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
