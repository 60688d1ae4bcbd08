"""Prunable structures of a transformer block, found from its module graph.

No per-model tables: within each submodule that directly owns linear layers, the layers are
read in registration order and matched by shape.

* **Attention heads**: a submodule owning at least three linears ``p_1 .. p_k, c`` where every
  producer ``p`` reads the block's hidden size and the consumer ``c`` (the last) reads
  ``p_1``'s output width. ``head_dim`` comes from the module (or the model config); producers
  whose output is ``n_heads * head_dim`` are the query projections, the others
  (``n_kv * head_dim``) key/value. Query head ``h`` uses key/value head ``h // g`` with
  ``g = n_heads / n_kv`` (transformers' ``repeat_kv`` layout).
* **MLP neurons**: a submodule (or the block itself, as in OPT) owning one or two producers
  and one consumer whose input width is the producers' output width (``gate/up -> down``,
  ``fc1 -> fc2``). Every such submodule is one MLP: a mixture-of-experts block (experts
  unfused, :mod:`llmpress.model.moe`) has one per expert, and its shared expert's.

Fused projections (``qkv_proj``) cannot be split this way and raise :class:`ModelError`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from llmpress.errors import ModelError
from llmpress.model.modules import in_out_features, is_linear

STRUCTURES = ("heads", "neurons", "hidden")
#: attention-module attributes that follow the number of heads
HEAD_ATTRIBUTES = ("num_key_value_groups", "num_heads", "num_key_value_heads")


@dataclasses.dataclass(frozen=True)
class HeadStructure:
    """The heads of one attention module (names relative to the block)."""

    module: str
    q: tuple[str, ...]
    kv: tuple[str, ...]
    o: str
    head_dim: int
    n_heads: int
    n_kv: int

    @property
    def group(self) -> int:
        """Query heads per key/value head."""
        return self.n_heads // self.n_kv

    def q_channels(self, heads: torch.Tensor) -> torch.Tensor:
        """Rows of the query projections (= columns of ``o``) of these query heads."""
        return (heads.view(-1, 1) * self.head_dim + torch.arange(self.head_dim)).flatten()

    def kv_channels(self, kv_heads: torch.Tensor) -> torch.Tensor:
        """Rows of the key/value projections of these key/value heads."""
        return (kv_heads.view(-1, 1) * self.head_dim + torch.arange(self.head_dim)).flatten()


@dataclasses.dataclass(frozen=True)
class NeuronStructure:
    """The neurons of one MLP: rows of ``producers`` = columns of ``consumer``."""

    module: str
    producers: tuple[str, ...]
    consumer: str
    width: int


@dataclasses.dataclass(frozen=True)
class BlockStructures:
    """The block's attention heads and its MLPs (several in a mixture-of-experts block: each
    expert, then the shared expert, in registration order; empty: no MLP)."""

    heads: HeadStructure | None
    neurons: tuple[NeuronStructure, ...] = ()

    @property
    def width(self) -> int:
        """Neurons of all the block's MLPs."""
        return sum(n.width for n in self.neurons)


def _owners(block: nn.Module) -> dict[str, list[tuple[str, nn.Module]]]:
    """Linears grouped by the submodule that directly owns them, in registration order."""
    out: dict[str, list[tuple[str, nn.Module]]] = {}
    for name, mod in block.named_modules():
        if is_linear(mod):
            owner = name.rpartition(".")[0]
            out.setdefault(owner, []).append((name, mod))
    return out


def _head_dim(attn: nn.Module, model_config: Any, q_out: int, where: str) -> int:
    hd = getattr(attn, "head_dim", None)
    if not isinstance(hd, int):
        hd = getattr(model_config, "head_dim", None)
    if not isinstance(hd, int):
        n = getattr(model_config, "num_attention_heads", None)
        hidden = getattr(model_config, "hidden_size", None)
        hd = hidden // n if isinstance(n, int) and isinstance(hidden, int) and n else None
    if not isinstance(hd, int) or hd <= 0 or q_out % hd:
        raise ModelError(f"{where}: cannot find the head dimension of the attention module (head_dim)")
    return hd


def discover(block: nn.Module, model_config: Any, hidden: int, where: str = "block") -> BlockStructures:
    """Find the attention heads and MLP neurons of ``block`` (hidden size ``hidden``)."""
    heads: HeadStructure | None = None
    neurons: list[NeuronStructure] = []
    for owner, lins in _owners(block).items():
        shapes = [in_out_features(m) for _, m in lins]  # (in, out)
        *prod, (c_name, _) = lins
        c_in = shapes[-1][0]
        if not prod or any(s[0] != hidden for s in shapes[:-1]) or shapes[-1][1] != hidden:
            continue
        names = tuple(n for n, _ in prod)
        outs = [s[1] for s in shapes[:-1]]
        if len(prod) >= 3 and outs[0] == c_in:
            attn = block.get_submodule(owner) if owner else block
            hd = _head_dim(attn, model_config, c_in, f"{where}.{owner}")
            q = tuple(n for n, o in zip(names, outs) if o == c_in)
            kv = tuple(n for n, o in zip(names, outs) if o != c_in)
            if not kv:  # multi-head attention: q, k, v all as wide as o's input
                q, kv = names[:1], names[1:]
            kv_out = {o for n, o in zip(names, outs) if n in kv}
            if len(kv_out) != 1 or next(iter(kv_out)) % hd:
                raise ModelError(f"{where}.{owner}: cannot resolve the key/value projections {kv}")
            n_heads, n_kv = c_in // hd, next(iter(kv_out)) // hd
            if n_heads % n_kv:
                raise ModelError(
                    f"{where}.{owner}: {n_heads} query heads do not split into {n_kv} key/value groups"
                )
            heads = HeadStructure(owner, q, kv, c_name, hd, n_heads, n_kv)
        elif len(prod) <= 2 and all(o == c_in for o in outs):
            neurons.append(NeuronStructure(owner, names, c_name, c_in))
    if heads is None and not neurons:
        raise ModelError(
            f"{where}: no attention heads or MLP neurons found (fused projections such as qkv_proj "
            f"are not supported); this architecture's coupling cannot be resolved"
        )
    return BlockStructures(heads, tuple(neurons))


def require(structs: BlockStructures, wanted: tuple[str, ...], where: str) -> None:
    """Raise :class:`ModelError` when a requested structure is not in the block."""
    if "heads" in wanted and structs.heads is None:
        raise ModelError(f"{where}: structure 'heads' asked for, but no attention heads were found")
    if "neurons" in wanted and not structs.neurons:
        raise ModelError(f"{where}: structure 'neurons' asked for, but no MLP was found")


def block_widths(model: nn.Module) -> list[dict[str, int]] | None:
    """Per block: query heads, key/value heads and MLP neurons (of all its MLPs; a block with
    several, mixture-of-experts, also gives each MLP's as ``neurons:<module>``), ``None`` if
    the blocks' structures cannot be found."""
    from llmpress.model.modules import find_blocks

    config = getattr(model, "config", None)
    hidden = getattr(config, "hidden_size", None)
    if not isinstance(hidden, int):
        return None
    try:
        _, blocks = find_blocks(model)
        out = []
        for b in blocks:
            s = discover(b, config, hidden)
            row: dict[str, int] = {}
            if s.heads is not None:
                row.update(heads=s.heads.n_heads, kv_heads=s.heads.n_kv)
            if s.neurons:
                row["neurons"] = s.width
            if len(s.neurons) > 1:
                row.update({f"neurons:{n.module}": n.width for n in s.neurons})
            out.append(row)
        return out
    except ModelError:
        return None
