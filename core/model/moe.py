"""Mixture-of-experts layers: fused expert tensors <-> one ``nn.Linear`` per expert projection.

transformers 5.x stores the experts of Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V3 and
others *fused*: an ``experts`` module holding 3-D parameters (``gate_up_proj`` [E, 2I, H],
``down_proj`` [E, H, I]) and looping over experts in its forward. llmpress compresses linear
layers, so before compression :func:`llmpress.model.moe_model.unfuse_model` replaces each fused ``experts`` module by an
:class:`UnfusedExperts`: an ``nn.ModuleList`` of :class:`ExpertMLP` (``experts.{e}.gate_proj``,
``up_proj``, ``down_proj``, plain ``nn.Linear``) whose forward computes exactly what the fused
module's eager forward computes, routing weights included (transformers' default ``grouped_mm``
kernel may round differently in the last bit). After compression the experts are fused back
(:func:`llmpress.model.moe_model.with_experts_unfused`), so the compressed model keeps its own architecture and kernels. Every expert projection is then an
ordinary target: default targets and ``targets: ['.*experts.*']`` reach it.

The layout is discovered from the module, not from the model type: its parameter names and
shapes (:data:`LAYOUTS`) and the flags transformers' ``@use_experts_implementation`` sets
(``is_transposed``, ``is_concatenated``, ``has_bias``, ``has_gate``). A module whose layout is
not recognized (a custom gating function, a post-expert norm) stays fused, with a warning; its
experts are then not compressed. Older layouts with an ``nn.ModuleList`` of per-expert MLPs of
``nn.Linear`` need nothing: they are ordinary targets already.

**Routers.** A module directly inside an MoE block (a module with an ``experts`` child) that owns
a 2-D ``weight`` is a router: ``gate``/``router`` (which pick the experts) and Qwen2-MoE's
``shared_expert_gate``. Default targets leave them out (:func:`llmpress.model.moe_model.router_names`): compressing a
router changes which experts run. An explicit ``targets`` regex still reaches a router that is an
``nn.Linear``; transformers' ``*TopKRouter`` modules are not linear layers and are never
compressed.

**On disk** (:mod:`llmpress.format.save`, :mod:`llmpress.format.hf_quantizer`). An ``experts`` module none of
whose projections is stored packed (pruned-only results saved dense, or untouched experts) is
re-fused into the standard transformers parameters (``experts.gate_up_proj``,
``experts.down_proj``), so plain transformers loads the checkpoint with no llmpress.
An ``experts`` module with packed projections (GPTQ, sparse formats) stays unfused on disk
(``experts.{e}.gate_proj.weight`` ...) and is listed in ``quantization_config.experts``; at
``from_pretrained`` the llmpress quantizer unfuses that module of the freshly built model
before the weights load (and drops transformers' conversion of per-expert checkpoint names into
fused tensors for it), then builds the packed layers as for any linear. Experts that structured
pruning resized (:func:`llmpress.model.moe_model.irregular_experts`) cannot be fused back: they stay unfused in memory
and on disk, their layers stored as ``dense`` entries.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
from typing import Any, ParamSpec, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from llmpress.errors import ModelError

log = logging.getLogger(__name__)
P = ParamSpec("P")
R = TypeVar("R")


@dataclasses.dataclass(frozen=True)
class ExpertsLayout:
    """One fused experts layout: which 3-D parameters hold the projections and how.

    ``up``: the parameter holding gate and up (``gate_up_proj``) or up only (``up_proj``);
    ``gated``: ``act(gate) * up`` (else ``act(up)``); ``concatenated``: [gate; up] halves (else
    interleaved rows gate0, up0, gate1, ...); ``transposed``: weights stored [E, in, out].
    """

    name: str
    up: str
    down: str = "down_proj"
    gated: bool = True
    concatenated: bool = True
    transposed: bool = False
    bias: bool = False


#: known layouts by name; :func:`detect_layout` picks the one a module's parameters and flags match
LAYOUTS: dict[str, ExpertsLayout] = {
    lay.name: lay
    for base in (
        ExpertsLayout("gate_up", "gate_up_proj"),  # Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V3, ...
        ExpertsLayout("gate_up_interleaved", "gate_up_proj", concatenated=False),
        ExpertsLayout("up", "up_proj", gated=False),
    )
    for t in (False, True)
    for b in (False, True)
    for lay in [
        dataclasses.replace(
            base, name=base.name + ("_t" if t else "") + ("_bias" if b else ""), transposed=t, bias=b
        )
    ]
}


def _is_default_gate(module: nn.Module) -> bool:
    fn = getattr(type(module), "_apply_gate", None)
    return fn is None or getattr(fn, "__name__", "") == "_default_apply_gate"


def detect_layout(module: nn.Module) -> ExpertsLayout | None:
    """The :data:`LAYOUTS` entry of a fused experts module, or ``None`` if it is not one we can
    unfuse exactly (no 3-D ``down_proj``, unknown shapes, custom gating, post-expert norm)."""
    params = dict(module.named_parameters(recurse=False))
    down = params.get("down_proj")
    if down is None or down.dim() != 3 or not hasattr(module, "act_fn"):
        return None
    try:  # called like transformers' experts: (hidden_states, top_k_index, top_k_weights)
        if "top_k_index" not in inspect.signature(type(module).forward).parameters:
            return None
    except (TypeError, ValueError):  # pragma: no cover - a builtin forward
        return None
    if getattr(module, "has_post_expert_norm", False) or not _is_default_gate(module):
        return None
    up_name = "gate_up_proj" if "gate_up_proj" in params else "up_proj" if "up_proj" in params else None
    if up_name is None or params[up_name].dim() != 3:
        return None
    transposed = bool(getattr(module, "is_transposed", False))
    concatenated = bool(getattr(module, "is_concatenated", True))
    bias = f"{up_name}_bias" in params and "down_proj_bias" in params
    gated = up_name == "gate_up_proj"
    base = "up" if not gated else "gate_up" if concatenated else "gate_up_interleaved"
    lay = LAYOUTS[base + ("_t" if transposed else "") + ("_bias" if bias else "")]
    e, h, i = _dims(module, lay)
    up_shape = (e, h, i * (2 if gated else 1)) if transposed else (e, i * (2 if gated else 1), h)
    down_shape = (e, i, h) if transposed else (e, h, i)
    if tuple(params[up_name].shape) != up_shape or tuple(down.shape) != down_shape:
        return None
    return lay


def _dims(module: nn.Module, lay: ExpertsLayout) -> tuple[int, int, int]:
    """(experts, hidden, intermediate) from the down projection's shape."""
    e, a, b = module.get_parameter(lay.down).shape
    return (int(e), int(b), int(a)) if lay.transposed else (int(e), int(a), int(b))


