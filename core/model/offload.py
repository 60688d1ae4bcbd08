"""Blocks of models bigger than the GPU: onload one block, compress it, write it back.

A model dispatched by accelerate (``device_map="auto"``, ``cpu_offload``, ``disk_offload``,
an ``offload_folder``) keeps offloaded weights on the ``meta`` device and loads them from a
weights map (CPU tensors or memory-mapped files) at each forward through an
``AlignDevicesHook``. :func:`onload` loads a block with accelerate's
``align_module_device``, keeps the hooks from reloading the stored (uncompressed) weights
while the block is compressed and re-run, and writes the changed weights back to the
storage the hooks read from, so the compressed model runs and saves like the original.
Blocks without hooks simply move to the compute device and back.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from llmpress.errors import ModelError

log = logging.getLogger(__name__)


def _align_hook(module: nn.Module) -> Any:
    """The module's accelerate ``AlignDevicesHook`` (also inside a ``SequentialHook``), or None."""
    from accelerate.hooks import AlignDevicesHook, SequentialHook

    hook = getattr(module, "_hf_hook", None)
    if isinstance(hook, SequentialHook):
        hook = next((h for h in hook.hooks if isinstance(h, AlignDevicesHook)), None)
    return hook if isinstance(hook, AlignDevicesHook) else None


def is_dispatched(module: nn.Module) -> bool:
    """True if any submodule carries an accelerate device hook (a dispatched/offloaded model)."""
    try:
        return any(_align_hook(m) is not None for m in module.modules())
    except ImportError:  # pragma: no cover - accelerate is a dependency of transformers' dispatch
        return False


def execution_device(model: nn.Module) -> torch.device | None:
    """Where a dispatched model computes (its hooks' execution device), ``None`` if not dispatched."""
    for m in model.modules():
        hook = _align_hook(m)
        dev = getattr(hook, "execution_device", None)
        if dev is not None:
            return torch.device(dev) if not isinstance(dev, int) else torch.device("cuda", dev)
    return None


def _store(weights_map: Any, key: str, value: torch.Tensor) -> None:
    """Write ``value`` under ``key`` where accelerate's hooks read it from."""
    from accelerate.utils import OffloadedWeightsLoader, PrefixedDataset, offload_weight

    if isinstance(weights_map, PrefixedDataset):
        _store(weights_map.dataset, f"{weights_map.prefix}{key}", value)
    elif isinstance(weights_map, OffloadedWeightsLoader):
        if key in weights_map.state_dict or weights_map.save_folder is None:
            _store(weights_map.state_dict, key, value)
        else:  # memory-mapped (or read from the checkpoint): our copy in the offload folder
            offload_weight(value.detach().cpu(), key, weights_map.save_folder, index=weights_map.index)
            if key not in weights_map.all_keys:
                weights_map.all_keys.append(key)
    elif isinstance(weights_map, dict):
        old = weights_map.get(key)
        if (
            old is not None
            and old.shape == value.shape
            and old.dtype == value.dtype
            and old.device.type != "meta"
        ):
            if old.data_ptr() != value.data_ptr():
                old.copy_(value)
        else:
            weights_map[key] = value.detach().to("cpu" if old is None else old.device)
    elif isinstance(weights_map, Mapping):
        raise ModelError(
            f"cannot write the compressed {key} back into accelerate's weights map "
            f"({type(weights_map).__name__}); load the model with device_map and an offload_folder"
        )


@contextlib.contextmanager
def _hold(module: nn.Module, write_back: bool) -> Iterator[None]:
    """While onloaded: forwards use the onloaded weights (no reload from the map); on exit the
    module's own tensors are written back to the map (``write_back``)."""
    from accelerate.utils.modeling import named_module_tensors

    hook = _align_hook(module)
    offload = hook.offload
    hook.offload = False
    ok = False
    try:
        yield
        ok = True
    finally:
        hook.offload = offload
        if ok and write_back and offload:
            with torch.no_grad():
                for name, t in named_module_tensors(
                    module,
                    include_buffers=hook.offload_buffers,
                    recurse=hook.place_submodules,
                    remove_non_persistent=True,
                ):
                    _store(hook.weights_map, name, t)


@contextlib.contextmanager
def _execution_device(module: nn.Module, dev: torch.device) -> Iterator[None]:
    hook = _align_hook(module)
    old = hook.execution_device
    hook.execution_device = dev
    try:
        yield
    finally:
        hook.execution_device = old


def _check_materialized(block: nn.Module) -> None:
    meta = [
        n for n, t in list(block.named_parameters()) + list(block.named_buffers()) if t.device.type == "meta"
    ]
    if meta:
        raise ModelError(
            f"weights {meta[:3]} are on the meta device with no accelerate offload hook; load the model "
            f"with device_map (and offload_folder) or materialize it before compressing"
        )


def _home(block: nn.Module) -> torch.device:
    try:
        return next(block.parameters()).device
    except StopIteration:  # pragma: no cover
        return torch.device("cpu")


@contextlib.contextmanager
def onload(block: nn.Module, dev: torch.device, write_back: bool = True) -> Iterator[nn.Module]:
    """``block`` on ``dev`` for the duration; afterwards back where it was, with its (changed)
    weights written back to their offload storage when ``write_back``."""
    if not is_dispatched(block):
        _check_materialized(block)
        home = _home(block)
        block.to(dev)
        try:
            yield block
        finally:
            block.to(home)
        return
    from accelerate.utils import align_module_device, has_offloaded_params

    with contextlib.ExitStack() as stack:
        for m in block.modules():
            hooked = _align_hook(m) is not None
            if hooked:
                stack.enter_context(_execution_device(m, dev))
            if has_offloaded_params(m):
                stack.enter_context(align_module_device(m, dev))  # loads from the map; meta again on exit
                stack.enter_context(_hold(m, write_back))
            elif any(True for _ in m.parameters(recurse=False)):
                stack.enter_context(align_module_device(m, dev))  # moves there and back (keeps changes)
        _check_materialized(block)
        yield block


def module_tensors(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` of ``module``'s state dict, one at a time: offloaded (``meta``)
    weights are read from the storage accelerate's hooks read them from (for streaming saves)."""
    mods = dict(module.named_modules())
    for key, t in module.state_dict(keep_vars=True).items():
        if t.device.type == "meta":
            t = stored_tensor(mods, key)
        yield key, t.detach()


def stored_tensor(mods: dict[str, nn.Module], key: str) -> torch.Tensor:
    """The tensor ``key`` (offloaded, on ``meta`` in the model) read from the storage of the
    accelerate hook of its closest offloaded ancestor in ``mods`` (``named_modules()``)."""
    from accelerate.utils import has_offloaded_params

    parts = key.split(".")
    for cut in range(len(parts) - 1, -1, -1):
        owner = ".".join(parts[:cut])
        m = mods.get(owner)
        if m is not None and has_offloaded_params(m):
            return _align_hook(m).weights_map[".".join(parts[cut:])]
    raise ModelError(f"{key} is on the meta device and no accelerate offload hook stores it")
