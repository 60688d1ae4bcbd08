"""Block dropping: the units (blocks or attention/MLP sub-blocks), their influence, and the
dropped model.

Dropping whole blocks gives a plain architecture with fewer layers: the blocks are removed
from the model's ``ModuleList``, every ``layer_idx`` is renumbered (so the KV cache of
``generate`` works) and the config's ``num_hidden_layers`` (and ``layer_types``) shrink, so
plain ``from_pretrained`` loads the saved folder. Dropped sub-blocks become
:class:`~llmpress.structure.blocks.DroppedModule` (saved as ``dropped`` entries).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from llmpress.errors import ModelError
from llmpress.model.dropped import DroppedModule
from llmpress.model.modules import find_blocks

log = logging.getLogger(__name__)


class SkipBlock(nn.Module):
    """A block that passes its input through (as a tuple when the real block returns one)."""

    def __init__(self, as_tuple: bool) -> None:
        super().__init__()
        self.as_tuple = as_tuple

    def forward(self, hidden_states: torch.Tensor | None = None, *args: Any, **kwargs: Any) -> Any:
        return (hidden_states,) if self.as_tuple else hidden_states


def sub_block_names(block: nn.Module) -> tuple[str, str]:
    """Names of a block's attention and MLP children (``self_attn``, ``mlp`` in Llama)."""
    attn = mlp = None
    for name, child in block.named_children():
        low, cls = name.lower(), type(child).__name__.lower()
        if attn is None and ("attn" in low or "attention" in low or "attention" in cls):
            attn = name
        elif mlp is None and ("mlp" in low or "feed_forward" in low or "ffn" in low or "mlp" in cls):
            mlp = name
    if attn is None or mlp is None:
        raise ModelError(f"{type(block).__name__}: cannot find its attention and MLP sub-blocks to drop")
    return attn, mlp


def drop_units(model: nn.Module, granularity: str) -> list[str]:
    """Qualified names of the droppable units: blocks, or attention and MLP sub-blocks."""
    prefix, blocks = find_blocks(model)
    if granularity == "block":
        return [f"{prefix}.{i}" for i in range(len(blocks))]
    out = []
    for i, b in enumerate(blocks):
        out += [f"{prefix}.{i}.{n}" for n in sub_block_names(b)]
    return out


def _hidden(args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _one_minus_cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Sum over tokens of ``1 - cos(a_t, b_t)``; a, b: [B, L, d]."""
    return (1 - F.cosine_similarity(a.float(), b.float(), dim=-1)).sum()


@contextlib.contextmanager
def influence_hooks(
    model: nn.Module, granularity: str
) -> Iterator[tuple[list[float], list[int], list[bool]]]:
    """While active, every forward adds each unit's ShortGPT block influence (sum over tokens
    of ``1 - cos(input, output)`` of the residual stream across the unit) to ``sums``;
    ``tokens[0]`` counts tokens; ``as_tuple[0]`` says whether blocks return tuples."""
    _, blocks = find_blocks(model)
    n_units = len(blocks) * (1 if granularity == "block" else 2)
    sums, tokens, as_tuple = [0.0] * n_units, [0], [False]
    handles = []
    state: dict[int, torch.Tensor] = {}

    def pre(i: int):  # noqa: ANN202
        def hook(mod: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            state[i] = _hidden(args, kwargs).detach()

        return hook

    def post(i: int):  # noqa: ANN202
        def hook(mod: nn.Module, args: tuple, kwargs: dict[str, Any], out: Any) -> None:
            x, y = state.pop(i), _first(out).detach()
            if i == 0:
                tokens[0] += x.shape[0] * x.shape[1]
                as_tuple[0] = isinstance(out, (tuple, list))
            if granularity == "block":
                sums[i] += float(_one_minus_cos(x, y))
            else:
                mid = x + state.pop(-1 - i)  # after attention: input + attention output
                sums[2 * i] += float(_one_minus_cos(x, mid))
                sums[2 * i + 1] += float(_one_minus_cos(mid, y))

        return hook

    def attn_out(i: int):  # noqa: ANN202
        def hook(mod: nn.Module, args: tuple, out: Any) -> None:
            state[-1 - i] = _first(out).detach()

        return hook

    for i, b in enumerate(blocks):
        handles.append(b.register_forward_pre_hook(pre(i), with_kwargs=True))
        handles.append(b.register_forward_hook(post(i), with_kwargs=True))
        if granularity != "block":
            handles.append(b.get_submodule(sub_block_names(b)[0]).register_forward_hook(attn_out(i)))
    try:
        yield sums, tokens, as_tuple
    finally:
        for h in handles:
            h.remove()


def remove_blocks(model: nn.Module, drop: Sequence[int]) -> None:
    """Remove blocks ``drop`` (indices) from ``model`` in place and renumber the rest."""
    prefix, blocks = find_blocks(model)
    gone = set(int(i) for i in drop)
    kept = nn.ModuleList([b for i, b in enumerate(blocks) if i not in gone])
    owner, _, child = prefix.rpartition(".")
    setattr(model.get_submodule(owner) if owner else model, child, kept)
    for new_i, b in enumerate(kept):
        for m in b.modules():
            if hasattr(m, "layer_idx"):
                setattr(m, "layer_idx", new_i)  # noqa: B010 - the attention reads its cache slot here
    cfg = getattr(model, "config", None)
    if cfg is not None:
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            if isinstance(getattr(cfg, key, None), int) and getattr(cfg, key) == len(blocks):
                setattr(cfg, key, len(kept))
        types = getattr(cfg, "layer_types", None)
        if isinstance(types, list) and len(types) == len(blocks):
            cfg.layer_types = [t for i, t in enumerate(types) if i not in gone]
    log.info("dropped blocks %s; %d blocks remain", sorted(gone), len(kept))


def drop_sub_blocks(model: nn.Module, names: Sequence[str]) -> None:
    """Replace the sub-blocks ``names`` (qualified) by :class:`DroppedModule`."""
    for name in names:
        owner, _, child = name.rpartition(".")
        parent = model.get_submodule(owner)
        attn, _ = sub_block_names(parent)
        setattr(parent, child, DroppedModule("attention" if child == attn else "mlp"))
