"""Hidden (embedding) channels: the residual-stream width, pruned across the whole model.

A hidden channel ``j`` is one coordinate of the residual stream. It runs through the token
(and position) embeddings' column ``j``, every norm's weight and bias ``j``, input column
``j`` of every linear reading the stream (``q/k/v_proj``, ``gate/up_proj``, the LM head) and
output row ``j`` of every linear writing it (``o_proj``, ``down_proj``). Removing channels
slices all of them at once (a tied LM head follows its embedding) and sets the config's
``hidden_size``, so the saved config describes the smaller model and plain transformers
rebuilds it. RMS norms, which now average over fewer channels, get their weight scaled by
``sqrt(old / new)`` so that removing a channel equals zeroing it in the residual stream.

:func:`hidden_coupling` finds these tensors from the module graph: inside each block from its
attention heads and MLP (:mod:`llmpress.model.structures`), outside from the shapes (embeddings,
norms, linears with one side of the hidden width). Anything else of the hidden width, such
as a square hidden-by-hidden linear outside the blocks (BERT's pooler), cannot be resolved
and raises :class:`ModelError`. :func:`check_hidden_prunable` also refuses architectures
whose attention derives ``head_dim`` from ``hidden_size`` (OPT, GPT-2): their pruned
checkpoint would not rebuild from its config.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig

from llmpress.errors import ModelError
from llmpress.math.structured_math import reconstruct
from llmpress.model.modules import find_blocks, get_weight, is_linear
from llmpress.model.results import LayerResult
from llmpress.model.structures import discover

log = logging.getLogger(__name__)

#: module attributes holding the hidden width that are rewritten with it
_WIDTH_ATTRS = ("hidden_size", "embed_dim")
#: config keys that follow ``hidden_size`` when they equal it
_CONFIG_KEYS = ("hidden_size", "word_embed_proj_dim")


@dataclasses.dataclass(frozen=True)
class HiddenCoupling:
    """Where the hidden width ``size`` lives (qualified module names)."""

    size: int
    #: linears whose input columns are hidden channels
    columns: tuple[str, ...]
    #: linears whose output rows (and bias) are hidden channels
    rows: tuple[str, ...]
    #: modules whose 1-D parameters (norm weight, bias) are hidden channels
    vectors: tuple[str, ...]
    #: embeddings whose columns are hidden channels
    embeddings: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class PruneHidden:
    """A whole-model change: keep these hidden channels (int64 indices). ``hessians``: for
    readers of the stream (qualified names) their inputs' ``E[x x^T]`` [hidden, hidden] on the
    dense model; those readers get the least-squares weights for the kept inputs
    (:func:`llmpress.math.structured_math.reconstruct`) instead of their sliced columns."""

    keep: torch.Tensor
    hessians: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)

    def kept(self) -> torch.Tensor:
        """The kept channels, sorted and unique (int64, CPU)."""
        return torch.sort(self.keep.to(torch.int64).cpu().unique()).values


def hidden_size(model: nn.Module) -> int:
    size = getattr(getattr(model, "config", None), "hidden_size", None)
    if not isinstance(size, int):
        raise ModelError(f"{type(model).__name__}: the model config has no hidden_size")
    return size


def _params_with(module: nn.Module, size: int) -> list[tuple[str, torch.Tensor]]:
    return [(n, p) for n, p in module.named_parameters(recurse=False) if size in p.shape]


def _block_coupling(block: nn.Module, name: str, config: Any, size: int) -> tuple[list[str], ...]:
    """(columns, rows, vectors) of one block, names relative to the block."""
    s = discover(block, config, size, name)
    cols: list[str] = []
    rows: list[str] = []
    if s.heads is not None:
        cols += [*s.heads.q, *s.heads.kv]
        rows.append(s.heads.o)
    for n in s.neurons:
        cols += list(n.producers)
        rows.append(n.consumer)
    vectors: list[str] = []
    for rel, mod in block.named_modules():
        if is_linear(mod):
            if rel not in cols and rel not in rows and size in get_weight(mod).shape[1:]:
                raise ModelError(f"{name}.{rel}: reads the hidden stream but is not a head or MLP projection")
            continue
        params = _params_with(mod, size)
        if any(p.dim() != 1 for _, p in params):
            raise ModelError(
                f"{name}.{rel}: a {type(mod).__name__} of the hidden width that cannot be resolved"
            )
        if params:
            vectors.append(rel)
    return cols, rows, vectors


def hidden_coupling(model: nn.Module) -> HiddenCoupling:
    """Every tensor carrying the hidden width of ``model``; raises :class:`ModelError` when
    one cannot be resolved."""
    size = hidden_size(model)
    config = getattr(model, "config", None)
    prefix, blocks = find_blocks(model)
    cols: list[str] = []
    rows: list[str] = []
    vectors: list[str] = []
    for i, block in enumerate(blocks):
        c, r, v = _block_coupling(block, f"{prefix}.{i}", config, size)
        cols += [f"{prefix}.{i}.{n}" for n in c]
        rows += [f"{prefix}.{i}.{n}" for n in r]
        vectors += [f"{prefix}.{i}.{n}" for n in v]
    embeddings: list[str] = []
    for name, mod in model.named_modules():
        if name == prefix or name.startswith(prefix + "."):
            continue
        if isinstance(mod, nn.Embedding):
            if mod.embedding_dim == size:
                embeddings.append(name)
            continue
        if isinstance(mod, nn.Linear):
            out_f, in_f = mod.weight.shape
            if in_f == size and out_f == size:
                raise ModelError(
                    f"{name}: a {size}x{size} linear outside the blocks; its output is not the hidden "
                    f"stream, so the hidden channels' coupling cannot be resolved (prune heads/neurons)"
                )
            if in_f == size:
                cols.append(name)
            elif out_f == size:
                rows.append(name)
            continue
        params = _params_with(mod, size)
        if any(p.dim() != 1 for _, p in params) or (is_linear(mod) and params):
            raise ModelError(f"{name}: a {type(mod).__name__} of the hidden width that cannot be resolved")
        if params:
            vectors.append(name)
    if not embeddings:
        raise ModelError(f"{type(model).__name__}: no token embedding of the hidden width {size} was found")
    return HiddenCoupling(size, tuple(cols), tuple(rows), tuple(vectors), tuple(embeddings))


def block_hidden_cost(block: nn.Module, name: str, config: Any, size: int) -> int:
    """Parameters of one block (qualified ``name``) that one hidden channel holds."""
    cols, rows, vectors = _block_coupling(block, name, config, size)
    cost = sum(get_weight(block.get_submodule(c)).shape[0] for c in cols)
    for r in rows:
        mod = block.get_submodule(r)
        cost += get_weight(mod).shape[1] + int(isinstance(getattr(mod, "bias", None), torch.Tensor))
    for v in vectors:
        cost += sum(1 for _ in _params_with(block.get_submodule(v), size))
    return cost


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {n: tuple(get_weight(m).shape) for n, m in model.named_modules() if is_linear(m)}


def _skeleton(model: nn.Module, config: Any) -> nn.Module:
    with torch.device("meta"):
        return type(model)(config)


def hidden_config(model: nn.Module, new_size: int) -> PretrainedConfig:
    """A copy of the model's config describing hidden width ``new_size`` (``head_dim`` made
    explicit so that attention keeps its width)."""
    config: PretrainedConfig = copy.deepcopy(model.config)  # type: ignore[assignment]
    old = hidden_size(model)
    if not isinstance(getattr(config, "head_dim", None), int):
        dims = {getattr(m, "head_dim", 0) for m in model.modules()} - {0}
        dims = {d for d in dims if isinstance(d, int)}
        if len(dims) == 1:
            config.head_dim = dims.pop()
    for key in _CONFIG_KEYS:
        if getattr(config, key, None) == old:
            setattr(config, key, new_size)
    return config


def _config_accepts(config: PretrainedConfig, size: int) -> bool:
    hf_config: PretrainedConfig = copy.deepcopy(config)
    for key in _CONFIG_KEYS:
        if getattr(hf_config, key, None) == config.hidden_size:
            setattr(hf_config, key, size)
    try:
        validate = getattr(hf_config, "validate", None)
        if callable(validate):
            validate()
    except Exception:  # noqa: BLE001 - the config class refuses this width
        return False
    return True


_STEPS: dict[tuple[int, int], tuple[Any, int]] = {}


def hidden_step(config: Any) -> int:
    """The smallest number of hidden channels the config accepts removing at a time (Llama's
    config wants ``hidden_size`` a multiple of ``num_attention_heads``; most accept any)."""
    size = int(config.hidden_size)
    key = (id(config), size)  # pruning changes the config's hidden_size in place
    hit = _STEPS.get(key)
    if hit is not None and hit[0] is config:
        return hit[1]
    step = next((s for s in range(1, size) if _config_accepts(config, size - s)), size)
    _STEPS.clear()
    _STEPS[key] = (config, step)
    return step


def check_hidden_prunable(model: nn.Module) -> HiddenCoupling:
    """The coupling, after checking that a config with a smaller ``hidden_size`` rebuilds every
    linear with only its hidden sides changed (else the pruned checkpoint could not load)."""
    coupling = hidden_coupling(model)
    size = coupling.size
    step = hidden_step(model.config)
    if step >= size:
        raise ModelError(
            f"{type(model).__name__}: its config accepts no smaller hidden_size; cannot prune hidden"
        )
    new = size - step * max(1, size // 4 // step)
    try:
        skel = _skeleton(model, hidden_config(model, new))
    except Exception as e:  # noqa: BLE001 - the class refuses the smaller width
        raise ModelError(
            f"{type(model).__name__} cannot be built with a smaller hidden_size ({e}); "
            f"structure 'hidden' is not supported for it"
        ) from e
    cols, rows = set(coupling.columns), set(coupling.rows)
    have = _shapes(skel)
    for name, (out_f, in_f) in _shapes(model).items():
        want = (new if name in rows else out_f, new if name in cols else in_f)
        if have.get(name) != want:
            raise ModelError(
                f"{name}: with hidden_size {new} {type(model).__name__} builds it as {have.get(name)}, not "
                f"{want}: its attention width follows hidden_size, so a model with pruned hidden channels "
                f"would not reload; prune heads and neurons instead"
            )
    return coupling


def _slice(t: torch.Tensor, dim: int, keep: torch.Tensor) -> None:
    t.data = t.data.index_select(dim, keep.to(t.device)).contiguous()


def _set_width_attrs(mod: nn.Module, old: int, new: int) -> None:
    for attr in _WIDTH_ATTRS:
        if getattr(mod, attr, None) == old:
            setattr(mod, attr, new)
    if tuple(getattr(mod, "normalized_shape", ()) or ()) == (old,):
        mod.normalized_shape = (new,)  # type: ignore[assignment]


@torch.no_grad()
def _rescale_norm(mod: nn.Module, name: str, old: int, new: int) -> None:
    """Scale an RMS norm's weight by ``sqrt(old / new)``: it now averages over ``new``
    channels, and with the scale its output equals the dense model's with the removed
    channels zeroed in the residual stream (exactly, up to ``eps``). Norms with a bias
    (LayerNorm: its mean changes too) or not linear in their weight (Gemma's ``1 + w``) are
    left as they are."""
    w = getattr(mod, "weight", None)
    if (
        not isinstance(w, nn.Parameter)
        or w.dim() != 1
        or isinstance(getattr(mod, "bias", None), torch.Tensor)
    ):
        return
    x = torch.randn(2, new, generator=torch.Generator().manual_seed(0)).to(w)
    try:
        y = mod(x)
        w.mul_(2.0)
        linear = torch.allclose(mod(x), 2 * y, rtol=1e-3, atol=1e-5)
        w.div_(2.0)
    except Exception:  # noqa: BLE001 - a norm that does not take a plain [.., width] input
        linear = False
    if not linear:
        log.warning(
            "%s: %s is not linear in its weight; its scale is not compensated", name, type(mod).__name__
        )
        return
    w.mul_((old / new) ** 0.5)


@torch.no_grad()
def prune_hidden(model: nn.Module, change: PruneHidden) -> dict[str, LayerResult]:
    """Keep ``change.keep`` hidden channels everywhere; set the config's ``hidden_size``.
    Returns the per-linear results (removed rows or columns) for the caller to record."""
    coupling = check_hidden_prunable(model)
    old = coupling.size
    keep = change.kept()
    if keep.numel() == 0 or int(keep[0]) < 0 or int(keep[-1]) >= old:
        raise ModelError(f"kept hidden channels must be indices in [0, {old}) and not empty")
    new = int(keep.numel())
    if not _config_accepts(model.config, new):  # type: ignore[arg-type]
        raise ModelError(
            f"{type(model).__name__}: its config refuses hidden_size {new}; keep a multiple of "
            f"{hidden_step(model.config)} channels"
        )
    if any(p.device.type == "meta" for p in model.parameters()):  # before any tensor is cut
        raise ModelError(
            "hidden-channel pruning needs every weight in memory; load the model without disk offload"
        )
    gone = torch.ones(old, dtype=torch.bool)
    gone[keep] = False
    removed = torch.nonzero(gone).flatten()
    done: set[int] = set()  # a tied weight is sliced once

    def cut(t: Any, dim: int) -> None:
        if isinstance(t, torch.Tensor) and id(t) not in done and t.shape[dim] == old:
            _slice(t, dim, keep)
            done.add(id(t))

    results: dict[str, LayerResult] = {}
    for name in coupling.columns:
        mod = model.get_submodule(name)
        hess = change.hessians.get(name)
        if hess is not None:  # least squares on the kept inputs, from the dense weight
            w = get_weight(mod)
            fitted, _ = reconstruct(w.detach().float(), hess.to(w.device).float(), keep.to(w.device))
            w.data = fitted.to(w.dtype).contiguous()  # [out, kept]: the cut below leaves it
        cut(mod.weight, 1)
        mod.in_features = new  # type: ignore[assignment]
        results[name] = LayerResult(removed_cols=removed)
    for name in coupling.rows:
        mod = model.get_submodule(name)
        cut(mod.weight, 0)
        cut(getattr(mod, "bias", None), 0)
        mod.out_features = new  # type: ignore[assignment]
        results[name] = LayerResult(removed_rows=removed)
    for name in coupling.vectors:
        for _, p in _params_with(model.get_submodule(name), old):
            cut(p, 0)
    for name in coupling.embeddings:
        emb = model.get_submodule(name)
        cut(emb.weight, 1)
        emb.embedding_dim = new  # type: ignore[assignment]
    for mod in model.modules():
        _set_width_attrs(mod, old, new)
    for name in coupling.vectors:
        _rescale_norm(model.get_submodule(name), name, old, new)
    resized = hidden_config(model, new)
    for key in ("head_dim", *_CONFIG_KEYS):
        if hasattr(resized, key):
            setattr(model.config, key, getattr(resized, key))  # type: ignore[union-attr]
    log.info("hidden channels %d -> %d", old, new)
    return results
