"""``torch-24``: 2:4 layers (``2:4``, and ``int-2:4`` decoded to values) as PyTorch
semi-structured sparse tensors (cuSPARSELt / CUTLASS) on CUDA GPUs of compute capability 8.0+
with fp16/bf16 values.

Offered with a priority below ``dense``: on Hopper the sparse matmul is slower than cuBLAS at
decode sizes, so it is taken only when asked for (``LLMPRESS_KERNEL=torch-24``), and even then
a call with fewer than :data:`MIN_ROWS` rows uses the dense weight.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from llmpress import hookimpl
from llmpress.format.formats import ModuleFormat
from llmpress.format.runtime import LlmpressLinear
from llmpress.kernels.registry import Kernel, KernelRegistrar

#: below this many rows the dense weight is used (semi-structured kernels need large tiles)
MIN_ROWS = 64


def available(device: torch.device) -> bool:
    """Whether semi-structured sparse matmuls run on the CUDA device ``device``."""
    if not torch.cuda.is_available():
        return False
    try:
        from torch.sparse import to_sparse_semi_structured  # noqa: F401
    except ImportError:  # pragma: no cover - old torch
        return False
    return torch.cuda.get_device_capability(device) >= (8, 0)


def _prepare(module: LlmpressLinear) -> tuple[torch.Tensor, Any]:
    from torch.sparse import to_sparse_semi_structured

    dense = module.dequantized_weight()
    return dense, to_sparse_semi_structured(dense)


def _forward(module: LlmpressLinear, state: tuple[torch.Tensor, Any], x: torch.Tensor) -> torch.Tensor:
    dense, sparse = state
    rows = x.numel() // x.shape[-1]
    if rows < MIN_ROWS or x.dtype != dense.dtype:
        return F.linear(x, dense.to(x.dtype))
    return F.linear(x, sparse)


def _supports(fmt: ModuleFormat, device: torch.device) -> bool:
    return fmt.torch_dtype in (torch.float16, torch.bfloat16) and available(device)


TORCH_24 = Kernel(
    "torch-24",
    5,
    _prepare,
    _forward,
    "PyTorch semi-structured 2:4 sparse matmul (CUDA)",
    formats=frozenset({"2:4", "int-2:4"}),
    devices=frozenset({"cuda"}),
    supports=_supports,
)


@hookimpl
def llmpress_register_kernels(register: KernelRegistrar) -> None:
    register(TORCH_24)
