"""Kernels: how a packed layer computes, chosen once per layer when a model is loaded.

A :class:`Kernel` declares the formats (names of the format registry,
:data:`llmpress.format.formats.FORMATS`) and device types it runs, plus an optional finer
``supports`` check (bit widths, group sizes, GPU capability). Plugins register kernels with
``llmpress_register_kernels(register)``; the plugin manager collects them once into a
:class:`KernelTable` keyed by format. The format layer never imports the plugin manager: it
receives a :data:`KernelSource` by injection (:func:`install_kernel_source`, called from
``llmpress/__init__.py``) or as an argument.

The runtime takes the kernel named by the user (``LLMPRESS_KERNEL=name[,name...]``, an order
of preference, or :func:`llmpress.format.runtime.select_kernels`), else the candidate with the
highest ``priority``. ``prepare`` repacks the stored tensors once into the kernel's layout;
``forward`` computes ``x @ W^T`` (without bias).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from llmpress.errors import CheckpointError

if TYPE_CHECKING:
    from llmpress.format.formats import ModuleFormat
    from llmpress.format.runtime import LlmpressLinear

KERNEL_ENV = "LLMPRESS_KERNEL"


def _always(fmt: ModuleFormat, device: torch.device) -> bool:
    return True


@dataclasses.dataclass(frozen=True)
class Kernel:
    """A way to run packed layers of the declared ``formats`` on the declared ``devices``.

    ``formats``: format names it runs (``int``, ``2:4``, ...); ``devices``: device types
    (``cpu``, ``cuda``; ``None``: any); ``supports(fmt, device)``: the finer check within those (bit widths,
    group sizes, capability), default: all of them.
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
    formats: frozenset[str] = frozenset()
    devices: frozenset[str] | None = None
    supports: Callable[[ModuleFormat, torch.device], bool] = _always

    def runs(self, fmt: ModuleFormat, device: torch.device) -> bool:
        """Whether this kernel can run a layer of ``fmt`` on ``device``."""
        return (
            fmt.format in self.formats
            and (self.devices is None or device.type in self.devices)
            and self.supports(fmt, device)
        )


#: what ``llmpress_register_kernels`` receives: ``register(kernel)``
KernelRegistrar = Callable[[Kernel], None]

#: where kernels come from: ``(fmt, device) -> candidates`` (e.g. ``Llmpress.kernels_for``)
KernelSource = Callable[["ModuleFormat", torch.device], Sequence[Kernel]]


class KernelTable:
    """Kernels keyed by the format names they declare (built once by the plugin manager)."""

    def __init__(self, kernels: Iterable[Kernel] = (), known_formats: Iterable[str] = ()) -> None:
        #: the format registry's names (given by the caller: kernels sit below the format layer)
        self.known = frozenset(known_formats)
        self.by_format: dict[str, list[Kernel]] = {}
        for k in kernels:
            self.add(k)

    def add(self, kernel: Kernel) -> None:
        """Add ``kernel`` under every format it declares; a format it names must be registered."""
        unknown = sorted(set(kernel.formats) - self.known) if self.known else []
        if not kernel.formats or unknown:
            raise ValueError(
                f"kernel {kernel.name!r} declares unknown formats {unknown or '(none)'}; "
                f"known: {', '.join(sorted(self.known))}"
            )
        for name in sorted(kernel.formats):
            entries = self.by_format.setdefault(name, [])
            if any(k.name == kernel.name for k in entries):
                raise ValueError(f"kernel {kernel.name!r} registered twice for format {name!r}")
            entries.append(kernel)

    def candidates(self, fmt: ModuleFormat, device: torch.device) -> list[Kernel]:
        """The kernels that can run a layer of ``fmt`` on ``device``."""
        return [k for k in self.by_format.get(fmt.format, ()) if k.runs(fmt, device)]


_installed: KernelSource | None = None


def install_kernel_source(source: KernelSource | None) -> None:
    """Set the default kernel source of the format layer (done once by ``import llmpress``)."""
    global _installed
    _installed = source


def preferred_kernels(explicit: str | Sequence[str] | None = None) -> list[str]:
    """The user's order of preference: ``explicit`` or ``$LLMPRESS_KERNEL`` (comma-separated)."""
    spec = explicit if explicit is not None else os.environ.get(KERNEL_ENV, "")
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    return [n.strip() for n in names if n.strip()]


def offered_kernels(
    fmt: ModuleFormat, device: torch.device, source: KernelSource | None = None
) -> list[Kernel]:
    """Every kernel ``source`` (default: the installed one) offers for ``fmt`` on ``device``."""
    source = source or _installed
    if source is None:
        raise CheckpointError("no kernel source installed; `import llmpress` installs the plugins' kernels")
    return list(source(fmt, device))


def choose_kernel(
    fmt: ModuleFormat,
    device: torch.device,
    prefer: str | Sequence[str] | None = None,
    source: KernelSource | None = None,
) -> Kernel:
    """The kernel a layer of ``fmt`` on ``device`` runs with (see the module docstring)."""
    kernels = offered_kernels(fmt, device, source)
    if not kernels:
        raise CheckpointError(
            f"no kernel can run format {fmt.format!r} on {device}; is a kernel plugin disabled?"
        )
    by_name = {k.name: k for k in kernels}
    for name in preferred_kernels(prefer):
        if name in by_name:
            return by_name[name]
    return max(kernels, key=lambda k: k.priority)
