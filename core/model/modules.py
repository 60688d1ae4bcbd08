"""Model structure: the repeated block list, target layers, and weight access.

Block discovery needs no per-architecture table: the blocks are the ``nn.ModuleList``
of identical modules holding the most parameters (``model.layers`` in Llama/Qwen2/Mistral/
Phi, ``decoder.layers`` in OPT, ``transformer.h`` in GPT-2, ``encoder.layer`` in BERT).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import nn

from llmpress.errors import ModelError, RecipeError


def _is_conv1d(module: nn.Module) -> bool:
    # transformers' GPT-2 style Conv1D: weight is [in, out]
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def is_linear(module: nn.Module) -> bool:
    """True for layers llmpress compresses as a matrix: ``nn.Linear`` and GPT-2's ``Conv1D``."""
    return isinstance(module, nn.Linear) or _is_conv1d(module)


def get_weight(module: nn.Module) -> torch.Tensor:
    """The weight as ``[out_features, in_features]`` (a view for Linear, transposed for Conv1D)."""
    w = module.weight
    assert isinstance(w, torch.Tensor), f"{type(module).__name__} has no weight tensor"
    return w.t() if _is_conv1d(module) else w


def set_weight(module: nn.Module, weight: torch.Tensor) -> None:
    """Write ``weight`` ([out, in], any dtype) into the layer, keeping its dtype and device."""
    p = module.weight
    assert isinstance(p, torch.Tensor), f"{type(module).__name__} has no weight tensor"
    new = weight.t() if _is_conv1d(module) else weight
    with torch.no_grad():
        p.copy_(new.to(device=p.device, dtype=p.dtype))


def in_out_features(module: nn.Module) -> tuple[int, int]:
    out, inp = get_weight(module).shape
    return int(inp), int(out)


@torch.no_grad()
def norm_weight_offset(norm: nn.Module) -> float:
    """``1.0`` for a norm that scales its output by ``1 + weight`` (Gemma's RMSNorm), ``0.0``
    for one that scales by ``weight``. Found by running the norm once with its weight (and
    bias) set to zero: only the ``1 + weight`` kind still gives a non-zero output."""
    weight = norm.get_parameter("weight")
    bias = getattr(norm, "bias", None)
    params = [weight] + ([bias] if isinstance(bias, torch.Tensor) else [])
    saved = [p.detach().clone() for p in params]
    x = torch.linspace(-1.0, 2.0, weight.numel(), device=weight.device, dtype=weight.dtype)
    try:
        for p in params:
            p.zero_()
        out = norm(x.unsqueeze(0))
    finally:
        for p, v in zip(params, saved, strict=True):
            p.copy_(v)
    return 1.0 if bool(out.abs().amax() > 0) else 0.0


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's repeated block list and its qualified name.

    Raises :class:`ModelError` if the model has no ``ModuleList`` of identical modules
    containing linear layers.
    """
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) < 1:
            continue
        kinds = {type(m) for m in mod}
        if len(kinds) != 1 or not any(is_linear(x) for x in mod[0].modules()):
            continue
        n_params = sum(p.numel() for p in mod.parameters())
        if best is None or n_params > best[0]:
            best = (n_params, name, mod)
    if best is None:
        raise ModelError(
            f"{type(model).__name__} has no supported blocks: llmpress looks for an nn.ModuleList of "
            f"identical transformer blocks containing linear layers (like model.layers in Llama)"
        )
    return best[1], best[2]


def block_linears(block: nn.Module) -> dict[str, nn.Module]:
    """Linear layers of one block by their name relative to the block, in definition order."""
    return {n: m for n, m in block.named_modules() if n and is_linear(m)}


def select_targets(
    model: nn.Module,
    patterns: Sequence[str] | None,
    ignore: Sequence[str] = (),
    stage_name: str = "stage",
) -> list[str]:
    """Qualified names of the layers a stage compresses.

    ``patterns``: regexes matched (``re.search``) against full module names; ``None`` means
    every linear layer inside the repeated blocks (never embeddings or the LM head) except
    mixture-of-experts routers (:func:`llmpress.model.moe_model.router_names`).
    ``ignore``: regexes removing names. Raises :class:`RecipeError` if nothing matches.
    """
    from llmpress.model.moe_model import router_names

    block_prefix, blocks = find_blocks(model)
    in_blocks = [f"{block_prefix}.{i}.{n}" for i, blk in enumerate(blocks) for n in block_linears(blk)]
    if patterns is None:
        routers = router_names(model)
        names = [n for n in in_blocks if n not in routers]
    else:
        regs = [_compile(p, stage_name) for p in patterns]
        all_linear = [n for n, m in model.named_modules() if is_linear(m)]
        names = [n for n in all_linear if any(r.search(n) for r in regs)]
        for p, r in zip(patterns, regs):
            if not any(r.search(n) for n in all_linear):
                hit = sorted(n for n in router_names(model) if r.search(n))
                if hit:
                    raise RecipeError(
                        f"{stage_name}: target {p!r} matches only mixture-of-experts routers ({hit[:3]}, "
                        f"{type(model.get_submodule(hit[0])).__name__}), which are not linear layers: "
                        f"llmpress does not compress routers (they choose the experts); target the experts "
                        f"instead, e.g. '.*experts.*'"
                    )
                raise RecipeError(
                    f"{stage_name}: target {p!r} matches no linear layer; example names: {all_linear[:3]}"
                )
        outside = [n for n in names if n not in set(in_blocks)]
        if outside:
            raise RecipeError(
                f"{stage_name}: targets {outside[:3]} are outside the repeated blocks "
                f"({block_prefix}); llmpress compresses layers inside blocks only"
            )
    for p in ignore:
        r = _compile(p, stage_name)
        names = [n for n in names if not r.search(n)]
    if not names:
        raise RecipeError(f"{stage_name}: the targets match no layer (after 'ignore')")
    return names


def _compile(pattern: str, stage_name: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as e:
        raise RecipeError(f"{stage_name}: bad target regex {pattern!r}: {e}") from e
