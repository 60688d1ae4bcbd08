"""Pure-torch kernels for every packed format (run anywhere; the reference for other kernels).

* ``dense`` (the default where no faster kernel applies): decode the weight once at load and
  keep it in the layer's dtype (dense speed; the packed tensors stay for saving); called in
  another dtype, it decodes again in that dtype, once. Where the decoded weight does not fit
  in the device's memory it decodes on every call instead.
* ``torch``: decode the weight on every call, then ``F.linear``: packed memory, slow;
  chosen with ``LLMPRESS_KERNEL=torch``. Every other kernel is tested against it.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F

from llmpress import hookimpl
from llmpress.format.formats import PACKED_FORMATS
from llmpress.format.runtime import LlmpressLinear
from llmpress.kernels.registry import Kernel, KernelRegistrar

logger = logging.getLogger(__name__)


def _decode_forward(module: LlmpressLinear, state: Any, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, module.dequantized_weight(x.dtype))


def _dense_prepare(module: LlmpressLinear) -> dict[torch.dtype, torch.Tensor]:
    try:
        return {module.fmt.torch_dtype: module.dequantized_weight()}
    except torch.OutOfMemoryError:
        logger.warning("%s: the decoded weight does not fit in memory; decoding it on every call", module)
        return {}


def _dense_forward(
    module: LlmpressLinear, state: dict[torch.dtype, torch.Tensor], x: torch.Tensor
) -> torch.Tensor:
    weight = state.get(x.dtype)
    if weight is None:
        if not state:  # did not fit at load
            return _decode_forward(module, None, x)
        # another compute dtype (e.g. fp32 on CPU): decode again from the codes, exactly, once
        state.clear()
        weight = state[x.dtype] = module.dequantized_weight(x.dtype)
    return F.linear(x, weight)


#: every packed format, on any device
_PACKED = frozenset(PACKED_FORMATS)
TORCH = Kernel(
    "torch",
    0,
    lambda m: None,
    _decode_forward,
    "decode the weight on every call (least memory)",
    formats=_PACKED,
)
DENSE = Kernel(
    "dense", 10, _dense_prepare, _dense_forward, "decode once at load, dense matmul", formats=_PACKED
)


@hookimpl
def llmpress_register_kernels(register: KernelRegistrar) -> None:
    register(DENSE)
    register(TORCH)
