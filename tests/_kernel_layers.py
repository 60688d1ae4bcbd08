"""Packed layers with random grids, for kernel tests (shared by the CPU and interpreter tests)."""

from __future__ import annotations

import torch

from llmpress.format.formats import ModuleFormat, pack_module
from llmpress.format.runtime import LlmpressLinear
from llmpress.model.results import LayerResult, QuantState


def int_layer(
    out_f: int, in_f: int, bits: int, group_size: int, symmetric: bool, dtype: str = "float16", seed: int = 0
) -> LlmpressLinear:
    """An ``int`` layer with random codes, scales and zero points, loaded into a runtime module."""
    g = torch.Generator().manual_seed(seed)
    gs = in_f if group_size == -1 else group_size
    n_groups = in_f // gs
    codes = torch.randint(0, 2**bits, (out_f, in_f), generator=g).to(torch.uint8)
    scales = torch.rand(out_f, n_groups, generator=g) * 0.02 + 0.005
    if symmetric:
        zeros = torch.full((out_f, n_groups), float(2 ** (bits - 1)))
    else:
        zeros = torch.randint(0, 2**bits, (out_f, n_groups), generator=g).float()
    quant = QuantState(codes, scales, zeros, bits=bits, group_size=group_size, symmetric=symmetric)
    fmt = ModuleFormat("int", in_f, out_f, bits=bits, group_size=group_size, symmetric=symmetric, dtype=dtype)
    weight = quant.dequantize()
    tensors = pack_module(fmt, weight, LayerResult(weight=weight, quant=quant))
    module = LlmpressLinear(fmt)
    for k, v in tensors.items():
        getattr(module, k).copy_(v)
    return module
