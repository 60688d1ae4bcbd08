"""``cpu-int``: integer layers on CPU through PyTorch's packed int4/int8 kernels
(:mod:`llmpress.kernels.cpu_int`): 2-4 bits with groups of a multiple of 32, 5-8 bits per channel.
"""

from __future__ import annotations

import torch

from llmpress import hookimpl
from llmpress.format.formats import ModuleFormat, int_codes
from llmpress.format.runtime import LlmpressLinear
from llmpress.kernels import cpu_int
from llmpress.kernels.registry import Kernel, KernelRegistrar


def _prepare(module: LlmpressLinear) -> cpu_int.CpuIntWeight:
    return cpu_int.repack(int_codes(module.fmt, module.packed()))


def _forward(module: LlmpressLinear, state: cpu_int.CpuIntWeight, x: torch.Tensor) -> torch.Tensor:
    return cpu_int.matmul(x, state)


def _supports(fmt: ModuleFormat, device: torch.device) -> bool:
    return (
        fmt.bits is not None
        and cpu_int.available()
        and cpu_int.supports(fmt.bits, fmt.group_width, fmt.in_features)
    )


CPU_INT = Kernel(
    "cpu-int",
    50,
    _prepare,
    _forward,
    "torch's CPU int4/int8 weight-only kernels (bf16 activations)",
    formats=frozenset({"int"}),
    devices=frozenset({"cpu"}),
    supports=_supports,
)


@hookimpl
def llmpress_register_kernels(register: KernelRegistrar) -> None:
    register(CPU_INT)
