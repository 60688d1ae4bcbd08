"""The module a dropped sub-block leaves behind (a saved format: it loads with ``import llmpress``)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class DroppedModule(nn.Module):
    """A sub-block that adds nothing: returns zeros shaped like its input (and ``None``
    attention weights for an attention module, as transformers' layers unpack two values)."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        if kind not in ("attention", "mlp"):
            raise ValueError(f"DroppedModule kind must be 'attention' or 'mlp', got {kind!r}")
        self.kind = kind

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        zeros = torch.zeros_like(hidden_states)
        return (zeros, None) if self.kind == "attention" else zeros

    def extra_repr(self) -> str:
        return f"kind={self.kind}"
