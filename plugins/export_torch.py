"""Kernel export to llmpress's packed formats with the pure-torch runtime module.

Answers ``llmpress_export_kernel`` for the targets ``int``, ``int-2:4``, ``2:4`` and
``bitmask`` (``trylast``: GPU kernel plugins registered later answer first).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from llmpress import hookimpl
from llmpress.formats import FORMATS, ModuleFormat, pack_module
from llmpress.modules import get_weight
from llmpress.runtime import LlmpressLinear


@hookimpl(trylast=True)
def llmpress_export_kernel(module: nn.Module, packed: dict[str, Any], target: str) -> dict[str, Any] | None:
    if target not in FORMATS:
        return None
    w = get_weight(module).detach()  # [out, in]
    out_f, in_f = w.shape
    quant = packed.get("quant")
    dtype = str(packed.get("dtype", "float16")).replace("torch.", "")
    keep = packed.get("keep")
    fmt = ModuleFormat(
        format=target,
        in_features=in_f,
        out_features=out_f,
        bits=None if quant is None else quant["bits"],
        group_size=None if quant is None else quant["group_size"],
        symmetric=False if quant is None else quant["symmetric"],
        dtype=dtype,
        nnz=int(keep.sum()) if target == "bitmask" and keep is not None else None,
    )
    tensors = pack_module(fmt, w.float(), quant, keep)
    bias = getattr(module, "bias", None)
    rt = LlmpressLinear(fmt, bias=bias is not None, device=w.device)
    with torch.no_grad():
        for k, v in tensors.items():
            getattr(rt, k).copy_(v)
        if bias is not None:
            rt.bias.copy_(bias.detach().to(rt.bias.dtype))
    return {"module": rt, "tensors": tensors, "config": fmt.to_dict()}
