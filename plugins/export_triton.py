"""``triton-int``: integer layers on CUDA through llmpress's Triton kernels
(:mod:`llmpress.kernels.triton_int`). Codes of 2-4 bits run on the 4-bit kernel, 5-8 bits on
the 8-bit one (the grid's zero points are passed explicitly, so any width fits).
"""

from __future__ import annotations

import torch

from llmpress import hookimpl
from llmpress.format.formats import ModuleFormat, int_codes
from llmpress.format.runtime import LlmpressLinear
from llmpress.kernels import triton_int
from llmpress.kernels.registry import Kernel, KernelRegistrar


def kernel_bits(bits: int) -> int:
    """The kernel width a ``bits``-wide code runs on."""
    return 4 if bits <= 4 else 8


def _prepare(module: LlmpressLinear) -> triton_int.TritonIntWeight:
    q = int_codes(module.fmt, module.packed())
    kb = kernel_bits(q.bits)
    # a symmetric grid of the kernel's own width needs no zeros tensor
    zeros = None if (kb == q.bits and "weight_zero" not in module.packed()) else q.zeros
    return triton_int.repack_int(q.codes, q.scales, zeros, kb, q.group_size)


def _forward(module: LlmpressLinear, state: triton_int.TritonIntWeight, x: torch.Tensor) -> torch.Tensor:
    return triton_int.int_matmul(x, state)


def _supports(fmt: ModuleFormat, device: torch.device) -> bool:
    return (
        triton_int.HAVE_TRITON
        and fmt.bits is not None
        and triton_int.supports(kernel_bits(fmt.bits), fmt.group_width, fmt.in_features)
    )


TRITON_INT = Kernel(
    "triton-int",
    60,
    _prepare,
    _forward,
    "Triton int4/int8 weight-only GEMV/GEMM (CUDA)",
    formats=frozenset({"int"}),
    devices=frozenset({"cuda"}),
    supports=_supports,
)


@hookimpl
def llmpress_register_kernels(register: KernelRegistrar) -> None:
    register(TRITON_INT)
