"""AWQ (``method: awq``): activation-aware weight scaling and clipping, a block-level transform
placed right before the ``rtn`` or ``gptq`` stage that quantizes the same layers.

Per (producer, consumers) pair of a block (found as SmoothQuant's are,
:func:`llmpress.quant.smoothing.smoothing_pairs`), the input channels are scaled by
``s = mean|x|^alpha`` (normalised by ``sqrt(max(s) * min(s))``), ``alpha`` on the grid
``0, 1/n, ..., (n-1)/n`` (``0`` is the identity), choosing the ``alpha`` whose fake-quantized
``Q(W * s) / s`` gives the smallest MSE of the consumers' common parent module (attention,
MLP, or the single consumer linear) on the calibration inputs. ``1/s`` is folded into the
producer (:class:`~llmpress.structure.blocks.ScaleChannels`). Then each layer except the
query/key projections gets its per-group clip ``max|W|`` shrunk to the one (of ``1, 0.95, ...``
down to ``1 - max_shrink``, excluded) that minimises the group's output error, a weight
change (:class:`~llmpress.structure.blocks.SetWeights`). The quantization stage after it
then rounds the scaled, clipped weights. Reference: llm-awq ``auto_scale.py``, ``auto_clip.py``.

Pairs skipped: ``v_proj -> o_proj`` under grouped-query attention (the shapes disagree), and
a norm whose consumers are followed by q/k norms (Qwen3, Gemma 3: a child of the attention
module, not a linear layer, holding a 1-D weight; see :func:`llmpress.quant.smoothing.qk_norms`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from typing import Annotated, Any, ClassVar

import torch
from pydantic import Field
from torch import nn

from llmpress import hookimpl
from llmpress.engine.stage import BoundStage
from llmpress.errors import ModelError, RecipeError
from llmpress.model.modules import get_weight
from llmpress.quant.grid import QuantSpec, check_spec, dequantize_weight, grid_problem, quantize_weight
from llmpress.quant.smoothing import parent_name, qk_norms, smoothing_pairs
from llmpress.recipe.config import BitWidth, QuantConfig
from llmpress.structure.block_stage import BlockChange, BlockMethodConfig
from llmpress.structure.blocks import BlockContext, BlockInputs, ScaleChannels, SetWeights

log = logging.getLogger(__name__)

#: last name parts of the query/key projections, which the clip search leaves alone
_QK = ("q_", "k_", "query", "key", "wqkv", "qkv")


class AWQStage(BlockChange):
    """The block-change stage of ``awq``, checking its place in the plan before any work."""

    def check(self, model: nn.Module, stages: list[BoundStage], ids: torch.Tensor | None) -> None:
        cfg = self.config
        assert isinstance(cfg, AWQConfig)
        pos = [s.index for s in stages].index(self.stage.index)
        nxt = stages[pos + 1] if pos + 1 < len(stages) else None
        if nxt is None or not isinstance(nxt.config, QuantConfig):
            after = "nothing" if nxt is None else f"{nxt.name}"
            raise RecipeError(
                f"{self.stage.name}: awq must be followed by the weight quantization it prepares "
                f"(an 'rtn' or 'gptq' stage), but {after} follows it; add one right after awq "
                f"with the same bits, group_size and symmetric"
            )
        mine, theirs = cfg.quant_spec(), nxt.config.quant_spec()
        if mine != theirs:
            raise RecipeError(
                f"{self.stage.name}: awq searches for the grid bits {mine.bits}, group_size "
                f"{mine.group_size}, symmetric {mine.symmetric}, but {nxt.name} quantizes with bits "
                f"{theirs.bits}, group_size {theirs.group_size}, symmetric {theirs.symmetric}; "
                f"give awq the same bits, group_size and symmetric"
            )
        for i, rels in self.stage.targets.items():
            missing = sorted(set(rels) - set(nxt.targets.get(i, [])))
            if missing:
                raise RecipeError(
                    f"{self.stage.name}: awq would scale and clip layers that {nxt.name} leaves "
                    f"unquantized (block {i}: {', '.join(missing)}); give both stages the same targets"
                )


@dataclasses.dataclass(frozen=True)
class AWQConfig(BlockMethodConfig):
    """``bits``/``group_size``/``symmetric``: the grid of the quantization stage that follows
    (checked equal). ``n_grid``: number of ``alpha`` values ``i / n_grid`` tried (``1``: only
    the identity). ``clip``: search per-group weight clipping (not for q/k), shrinking
    ``max|W|`` in steps of ``1 / n_grid`` while ``shrink < max_shrink``, on ``clip_tokens``
    calibration tokens (evenly spaced)."""

    method: ClassVar[str] = "awq"
    stats: ClassVar[frozenset[str]] = frozenset({"absmax"})
    kind: ClassVar[type[BlockChange]] = AWQStage
    citation: ClassVar[str] = """@inproceedings{lin2024awq,
      title     = {{AWQ}: Activation-aware Weight Quantization for On-Device {LLM} Compression and Acceleration},
      author    = {Lin, Ji and Tang, Jiaming and Tang, Haotian and Yang, Shang and Chen, Wei-Ming and Wang, Wei-Chen and Xiao, Guangxuan and Dang, Xingyu and Gan, Chuang and Han, Song},
      booktitle = {Proceedings of Machine Learning and Systems},
      year      = {2024}
    }"""

    bits: BitWidth = 4
    group_size: int = 128
    symmetric: bool = False
    n_grid: Annotated[int, Field(ge=1, le=100)] = 20
    clip: bool = True
    max_shrink: Annotated[float, Field(ge=0, lt=1)] = 0.5
    clip_tokens: Annotated[int, Field(ge=1)] = 512

    def validate(self) -> None:
        super().validate()
        problem = grid_problem(self.bits, self.group_size, self.symmetric)
        if problem is not None:
            raise RecipeError(f"method 'awq': {problem}")

    def quant_spec(self) -> QuantSpec:
        return QuantSpec(bits=self.bits, group_size=self.group_size, symmetric=self.symmetric)

    def check_module(self, name: str, in_features: int, out_features: int) -> None:
        try:
            check_spec(self.quant_spec(), in_features, name)
        except ValueError as e:
            raise ModelError(str(e)) from None


# ----------------------------------------------------------------------------------------------
# the math


def fake_quantize(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Round-to-nearest ``w`` [out, in] on ``spec``'s grid, dequantized (float32)."""
    codes, scales, zeros = quantize_weight(w.float(), spec)
    return dequantize_weight(codes, scales, zeros, spec.group_size)


