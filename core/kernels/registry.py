"""Kernels: how a packed layer computes, chosen once per layer when a model is loaded.

Plugins offer kernels through ``llmpress_export_kernel(fmt, device)``. The runtime takes the
kernel named by the user (``LLMPRESS_KERNEL=name[,name...]``, an order of preference, or
:func:`llmpress.format.runtime.select_kernels`), else the offered kernel with the highest
``priority``. ``prepare`` repacks the stored tensors once into the kernel's layout;
``forward`` computes ``x @ W^T`` (without bias).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from llmpress.errors import CheckpointError

if TYPE_CHECKING:
    from llmpress.format.formats import ModuleFormat
    from llmpress.format.runtime import LlmpressLinear

KERNEL_ENV = "LLMPRESS_KERNEL"


@dataclasses.dataclass(frozen=True)
class Kernel:
    """A way to run packed layers.

    ``prepare(module)`` returns the kernel's state for that layer (repacked tensors, or
    ``None``), computed once; ``forward(module, state, x)`` returns ``x @ W^T`` [..., out].
    For a W8A8 layer the runtime rounds ``x`` to the activation grid before ``forward``
    (simulation), unless ``quantizes_activations`` says the kernel does it itself.
    """

    name: str
    priority: int
    prepare: Callable[[LlmpressLinear], Any]
    forward: Callable[[LlmpressLinear, Any, torch.Tensor], torch.Tensor]
    description: str = ""
    quantizes_activations: bool = False


def preferred_kernels(explicit: str | Sequence[str] | None = None) -> list[str]:
    """The user's order of preference: ``explicit`` or ``$LLMPRESS_KERNEL`` (comma-separated)."""
    spec = explicit if explicit is not None else os.environ.get(KERNEL_ENV, "")
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    return [n.strip() for n in names if n.strip()]


def offered_kernels(fmt: ModuleFormat, device: torch.device) -> list[Kernel]:
    """Every kernel the plugins offer for ``fmt`` on ``device``."""
    from llmpress.plugin_manager import get_plugin_manager

    offers = get_plugin_manager().hook.llmpress_export_kernel(fmt=fmt, device=device)
    return [k for offer in offers if offer for k in offer]


def choose_kernel(
    fmt: ModuleFormat, device: torch.device, prefer: str | Sequence[str] | None = None
) -> Kernel:
    """The kernel a layer of ``fmt`` on ``device`` runs with (see the module docstring)."""
    kernels = offered_kernels(fmt, device)
    if not kernels:
        raise CheckpointError(
            f"no kernel can run format {fmt.format!r} on {device}; is a kernel plugin disabled?"
        )
    by_name = {k.name: k for k in kernels}
    for name in preferred_kernels(prefer):
        if name in by_name:
            return by_name[name]
    return max(kernels, key=lambda k: k.priority)