class ExpertMLP(nn.Module):
    """One expert: ``down_proj(act(gate_proj(x)) * up_proj(x))`` (``down_proj(act(up_proj(x)))``
    without a gate), all ``nn.Linear``."""

    def __init__(self, hidden: int, inter: int, act_fn: Any, gated: bool, bias: bool, **factory: Any) -> None:
        super().__init__()
        if gated:
            self.gate_proj = nn.Linear(hidden, inter, bias=bias, **factory)
        self.up_proj = nn.Linear(hidden, inter, bias=bias, **factory)
        self.down_proj = nn.Linear(inter, hidden, bias=bias, **factory)
        self.act_fn = act_fn
        self.gated = gated

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [tokens, hidden]
        h = self.act_fn(self.gate_proj(x)) * self.up_proj(x) if self.gated else self.act_fn(self.up_proj(x))
        return self.down_proj(h)  # [tokens, hidden]


class UnfusedExperts(nn.ModuleList):
    """The experts of one MoE block as ``experts.{e}`` :class:`ExpertMLP` modules; called like
    the fused module, ``(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k])``, and
    computing exactly its eager forward. ``layout`` names the fused layout it came from."""

    def __init__(
        self, experts: list[ExpertMLP], layout: ExpertsLayout, shell: nn.Module, dims: tuple[int, int, int]
    ) -> None:
        super().__init__(experts)
        self.num_experts = len(experts)
        self.layout = layout
        self.dims = dims  # (experts, hidden, intermediate) of the fused module
        # the fused module without its parameters (act_fn, config, flags), for refuse_experts
        self._shell = [shell]  # a list: not registered as a submodule

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        final = torch.zeros_like(hidden_states)  # [T, H]
        with torch.no_grad():
            mask = F.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)  # [E+1, k, T]
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
        for e in hit[:, 0].tolist():
            if e == self.num_experts:  # expert-parallel sentinel
                continue
            pos, tok = torch.where(mask[e])
            out = self[e](hidden_states[tok]) * top_k_weights[tok, pos, None]  # [t, H]
            final.index_add_(0, tok, out.to(final.dtype))
        return final

    def extra_repr(self) -> str:
        return f"layout={self.layout.name}"


def _split(w: torch.Tensor, lay: ExpertsLayout) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(gate, up) rows of one expert's ``up`` weight [2I, H] (or bias [2I])."""
    if not lay.gated:
        return None, w
    if lay.concatenated:
        g, u = w.chunk(2, dim=0)
        return g, u
    return w[0::2], w[1::2]


def _join(gate: torch.Tensor | None, up: torch.Tensor, lay: ExpertsLayout) -> torch.Tensor:
    if gate is None:
        return up
    if lay.concatenated:
        return torch.cat([gate, up], dim=0)
    return torch.stack([gate, up], dim=1).reshape(-1, *up.shape[1:])


