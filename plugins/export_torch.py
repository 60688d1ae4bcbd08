"""Pure-torch kernels for every packed format (run anywhere; the reference for other kernels).

* ``torch``: decode the weight on each call, then ``F.linear`` (memory stays packed).
* ``torch-unpacked``: decode once at load and keep the dense weight (dense speed and size);
  chosen with ``LLMPRESS_KERNEL=torch-unpacked``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from llmpress import hookimpl
from llmpress.formats import ModuleFormat
from llmpress.kernels.registry import Kernel
from llmpress.runtime import LlmpressLinear


def _decode_forward(module: LlmpressLinear, state: Any, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, module.dequantized_weight(x.dtype))


def _unpacked_forward(module: LlmpressLinear, state: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, state if state.dtype == x.dtype else state.to(x.dtype))


KERNELS = (
    Kernel("torch", 0, lambda m: None, _decode_forward, "decode the weight on every call"),
    Kernel("torch-unpacked", -1, lambda m: m.dequantized_weight(), _unpacked_forward, "decode once at load"),
)


@hookimpl(trylast=True)
def llmpress_export_kernel(fmt: ModuleFormat, device: torch.device) -> tuple[Kernel, ...]:
    return KERNELS if fmt.spec.packed else ()