def awq_scales(x_mean: torch.Tensor, alpha: float) -> torch.Tensor:
    """``s = mean|x|^alpha`` clamped at 1e-4, divided by ``sqrt(max(s) * min(s))`` (all ones at
    ``alpha = 0``)."""
    s = x_mean.float().pow(alpha).clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


@torch.no_grad()
def clip_search(
    w: torch.Tensor, x: torch.Tensor, spec: QuantSpec, n_grid: int = 20, max_shrink: float = 0.5
) -> torch.Tensor:
    """Per (row, group) clip value ``[out, n_groups]`` of ``w`` [out, in]: ``max|W|`` of the
    group times ``1 - i / n_grid`` for ``i < max_shrink * n_grid``, the one whose fake-quantized
    clamp gives the smallest squared error of the group's partial output on ``x`` [n, in]."""
    out_f, in_f = w.shape
    gs = in_f if spec.group_size == -1 else spec.group_size
    xg = x.float().reshape(x.shape[0], in_f // gs, gs)
    best_all = []
    for rows in w.float().split(64):
        wg = rows.reshape(rows.shape[0], -1, gs)
        org_max = wg.abs().amax(dim=-1)  # [co, G]
        org_out = torch.einsum("ngk,cgk->cng", xg, wg)
        best = org_max.clone()
        min_err = torch.full_like(org_max, float("inf"))
        for i in range(max(1, int(max_shrink * n_grid))):
            mv = (org_max * (1 - i / n_grid)).unsqueeze(-1)
            cur = torch.maximum(torch.minimum(wg, mv), -mv).reshape(rows.shape)
            q = fake_quantize(cur, spec).reshape(wg.shape)
            err = (torch.einsum("ngk,cgk->cng", xg, q) - org_out).pow(2).mean(dim=1)
            better = err < min_err
            min_err = torch.where(better, err, min_err)
            best = torch.where(better, mv.squeeze(-1), best)
        best_all.append(best)
    return torch.cat(best_all)


def apply_clip(w: torch.Tensor, max_val: torch.Tensor) -> torch.Tensor:
    """``w`` [out, in] clamped per group to ``[-max_val, max_val]`` (``max_val`` [out, n_groups])."""
    gs = w.shape[1] // max_val.shape[1]
    mv = max_val.to(w).repeat_interleave(gs, dim=1)
    return torch.maximum(torch.minimum(w, mv), -mv)


# ----------------------------------------------------------------------------------------------
# the glue: calibration inputs of the block's parts


@dataclasses.dataclass
class _Inputs:
    """What one run of the block over its calibration batches saw."""

    #: per inspected module, per batch: (args, kwargs) of its call
    calls: dict[str, list[tuple[tuple[Any, ...], dict[str, Any]]]]
    #: per linear: sum of |x| per input channel and the token count
    abs_sum: dict[str, torch.Tensor]
    tokens: dict[str, int]
    #: per linear: evenly spaced input tokens [n, in] for the clip search
    sample: dict[str, list[torch.Tensor]]


def _capture(
    inputs: BlockInputs, block: nn.Module, inspect: list[str], linears: list[str], stride: int
) -> _Inputs:
    """Run the block once, recording the inspected modules' calls and the linears' inputs."""
    got = _Inputs({n: [] for n in inspect}, {}, dict.fromkeys(linears, 0), {n: [] for n in linears})

    def on_call(name: str):  # noqa: ANN202
        def hook(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            got.calls[name].append(
                (tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args), dict(kwargs))
            )

        return hook

    def on_input(name: str):  # noqa: ANN202
        def hook(mod: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            s = x.abs().float().sum(dim=0)
            got.abs_sum[name] = got.abs_sum[name] + s if name in got.abs_sum else s
            got.tokens[name] += x.shape[0]
            got.sample[name].append(x[::stride].float())

        return hook

    handles = [
        block.get_submodule(n).register_forward_pre_hook(on_call(n), with_kwargs=True) for n in inspect
    ]
    handles += [block.get_submodule(n).register_forward_pre_hook(on_input(n)) for n in linears]
    try:
        for _ in inputs.outputs():
            pass
    finally:
        for h in handles:
            h.remove()
    return got


def _run_calls(
    module: nn.Module, calls: list[tuple[tuple[Any, ...], dict[str, Any]]]
) -> Iterator[torch.Tensor]:
    for args, kwargs in calls:
        out = module(*args, **kwargs)
        yield out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def _search_pair(
    block: nn.Module,
    consumers: tuple[str, ...],
    x_mean: torch.Tensor,
    calls: list[tuple[tuple[Any, ...], dict[str, Any]]],
    config: AWQConfig,
) -> tuple[torch.Tensor, float]:
    """The scales (and their ``alpha``) minimising the MSE of the consumers' parent module."""
    inspect = block.get_submodule(parent_name(consumers))
    spec = config.quant_spec()
    ref = list(_run_calls(inspect, calls))
    weights = {c: get_weight(block.get_submodule(c)) for c in consumers}
    saved = {c: w.detach().clone() for c, w in weights.items()}
    best: tuple[float, float, torch.Tensor] | None = None
    try:
        for i in range(config.n_grid):
            alpha = i / config.n_grid
            s = awq_scales(x_mean, alpha).to(x_mean.device)
            for c, w in weights.items():
                w.copy_((fake_quantize(saved[c].float() * s, spec) / s).to(w.dtype))
            err = sum(
                float((o.float() - r.float()).pow(2).sum())
                for o, r in zip(_run_calls(inspect, calls), ref, strict=True)
            )
            loss = err / max(1, sum(r.numel() for r in ref))
            if best is None or loss < best[0]:
                best = (loss, alpha, s)
    finally:
        for c, w in weights.items():
            w.copy_(saved[c])
    assert best is not None
    return best[2], best[1]


def _is_qk(rel: str) -> bool:
    last = rel.rsplit(".", 1)[-1].lower()
    return last.startswith(_QK[:2]) or any(k in last for k in _QK[2:])


@torch.no_grad()
def _clip(
    block: nn.Module, linears: list[str], got: _Inputs, applied: list[ScaleChannels], config: AWQConfig
) -> SetWeights | None:
    """The clipped weights of ``linears`` (but q/k), as they will be after ``applied``'s scales."""
    in_scale = {c: ch.scales.float() for ch in applied for c in ch.targets}
    out_scale = {ch.source: ch.scales.float() for ch in applied if ch.source in linears}
    new = {}
    for rel in linears:
        if _is_qk(rel) or not got.sample[rel]:
            continue
        w = get_weight(block.get_submodule(rel)).detach().float()
        x = torch.cat(got.sample[rel])
        if rel in out_scale:
            w = w / out_scale[rel].to(w.device).unsqueeze(1)
        if rel in in_scale:
            s = in_scale[rel].to(w.device)
            w, x = w * s, x / s.to(x.device)
        clipped = apply_clip(
            w, clip_search(w, x.to(w.device), config.quant_spec(), config.n_grid, config.max_shrink)
        )
        if not torch.equal(clipped, w):
            new[rel] = clipped
    return SetWeights(new) if new else None


def _pairs(block: BlockContext) -> list[tuple[str, tuple[str, ...]]]:
    """SmoothQuant's pairs of the block, less those whose consumers are followed by q/k norms."""
    pairs = []
    for src, consumers in smoothing_pairs(block.module, set(block.stats)):
        norms = qk_norms(block.module, consumers)
        if norms:
            log.debug("%s: awq skips %s -> %s (followed by q/k norms %s)", block.name, src, consumers, norms)
            continue
        pairs.append((src, consumers))
    return pairs


@hookimpl
def llmpress_register_methods(register) -> None:  # noqa: ANN001
    register(AWQConfig)


@hookimpl
def llmpress_change_block(block: BlockContext, config: AWQConfig) -> list[ScaleChannels | SetWeights]:
    if block.inputs is None:
        raise ModelError(f"{block.name}: awq needs calibration data")
    pairs = _pairs(block)
    linears = sorted(block.stats)
    total = sum(h.shape[0] * h.shape[1] for h in block.inputs.acts.hidden)
    inspect = list(dict.fromkeys(parent_name(c) for _, c in pairs))
    got = _capture(block.inputs, block.module, inspect, linears, max(1, total // config.clip_tokens))
    changes: list[ScaleChannels | SetWeights] = []
    for src, consumers in pairs:
        x_mean = got.abs_sum[consumers[0]] / max(1, got.tokens[consumers[0]])
        s, alpha = _search_pair(block.module, consumers, x_mean, got.calls[parent_name(consumers)], config)
        absmax = block.stats[consumers[0]].absmax
        log.debug(
            "%s.%s: alpha %.2f, input max|x| %.3g (median channel %.3g)",
            block.name, src, alpha, float(absmax.max()), float(absmax.median()),
        )  # fmt: skip
        if alpha > 0:
            changes.append(ScaleChannels(src, consumers, s))
    if config.clip:
        clip = _clip(block.module, linears, got, [c for c in changes if isinstance(c, ScaleChannels)], config)
        if clip is not None:
            changes.append(clip)
    return changes