def _copy(lin: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    if weight.is_meta:
        return
    with torch.no_grad():
        lin.weight.copy_(weight)
        if bias is not None and lin.bias is not None:
            lin.bias.copy_(bias)


def unfuse_experts(module: nn.Module, allow_meta: bool = False) -> UnfusedExperts:
    """An :class:`UnfusedExperts` computing exactly what the fused ``module`` computes (weights
    copied; with ``allow_meta``, meta tensors give shapes only, as when a checkpoint is about to
    load). Raises :class:`ModelError` for an unknown layout or, without ``allow_meta``, weights
    on the meta device (disk-offloaded)."""
    lay = detect_layout(module)
    if lay is None:
        raise ModelError(
            f"{type(module).__name__} is not a fused experts layout llmpress knows "
            f"(known: {sorted(LAYOUTS)}); its experts cannot be compressed"
        )
    e_n, hidden, inter = _dims(module, lay)
    up_all, down_all = module.get_parameter(lay.up), module.get_parameter(lay.down)
    if up_all.is_meta and not allow_meta:
        raise ModelError(
            f"{type(module).__name__}: the expert weights are on the meta device (offloaded to disk); llmpress "
            f"unfuses experts to compress them, so load the model without disk offload (device_map) and pass "
            f"--offload-model / offload_activations instead"
        )
    factory = {"device": up_all.device, "dtype": up_all.dtype}
    experts = []
    for e in range(e_n):
        ex = ExpertMLP(hidden, inter, module.act_fn, lay.gated, lay.bias, **factory)
        up_w = up_all[e].t() if lay.transposed else up_all[e]  # [(2)I, H]
        down_w = down_all[e].t() if lay.transposed else down_all[e]  # [H, I]
        g_w, u_w = _split(up_w, lay)
        g_b = u_b = d_b = None
        if lay.bias:
            g_b, u_b = _split(module.get_parameter(f"{lay.up}_bias")[e], lay)
            d_b = module.get_parameter(f"{lay.down}_bias")[e]
        if g_w is not None:
            _copy(ex.gate_proj, g_w, g_b)
        _copy(ex.up_proj, u_w, u_b)
        _copy(ex.down_proj, down_w, d_b)
        experts.append(ex)
    shell = type(module).__new__(type(module))
    shell.__dict__.update({k: dict(v) if isinstance(v, dict) else v for k, v in module.__dict__.items()})
    shell._parameters = {}
    unf = UnfusedExperts(experts, lay, shell, (e_n, hidden, inter))
    if not up_all.is_meta:
        _verify(module, unf)
    return unf


@torch.no_grad()
def _verify(fused: nn.Module, unf: UnfusedExperts, tokens: int = 8) -> None:
    """Raise :class:`ModelError` unless ``unf`` computes what ``fused``'s eager forward computes
    on a few random tokens (a layout whose forward has other semantics is caught here)."""
    e_n, hidden, _ = unf.dims
    p = fused.get_parameter(unf.layout.down)
    g = torch.Generator(device=p.device).manual_seed(0)
    x = torch.randn(tokens, hidden, generator=g, device=p.device).to(p.dtype)
    k = min(2, e_n)
    idx = torch.stack([torch.randperm(e_n, generator=g, device=p.device)[:k] for _ in range(tokens)])
    w = torch.rand(tokens, k, generator=g, device=p.device).to(p.dtype)
    eager = getattr(type(fused).forward, "__wrapped__", type(fused).forward)
    want, got = eager(fused, x, idx, w), unf(x, idx, w)
    if not torch.allclose(got.float(), want.float(), rtol=1e-2, atol=1e-2 * float(want.abs().max()) + 1e-6):
        raise ModelError(
            f"{type(fused).__name__}: the per-expert layers do not reproduce its forward (layout "
            f"{unf.layout.name!r} guessed from its parameters); its experts cannot be compressed"
        )


def fused_tensors(unfused: UnfusedExperts) -> dict[str, torch.Tensor]:
    """The fused parameters (name -> tensor) of ``unfused``'s current weights, as transformers
    stores them (e.g. ``gate_up_proj`` [E, 2I, H], ``down_proj`` [E, H, I])."""
    lay = unfused.layout
    ups, downs, up_b, down_b = [], [], [], []
    for ex in unfused:
        assert isinstance(ex, ExpertMLP)
        gate = ex.gate_proj.weight.detach() if lay.gated else None
        up = _join(gate, ex.up_proj.weight.detach(), lay)  # [(2)I, H]
        down = ex.down_proj.weight.detach()  # [H, I]
        ups.append(up.t() if lay.transposed else up)
        downs.append(down.t() if lay.transposed else down)
        if lay.bias:
            gb = ex.gate_proj.bias.detach() if lay.gated else None
            up_b.append(_join(gb, ex.up_proj.bias.detach(), lay))
            down_b.append(ex.down_proj.bias.detach())
    out = {lay.up: torch.stack(ups), lay.down: torch.stack(downs)}
    if lay.bias:
        out[f"{lay.up}_bias"] = torch.stack(up_b)
        out[f"{lay.down}_bias"] = torch.stack(down_b)
    return out


def refuse_experts(unfused: UnfusedExperts) -> nn.Module:
    """The fused module again (the original class), holding ``unfused``'s current weights."""
    shell = unfused._shell[0]
    fused = type(shell).__new__(type(shell))
    fused.__dict__.update({k: dict(v) if isinstance(v, dict) else v for k, v in shell.__dict__.items()})
    fused._parameters = {}
    for name, t in fused_tensors(unfused).items():
        fused.register_parameter(name, nn.Parameter(t))
    return fused
