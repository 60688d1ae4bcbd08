"""W8A8 kernels on CUDA: the layer's inputs are quantized per call and multiplied in 8 bits.

* ``cuda-fp8``: ``fp8`` layers through ``torch._scaled_mm`` (E4M3 x E4M3, fp32 accumulation,
  row-wise scales: one per token and one per output channel) on GPUs of compute capability
  8.9+ (Ada, Hopper).
* ``cuda-int8``: INT8 W8A8 ``int`` layers through ``torch._int_mm`` (int32 accumulation), scaled
  afterwards by the per-token and per-channel scales; calls of 16 rows or fewer (which
  ``_int_mm`` refuses) are padded to 17.

Both quantize ``x`` with :func:`llmpress.quant.activations.quantize`, the same rounding the
simulated path uses, so they match it up to the order of the sums.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llmpress import hookimpl
from llmpress.format.formats import ModuleFormat, int_codes
from llmpress.format.runtime import LlmpressLinear
from llmpress.kernels.registry import Kernel, KernelRegistrar
from llmpress.quant.activations import quantize


def _input_scale(module: LlmpressLinear) -> torch.Tensor | None:
    return module._buffers.get("input_scale")


def _fp8_prepare(module: LlmpressLinear) -> tuple[torch.Tensor, torch.Tensor]:
    t = module.packed()
    return t["weight"].contiguous(), t["weight_scale"].float().reshape(1, -1).contiguous()  # [N, K], [1, N]


def _fp8_forward(
    module: LlmpressLinear, state: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor
) -> torch.Tensor:
    w, sw = state
    assert module.fmt.activations is not None
    lead = x.shape[:-1]
    xq, sx = quantize(x.reshape(-1, x.shape[-1]), module.fmt.activations, _input_scale(module))
    sx = sx.expand(xq.shape[0], 1).contiguous()
    out_dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
    y = torch._scaled_mm(xq, w.t(), scale_a=sx, scale_b=sw, out_dtype=out_dtype)
    return y.to(x.dtype).reshape(*lead, -1)


def _int8_prepare(module: LlmpressLinear) -> tuple[torch.Tensor, torch.Tensor]:
    q = int_codes(module.fmt, module.packed())
    w = (q.codes.to(torch.int16) - 128).to(torch.int8).contiguous()  # symmetric 8-bit: zero 128
    return w, q.scales.float().reshape(1, -1).contiguous()


def _int8_forward(
    module: LlmpressLinear, state: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor
) -> torch.Tensor:
    w, sw = state
    assert module.fmt.activations is not None
    lead = x.shape[:-1]
    xq, sx = quantize(x.reshape(-1, x.shape[-1]), module.fmt.activations, _input_scale(module))
    m = xq.shape[0]
    if m <= 16:
        xq = F.pad(xq, (0, 0, 0, 17 - m))
    acc = torch._int_mm(xq, w.t())[:m]
    return (acc.float() * sx * sw).to(x.dtype).reshape(*lead, -1)


def _w8a8(fmt: ModuleFormat) -> bool:
    """A W8A8 layer whose shape the 8-bit matmuls take (multiples of 16)."""
    return (
        fmt.activations is not None
        and torch.cuda.is_available()
        and fmt.in_features % 16 == 0
        and fmt.out_features % 16 == 0
    )


def _fp8_supports(fmt: ModuleFormat, device: torch.device) -> bool:
    return _w8a8(fmt) and torch.cuda.get_device_capability(device) >= (8, 9)


def _int8_supports(fmt: ModuleFormat, device: torch.device) -> bool:
    # W8A8 only: W4A8/W4A4 layers (4-bit codes) run the simulated path
    return _w8a8(fmt) and fmt.bits == 8 and fmt.activations is not None and fmt.activations.startswith("int8")


CUDA_FP8 = Kernel(
    "cuda-fp8",
    70,
    _fp8_prepare,
    _fp8_forward,
    "torch._scaled_mm E4M3 W8A8",
    quantizes_activations=True,
    formats=frozenset({"fp8"}),
    devices=frozenset({"cuda"}),
    supports=_fp8_supports,
)
CUDA_INT8 = Kernel(
    "cuda-int8",
    70,
    _int8_prepare,
    _int8_forward,
    "torch._int_mm INT8 W8A8",
    quantizes_activations=True,
    formats=frozenset({"int"}),
    devices=frozenset({"cuda"}),
    supports=_int8_supports,
)


@hookimpl
def llmpress_register_kernels(register: KernelRegistrar) -> None:
    register(CUDA_FP8)
    register(CUDA_INT8)
