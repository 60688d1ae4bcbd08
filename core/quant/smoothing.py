"""SmoothQuant's scale migration (Xiao et al., 2023): pure math and where it applies.

For a linear input channel ``j`` with calibration max ``|X_j|`` and max ``|W_j|`` over the
input column ``j`` of every following linear, ``s_j = max|X_j|^alpha / max|W_j|^(1-alpha)``.
Dividing the producer's outputs (a norm's weight and bias, or a linear's output rows) by
``s`` and multiplying the consumers' input columns by ``s`` leaves the block's function
unchanged and moves activation outliers into the weights.
"""

from __future__ import annotations

import torch
from torch import nn

#: (producer, consumers) by module name inside a block, in the order they are tried;
#: a pair applies when every module exists and the shapes agree (v_proj -> o_proj only
#: without grouped-query attention, where each o_proj input is one v_proj output), and
#: each consumer takes the first pair that applies (Gemma 2/3: ``pre_feedforward_layernorm``
#: feeds the MLP, ``post_attention_layernorm`` normalises the attention output)
PAIRS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),  # Llama, Qwen, Mistral
    ("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj")),  # Gemma 2/3
    ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),  # OPT
    ("final_layer_norm", ("fc1",)),
    ("self_attn.v_proj", ("self_attn.o_proj",)),
    ("mlp.up_proj", ("mlp.down_proj",)),
)


def smooth_scales(
    act_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float, eps: float = 1e-5
) -> torch.Tensor:
    """``s [in]`` for inputs with max ``|X_j|`` = ``act_absmax`` feeding ``weights`` ([out, in] each)."""
    w_absmax = torch.stack([w.detach().abs().amax(dim=0).float() for w in weights]).amax(dim=0)
    a = act_absmax.float().to(w_absmax.device).clamp_min(eps)
    s = a.pow(alpha) / w_absmax.clamp_min(eps).pow(1 - alpha)
    return s.clamp_min(eps)


def _out_features(m: nn.Module) -> int | None:
    if isinstance(m, nn.Linear):
        return m.out_features
    w = getattr(m, "weight", None)
    return int(w.shape[0]) if isinstance(w, torch.Tensor) and w.dim() == 1 else None


def smoothing_pairs(block: nn.Module, targets: set[str]) -> list[tuple[str, tuple[str, ...]]]:
    """The (producer, consumers) pairs of :data:`PAIRS` present in ``block`` whose consumers
    are all among ``targets`` and whose producer's width matches the consumers' inputs."""
    found: list[tuple[str, tuple[str, ...]]] = []
    claimed: set[str] = set()
    modules = dict(block.named_modules())
    for src, consumers in PAIRS:
        if src not in modules or not all(c in modules and c in targets for c in consumers):
            continue
        if claimed.intersection(consumers):
            continue
        width = _out_features(modules[src])
        if width is not None and all(getattr(modules[c], "in_features", None) == width for c in consumers):
            found.append((src, consumers))
            claimed.update(consumers)
    return found


def parent_name(names: tuple[str, ...]) -> str:
    """The innermost module holding every one of ``names`` (``"self_attn"`` for q/k/v; a
    single name is its own parent; ``""`` for the block itself)."""
    if len(names) == 1:
        return names[0]
    parts = [n.split(".") for n in names]
    common: list[str] = []
    for level in zip(*parts, strict=False):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return ".".join(common)


def qk_norms(block: nn.Module, consumers: tuple[str, ...]) -> list[str]:
    """The q/k norms (Qwen3, Gemma 3, OLMo 2) after ``consumers``: the children of their
    common parent module that are not linear layers but hold a 1-D ``weight`` (a norm
    applied to the query or key heads). Empty for Llama-style attention."""
    parent = parent_name(consumers)
    if not parent or parent in consumers:
        return []
    owner = block.get_submodule(parent) if parent else block
    found = []
    for name, child in owner.named_children():
        w = getattr(child, "weight", None)
        if not isinstance(child, nn.Linear) and isinstance(w, torch.Tensor) and w.dim() == 1:
            found.append(f"{parent}.{name}" if parent else name)
    return found
