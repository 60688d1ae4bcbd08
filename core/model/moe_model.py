"""Mixture-of-experts models as a whole: finding, unfusing and re-fusing their experts
modules, routers, and the state-dict forms saved to disk (see :mod:`llmpress.model.moe` for the
layouts, the per-module conversion and the on-disk rules)."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

import torch
from torch import nn

from llmpress.errors import ModelError
from llmpress.model.moe import (
    ExpertsLayout,
    UnfusedExperts,
    _dims,
    detect_layout,
    fused_tensors,
    refuse_experts,
    unfuse_experts,
)

log = logging.getLogger(__name__)
P = ParamSpec("P")
R = TypeVar("R")


def _set_child(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, new)


def fused_experts(model: nn.Module) -> dict[str, ExpertsLayout | None]:
    """Every fused experts module of ``model`` (a module with a 3-D ``down_proj``) and its layout
    (``None`` when not recognized)."""
    out: dict[str, ExpertsLayout | None] = {}
    for name, mod in model.named_modules():
        p = getattr(mod, "_parameters", {}).get("down_proj")
        if isinstance(p, torch.Tensor) and p.dim() == 3:
            out[name] = detect_layout(mod)
    return out


def unfuse_model(model: nn.Module, names: list[str] | None = None, allow_meta: bool = False) -> list[str]:
    """Replace (in place) every fused experts module, or those in ``names``, by its
    :class:`UnfusedExperts` (``allow_meta``: see :func:`unfuse_experts`); returns the names
    replaced. Unknown layouts stay fused, with a warning (or a :class:`ModelError` when named
    in ``names``)."""
    found = fused_experts(model)
    done = []
    for name in names if names is not None else list(found):
        if name not in found:
            if isinstance(_get(model, name), UnfusedExperts):
                continue
            raise ModelError(f"{name} is not a fused experts module of {type(model).__name__}")
        mod = model.get_submodule(name)
        if found[name] is not None and not allow_meta and mod.get_parameter("down_proj").is_meta:
            unfuse_experts(mod)  # raises: offloaded weights cannot be unfused
        try:
            unf = unfuse_experts(mod, allow_meta)
        except ModelError as e:
            if names is not None:
                raise
            log.warning("%s: %s; they stay fused and are not compressed", name, e)
            continue
        _set_child(model, name, unf)
        done.append(name)
    if done:
        log.info("unfused %d experts modules into per-expert linear layers", len(done))
    return done


def _get(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def unfused_experts(model: nn.Module) -> dict[str, UnfusedExperts]:
    """Every :class:`UnfusedExperts` of ``model`` by qualified name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, UnfusedExperts)}


def moe_blocks(root: nn.Module) -> dict[str, nn.Module]:
    """Modules (by name relative to ``root``) that hold an ``experts`` child: the MoE blocks."""
    return {n: m for n, m in root.named_modules() if isinstance(getattr(m, "experts", None), nn.Module)}


def router_names(root: nn.Module) -> set[str]:
    """Routers under ``root``: modules directly inside an MoE block, other than ``experts``,
    that own a 2-D ``weight`` (``gate``, ``router``, ``shared_expert_gate``)."""
    out = set()
    for bname, block in moe_blocks(root).items():
        for cname, child in block.named_children():
            w = getattr(child, "_parameters", {}).get("weight")
            if cname != "experts" and isinstance(w, torch.Tensor) and w.dim() == 2:
                out.add(f"{bname}.{cname}" if bname else cname)
    return out


def refuse_model(model: nn.Module, names: list[str] | None = None) -> list[str]:
    """Put the fused module back (in place) for every :class:`UnfusedExperts` of ``model`` (or
    those in ``names``) whose experts are all plain ``nn.Linear``; returns the names re-fused."""
    done = []
    for name, unf in unfused_experts(model).items():
        if names is not None and name not in names:
            continue
        if _refusable(unf):
            _set_child(model, name, refuse_experts(unf))
            done.append(name)
        else:
            log.info("%s: experts resized (structured pruning) stay per-expert linear layers", name)
    return done


def _refusable(unf: UnfusedExperts) -> bool:
    """Every expert projection a plain ``nn.Linear`` of the fused module's shape."""
    _, h, i = unf.dims
    want = {"gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}
    for ex in unf:
        for pname, shape in want.items():
            m = getattr(ex, pname, None)
            if m is None and pname == "gate_proj" and not unf.layout.gated:
                continue
            if type(m) is not nn.Linear or tuple(m.weight.shape) != shape:
                return False
            if (m.bias is not None) != unf.layout.bias:  # e.g. a bias folded in by structured pruning
                return False
    return True


def irregular_experts(model: nn.Module) -> list[str]:
    """:class:`UnfusedExperts` of ``model`` that cannot be fused back (structured pruning
    changed an expert's width or added a bias): stored unfused, their layers as ``dense``."""
    return [n for n, u in unfused_experts(model).items() if not _refusable(u)]


def _under(name: str, prefix: str) -> bool:
    return name.startswith(prefix + ".")


def expert_views(model: nn.Module, layers: Any) -> dict[str, UnfusedExperts]:
    """Temporary :class:`UnfusedExperts` copies of the fused experts modules of ``model`` that
    have per-expert results in ``layers`` (the layer names of a run's :class:`CompressionState`);
    the model is not changed."""
    out = {}
    for name, lay in fused_experts(model).items():
        if lay is not None and any(_under(n, name) for n in layers):
            out[name] = unfuse_experts(model.get_submodule(name))
    return out


def fuse_state_dict(
    experts: dict[str, UnfusedExperts], sd: dict[str, torch.Tensor], packed: set[str] | dict[str, Any]
) -> list[str]:
    """Re-fuse, in the state dict ``sd`` (in place), every unfused ``experts`` module none of
    whose layers is in ``packed`` (qualified names of layers stored with a
    ``quantization_config`` entry): its per-expert keys give way to the standard fused
    parameters. Returns the experts modules left unfused (for ``quantization_config.experts``)."""
    kept = []
    for name, unf in experts.items():
        if any(_under(n, name) for n in packed):
            kept.append(name)
            continue
        ref = next((v for k, v in sd.items() if _under(k, name)), None)
        for k in [k for k in sd if _under(k, name)]:
            del sd[k]
        for pname, t in fused_tensors(unf).items():
            sd[f"{name}.{pname}"] = t if ref is None or not t.is_floating_point() else t.to(ref.dtype)
    return kept


def with_experts_unfused(fn: Callable[P, R]) -> Callable[P, R]:
    """Run ``fn(model, ...)`` with ``model``'s fused experts unfused (:func:`unfuse_model`) and
    fuse them back afterwards, also on error (:func:`refuse_model`)."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        model = args[0] if args else kwargs["model"]
        assert isinstance(model, nn.Module)
        names = unfuse_model(model)
        try:
            return fn(*args, **kwargs)
        finally:
            refuse_model(model, names)

    return wrapper


def expert_layer_names(model: nn.Module) -> list[str]:
    """The qualified names the per-expert layers of ``model``'s fused experts get when unfused
    (``...experts.{e}.gate_proj``), without unfusing anything."""
    out = []
    for name, lay in fused_experts(model).items():
        if lay is None:
            continue
        projs = ("gate_proj", "up_proj", "down_proj") if lay.gated else ("up_proj", "down_proj")
        e_n = _dims(model.get_submodule(name), lay)[0]
        out += [f"{name}.{e}.{p}" for e in range(e_n) for p in projs]
    return out
