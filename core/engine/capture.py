"""Capture the inputs of the first block and run one block over all calibration batches."""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

log = logging.getLogger(__name__)


class _Stop(Exception):
    """Raised by the capture hook to end the model forward at the first block."""


@contextlib.contextmanager
def outside_blocks_on(model: nn.Module, block_prefix: str, device: torch.device) -> Iterator[None]:
    """Temporarily move every parameter and buffer *not* in the blocks to ``device``."""
    moved: list[tuple[torch.Tensor, torch.device]] = []
    prefix = block_prefix + "."
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        # offloaded weights (meta) are loaded by their accelerate hooks at each forward
        if not name.startswith(prefix) and t.device != device and t.device.type != "meta":
            moved.append((t, t.device))
            t.data = t.data.to(device)
    try:
        yield
    finally:
        for t, dev in moved:
            t.data = t.data.to(dev)


def _to_store(t: torch.Tensor, store: torch.device) -> torch.Tensor:
    """``t`` on ``store``; from a GPU to the CPU into pinned memory (asynchronously), so that it
    also goes back asynchronously."""
    if store.type == "cpu" and t.is_cuda:
        buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        return buf.copy_(t, non_blocking=True)
    return t.to(store)


def _sync(store: torch.device, compute: torch.device) -> None:
    """Wait for the asynchronous copies to pinned CPU memory before the CPU may read them."""
    if store.type == "cpu" and compute.type == "cuda":
        torch.cuda.synchronize(compute)


class BlockActivations:
    """Calibration activations flowing between blocks, one entry per batch.

    ``hidden[i]``: [B, L, d] input of the current block for batch ``i``; ``kwargs[i]``: the
    other arguments the model passed to its blocks (attention mask, position embeddings).
    ``store``: where activations rest between uses (the compute device, or CPU to offload:
    pinned memory, copied asynchronously, when the compute device is a GPU).
    """

    def __init__(self, store: torch.device, compute: torch.device) -> None:
        self.store = store
        self.compute = compute
        self.hidden: list[torch.Tensor] = []
        self.kwargs: list[dict[str, Any]] = []

    @torch.no_grad()
    def capture(
        self,
        model: nn.Module,
        first_block: nn.Module,
        ids: torch.Tensor,
        batch_size: int,
        progress: bool = False,
    ) -> None:
        """Run the model on ``ids`` [n, L] until its first block and keep that block's inputs."""

        def hook(mod: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            kw = dict(kwargs)
            x = args[0] if args else kw.pop("hidden_states")
            kw.pop("past_key_values", None)
            kw.pop("past_key_value", None)
            kw.pop("layer_past", None)
            kw["use_cache"] = False
            self.hidden.append(_to_store(x.detach(), self.store))
            self.kwargs.append(kw)
            raise _Stop

        handle = first_block.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            for batch in tqdm(ids.split(batch_size), desc="calibration batches", disable=not progress):
                with contextlib.suppress(_Stop):
                    model(input_ids=batch.to(self.compute), use_cache=False)
        finally:
            handle.remove()
            _sync(self.store, self.compute)

    @torch.no_grad()
    def run(self, block: nn.Module, *, keep_outputs: bool, on_batch: Any = None) -> None:
        """Run ``block`` over every batch; with ``keep_outputs`` the outputs become the inputs."""
        for i, x in enumerate(self.hidden):
            if on_batch is not None:
                on_batch()
            out = block(x.to(self.compute, non_blocking=True), **self.kwargs[i])
            if isinstance(out, (tuple, list)):
                out = out[0]
            if keep_outputs:
                self.hidden[i] = _to_store(out, self.store)
            del out
        _sync(self.store, self.compute)


class DenseStream:
    """The dense model's block inputs, next to the compressed model's (statistic ``dense_cross``).

    ``hidden[i]``: batch ``i``'s input of the current block in the *dense* model, stored like
    the compressed stream's (one more copy of the calibration activations); the other block
    arguments are the compressed stream's ``kwargs``. While a block is processed,
    :meth:`snapshot` keeps its weights as they were before any stage changed them (one
    block's weights) and the dense forwards run the block itself with them swapped in, so
    each dense forward costs one block forward.
    """

    def __init__(self, acts: BlockActivations) -> None:
        self.acts = acts
        self.hidden = [h.clone() for h in acts.hidden]
        self.weights: dict[str, torch.Tensor] | None = None

    def snapshot(self, block: nn.Module) -> None:
        """Keep ``block``'s dense weights (call before any stage changes it)."""
        named = itertools.chain(block.named_parameters(), block.named_buffers())
        self.weights = {k: t.detach().clone() for k, t in named}

    def _forward(self, block: nn.Module, i: int) -> torch.Tensor:
        if self.weights is None:
            raise RuntimeError("DenseStream: snapshot() the block before its dense forward")
        x = self.hidden[i].to(self.acts.compute, non_blocking=True)
        out = torch.func.functional_call(block, self.weights, (x,), self.acts.kwargs[i], strict=False)
        return out[0] if isinstance(out, (tuple, list)) else out

    @torch.no_grad()
    def layer_inputs(self, block: nn.Module, i: int, mods: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
        """Batch ``i``'s inputs of ``mods`` (submodules of ``block``, by name) in the dense block."""
        got: dict[str, torch.Tensor] = {}

        def make(name: str) -> Any:
            def hook(mod: nn.Module, args: tuple) -> None:
                got[name] = args[0].detach()

            return hook

        handles = [m.register_forward_pre_hook(make(n)) for n, m in mods.items()]
        try:
            self._forward(block, i)
        finally:
            for h in handles:
                h.remove()
        return got

    @torch.no_grad()
    def advance(self, block: nn.Module) -> None:
        """Run the dense block over every batch (its outputs are the next block's dense inputs)
        and drop its weights."""
        for i in range(len(self.hidden)):
            self.hidden[i] = _to_store(self._forward(block, i), self.acts.store)
        _sync(self.acts.store, self.acts.compute)
        self.weights = None
