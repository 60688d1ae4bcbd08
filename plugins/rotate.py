"""Hadamard rotations (``method: rotate``, QuaRot): a model-level transform stage before quantization.

The rotated model computes the same function as the original while its residual stream and
down_proj inputs lose their outlier channels, so that weights (and activations) quantize better:

1. RMSNorm scales are fused into the linears that read the norm's output (the norms' weights
   become 1) and tied embeddings are untied;
2. **R1**: the residual stream is rotated by a random Hadamard ``Q`` (``diag(random signs) H``):
   embedding ``E Q``, every reader (q/k/v, gate/up, lm_head) ``W Q``, every writer (o_proj,
   down_proj) ``Q^T W`` (and its bias ``b Q``); RMSNorm commutes with ``Q`` (it is orthogonal);
3. **R2**: each head's values by a Hadamard ``H`` of ``head_dim`` (v_proj rows ``H^T W_h``, its
   bias ``b_h H``; o_proj columns ``W_h H``), offline;
4. **R4**: ``down_proj``'s weight ``W H`` offline and its input ``x H`` *online*
   (:mod:`llmpress.format.transforms`: one Hadamard transform per down_proj call).

All fusion is in float64. R3 (online Q/K rotation for a quantized KV cache) is not implemented
and refused. Sizes that are not powers of two use the constructions of
:mod:`llmpress.math.hadamard` (Paley times Sylvester, else block-diagonal).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, ClassVar

import torch
from torch import nn

from llmpress import hookimpl
from llmpress.engine.stage import BoundStage, ModelContext, ModelStage
from llmpress.errors import ModelError, RecipeError
from llmpress.format.transforms import CHILD, OnlineTransform, attach
from llmpress.math.hadamard import HadamardPlan, HadamardSizeError, Rotation, hadamard_plan, random_rotation
from llmpress.model.modules import find_blocks
from llmpress.recipe.config import MethodConfig, PositiveInt

log = logging.getLogger(__name__)

#: the architectures whose blocks are pre-RMSNorm Llama blocks (``model_type``)
SUPPORTED = ("llama", "mistral", "qwen2")
READERS_ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
READERS_MLP = ("mlp.gate_proj", "mlp.up_proj")
WRITERS = ("self_attn.o_proj", "mlp.down_proj")


class Rotate(ModelStage):
    """Rotate the whole model once (the stage's ``targets`` are not used)."""

    def _config(self) -> RotateConfig:
        cfg = self.config
        assert isinstance(cfg, RotateConfig)
        return cfg

    def check(self, model: nn.Module, stages: list[BoundStage], ids: torch.Tensor | None) -> None:
        """Before any work: rotate comes first, the architecture can be rotated, every size has
        a Hadamard construction."""
        name = self.stage.name
        before = [s for s in stages if s.index < self.stage.index]
        if before:
            raise RecipeError(
                f"{name}: rotate must be the first stage (it changes every weight; {before[0].name} "
                f"ran before it); move it to the top of the recipe"
            )
        plans(model, self._config())

    def run(self, ctx: ModelContext) -> None:
        cfg = self._config()
        summary = rotate_model(ctx.model, cfg)
        ctx.record.state.transforms = [t.model_dump() for t in summary.online]
        ctx.record.transforms = summary.report()
        log.info("rotate: %s", "; ".join(summary.offline + [t.describe() for t in summary.online]))


@dataclasses.dataclass(frozen=True)
class RotateConfig(MethodConfig):
    """``r1``: random Hadamard of the residual stream (``seed``; ``block_size`` forces a
    block-diagonal one); ``r2``: per-head Hadamard of values/o_proj; ``r4``: online Hadamard
    before down_proj (``online_block_size`` forces block-diagonal); ``r3`` (online Q/K) is not
    implemented and refused."""

    method: ClassVar[str] = "rotate"
    display_name: ClassVar[str] = "QuaRot"
    rotates: ClassVar[bool] = True
    kind: ClassVar[type[ModelStage]] = Rotate
    stats: ClassVar[frozenset[str]] = frozenset()
    needs_calibration: ClassVar[bool] = False
    citation: ClassVar[str] = """@inproceedings{ashkboos2024quarot,
      title     = {{QuaRot}: Outlier-Free 4-Bit Inference in Rotated {LLMs}},
      author    = {Ashkboos, Saleh and Mohtashami, Amirkeivan and Croci, Maximilian L. and Li, Bo and
                   Cameron, Pashmina and Jaggi, Martin and Alistarh, Dan and Hoefler, Torsten and Hensman, James},
      booktitle = {Advances in Neural Information Processing Systems},
      year      = {2024}
    }"""

    seed: int = 0
    r1: bool = True
    r2: bool = True
    r3: bool = False
    r4: bool = True
    block_size: PositiveInt | None = None
    online_block_size: PositiveInt | None = None

    def validate(self) -> None:
        super().validate()
        if self.r3:
            raise RecipeError(
                "method 'rotate': r3 (an online rotation of queries and keys for a quantized KV cache) is "
                "not implemented; leave r3 false (R1, R2 and R4 do not need it)"
            )
        if not (self.r1 or self.r2 or self.r4):
            raise RecipeError("method 'rotate': r1, r2 and r4 are all false, so nothing would rotate")

    def describe(self) -> str:
        parts = [r for r, on in (("R1", self.r1), ("R2", self.r2)) if on]
        online = " and an online Hadamard before each down_proj (R4)" if self.r4 else ""
        return (
            f"QuaRot Hadamard rotations ({', '.join(parts) or 'norms fused'} fused into the weights{online}), "
            f"the model's function unchanged"
        )

    def planned_transforms(self, model: Any) -> list[dict[str, Any]]:
        p = plans(model, self)
        if p.inter is None:
            return []
        prefix, blocks = find_blocks(model)
        names = [f"{prefix}.{i}.mlp.down_proj" for i in range(len(blocks))]
        return [OnlineTransform.of(p.inter, names, role="R4").model_dump()]


@hookimpl
def llmpress_register_methods(register) -> None:  # noqa: ANN001
    register(RotateConfig)


@dataclasses.dataclass
class Summary:
    """What a rotation did: offline rotations in words, online transforms as entries."""

    offline: list[str]
    online: list[OnlineTransform]

    def report(self) -> dict[str, object]:
        return {
            "method": "rotate",
            "offline": self.offline,
            "online": [t.describe() for t in self.online],
            "runtime_cost": "; ".join(
                f"one {t.plan().describe()} per {_leaf(t.modules)} call ({len(t.modules)} layers, {t.role})"
                for t in self.online
            )
            or "none (all rotations fused into the weights)",
        }


def _leaf(names: list[str]) -> str:
    """What the layers are called inside their blocks (``mlp.down_proj``)."""
    leaves = {n.split(".", 3)[-1] if n.count(".") >= 3 else n for n in names}
    return leaves.pop() if len(leaves) == 1 else "layer"


@dataclasses.dataclass(frozen=True)
class Plans:
    """The Hadamard constructions of a model's rotation (``None``: that rotation is off)."""

    hidden: HadamardPlan | None
    head: HadamardPlan | None
    inter: HadamardPlan | None


def _attr(config: object, *names: str) -> int:
    for n in names:
        v = getattr(config, n, None)
        if isinstance(v, int):
            return v
    raise ModelError(f"rotate: the model config has none of {names}")


def check_architecture(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The blocks of a pre-RMSNorm Llama-like model; one :class:`ModelError` naming the
    problem otherwise (before any work)."""
    mtype = getattr(getattr(model, "config", None), "model_type", None)
    if mtype not in SUPPORTED:
        raise ModelError(
            f"rotate: {type(model).__name__} (model_type {mtype!r}) cannot be rotated: its norms must be "
            f"RMSNorms without bias whose scales fuse into the following linears (supported: "
            f"{', '.join(SUPPORTED)}); LayerNorm models with a bias (OPT, GPT-2) are not"
        )
    prefix, blocks = find_blocks(model)
    for i, block in enumerate(blocks):
        mods = dict(block.named_modules())
        for norm in ("input_layernorm", "post_attention_layernorm"):
            m = mods.get(norm)
            if m is None or "RMSNorm" not in type(m).__name__ or getattr(m, "bias", None) is not None:
                raise ModelError(f"rotate: {prefix}.{i}.{norm} is not an RMSNorm without bias")
        for lin in (*READERS_ATTN, *READERS_MLP, *WRITERS):
            if type(mods.get(lin)) is not nn.Linear:
                raise ModelError(
                    f"rotate: {prefix}.{i}.{lin} is not a plain nn.Linear (already compressed or rotated?); "
                    f"rotate the uncompressed model"
                )
        if hasattr(mods["mlp.down_proj"], CHILD):
            raise ModelError(f"rotate: {prefix}.{i}.mlp.down_proj is already rotated online")
    _final_norm(model, prefix)
    _embeddings(model)
    if any(t.device.type == "meta" for t in model.parameters()):
        raise ModelError(
            "rotate: some weights are offloaded (on the meta device); rotating changes every weight, so load "
            "the model in CPU or GPU memory"
        )
    return prefix, blocks


def plans(model: nn.Module, cfg: RotateConfig) -> Plans:
    """Check the model and build every Hadamard plan (raises before any work)."""
    check_architecture(model)
    mc = model.config  # type: ignore[union-attr]
    hidden = _attr(mc, "hidden_size")
    heads = _attr(mc, "num_attention_heads")
    head_dim = getattr(mc, "head_dim", None) or hidden // heads
    inter = _attr(mc, "intermediate_size")
    try:
        return Plans(
            hadamard_plan(hidden, cfg.block_size) if cfg.r1 else None,
            hadamard_plan(head_dim) if cfg.r2 else None,
            hadamard_plan(inter, cfg.online_block_size) if cfg.r4 else None,
        )
    except HadamardSizeError as e:
        raise ModelError(f"rotate: {e}") from None


# ------------------------------------------------------------------------------ the math, in float64


def _set(p: nn.Parameter | torch.Tensor, value: torch.Tensor) -> None:
    p.data.copy_(value.to(p.dtype))


def rotate_input(lin: nn.Linear, q: Rotation) -> None:
    """``W [out, in] <- W Q``: the layer reads ``x Q`` and computes what it did from ``x``."""
    _set(lin.weight, q.right(lin.weight.data.double()))


def rotate_output(lin: nn.Linear, q: Rotation) -> None:
    """``W <- Q^T W = (W^T Q)^T``, ``b <- b Q``: the layer writes ``y Q`` instead of ``y``."""
    _set(lin.weight, q.right(lin.weight.data.double().T).T)
    if lin.bias is not None:
        _set(lin.bias, q.right(lin.bias.data.double()))


def fuse_norm(norm: nn.Module, readers: list[nn.Linear]) -> None:
    """Fold the RMSNorm's scale into the input columns of ``readers``; the scale becomes 1."""
    weight = norm.weight
    assert isinstance(weight, torch.Tensor)
    g = weight.data.double()
    for lin in readers:
        _set(lin.weight, lin.weight.data.double() * g[None, :])
    weight.data.fill_(1.0)


def _lin(block: nn.Module, name: str) -> nn.Linear:
    mod = block.get_submodule(name)
    assert isinstance(mod, nn.Linear)
    return mod


def _embeddings(model: nn.Module) -> tuple[nn.Embedding, nn.Linear]:
    """The input embedding and the lm_head (a :class:`ModelError` if they are not plain)."""
    emb = model.get_input_embeddings()  # type: ignore[operator]
    head = model.get_output_embeddings()  # type: ignore[operator]
    if not isinstance(emb, nn.Embedding) or type(head) is not nn.Linear:
        raise ModelError(
            f"rotate: {type(model).__name__} needs an nn.Embedding and a plain nn.Linear lm_head"
        )
    return emb, head


def untie(model: nn.Module) -> None:
    """Give lm_head its own weight when it shares the embedding's."""
    emb, head = _embeddings(model)
    if head.weight is emb.weight or head.weight.data_ptr() == emb.weight.data_ptr():
        head.weight = nn.Parameter(emb.weight.detach().clone(), requires_grad=False)
    model.config.tie_word_embeddings = False  # type: ignore[union-attr]
    getattr(model.config, "get_text_config", lambda: model.config)().tie_word_embeddings = False  # type: ignore[union-attr]


def rotate_heads(v: nn.Linear, o: nn.Linear, h: Rotation) -> None:
    """R2: each value head ``v_h <- v_h H`` (rows of v_proj, its bias), o_proj's columns of
    each head ``W_h H`` (``H`` [hd, hd] orthogonal; grouped-query heads share ``H``)."""
    hd = h.plan.size
    w = v.weight.data.double().reshape(-1, hd, v.in_features)  # [kv, hd, in]
    _set(v.weight, h.right(w.transpose(1, 2)).transpose(1, 2).reshape(v.weight.shape))  # H^T W_h
    if v.bias is not None:
        _set(v.bias, h.right(v.bias.data.double().reshape(-1, hd)).reshape(-1))
    wo = o.weight.data.double().reshape(o.out_features, -1, hd)  # [out, heads, hd]
    _set(o.weight, h.right(wo).reshape(o.weight.shape))


@torch.no_grad()
def rotate_model(model: nn.Module, cfg: RotateConfig) -> Summary:
    """Rotate ``model`` in place (see the module docstring); returns what was done."""
    p = plans(model, cfg)
    prefix, blocks = check_architecture(model)
    untie(model)
    final_norm = _final_norm(model, prefix)
    emb, head = _embeddings(model)
    offline = ["RMSNorm scales fused into the following linears (norm weights 1), embeddings untied"]
    for block in blocks:
        fuse_norm(block.get_submodule("input_layernorm"), [_lin(block, n) for n in READERS_ATTN])
        fuse_norm(block.get_submodule("post_attention_layernorm"), [_lin(block, n) for n in READERS_MLP])
    fuse_norm(final_norm, [head])
    if p.hidden is not None:
        q = random_rotation(p.hidden.size, cfg.seed, cfg.block_size)
        _set(emb.weight, q.right(emb.weight.data.double()))
        for block in blocks:
            for n in (*READERS_ATTN, *READERS_MLP):
                rotate_input(_lin(block, n), q)
            for n in WRITERS:
                rotate_output(_lin(block, n), q)
        rotate_input(head, q)
        offline.append(f"R1: random {p.hidden.describe()} of the residual stream (seed {cfg.seed})")
    if p.head is not None:
        h = Rotation(p.head)
        for block in blocks:
            rotate_heads(_lin(block, "self_attn.v_proj"), _lin(block, "self_attn.o_proj"), h)
        offline.append(f"R2: per-head {p.head.describe()} of values and o_proj")
    online: list[OnlineTransform] = []
    if p.inter is not None:
        m = Rotation(p.inter)
        names = []
        for i, block in enumerate(blocks):
            down = _lin(block, "mlp.down_proj")
            rotate_input(down, m)
            attach(down, p.inter)
            names.append(f"{prefix}.{i}.mlp.down_proj")
        online.append(OnlineTransform.of(p.inter, names, role="R4"))  # as planned_transforms says
        offline.append("R4: down_proj weights rotated offline to match their online input rotation")
    return Summary(offline, online)


def _final_norm(model: nn.Module, prefix: str) -> nn.Module:
    """The RMSNorm after the last block (``model.norm`` next to ``model.layers``)."""
    parent = model.get_submodule(prefix.rpartition(".")[0]) if "." in prefix else model
    norm = getattr(parent, "norm", None)
    if norm is None or "RMSNorm" not in type(norm).__name__:
        raise ModelError(f"rotate: no final RMSNorm next to {prefix}")
    return norm
