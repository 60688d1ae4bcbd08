"""Low-rank compensation paths (EoRA): ``y = W_hat x + B (A x)`` beside a compressed weight.

A layer's path is ``(A [r, in], B [out, r])``. In memory, during and after a run, a forward hook
adds it to the layer (:func:`attach_lowrank`); saved, it is ``weight_lora_a``/``weight_lora_b``
(fp16) beside the weight in any format, with ``lowrank: r`` in the layer's format entry
(:mod:`llmpress.format.formats`); loaded, :class:`llmpress.format.runtime.LlmpressLinear` (packed
layers) or :class:`LowRankLinear` (plain weights) add it. The same paths can be written as a
PEFT LoRA adapter (:func:`write_peft_adapter`, ``lora_alpha = r`` so that the scaling is 1) and
loaded by ``peft`` on the compressed base without them (:func:`strip_lowrank`,
:func:`load_peft_adapter`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmpress.errors import CheckpointError, LlmpressError
from llmpress.format.formats import LOWRANK_A, LOWRANK_B, ModuleFormat, lowrank_shapes
from llmpress.format.runtime import LlmpressLinear, lowrank_delta, replace_module
from llmpress.model.results import CompressionState

log = logging.getLogger(__name__)

#: the subfolder ``--adapter peft`` writes the adapter to
PEFT_SUBFOLDER = "peft_adapter"
Paths = dict[str, tuple[torch.Tensor, torch.Tensor]]


class LowRankLinear(nn.Linear):
    """A plain linear layer with a stored low-rank path (format ``dense`` with ``lowrank``)."""

    def __init__(
        self,
        fmt: ModuleFormat,
        bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(fmt.in_features, fmt.out_features, bias=bias, device=device, dtype=dtype)
        self.fmt = fmt
        for suffix, (shape, stored) in lowrank_shapes(fmt).items():
            self.register_buffer(suffix, torch.zeros(shape, dtype=stored, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        a, b = self._buffers[LOWRANK_A], self._buffers[LOWRANK_B]
        assert a is not None and b is not None  # registered in __init__
        return y + lowrank_delta(x, a, b).to(y.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, lowrank={self.fmt.lowrank}"


class _LowRankHook:
    """A forward hook adding ``B (A x)`` to a layer's output (a compressed model in memory)."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor) -> None:
        self.a, self.b = a, b

    def __call__(self, mod: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
        x = args[0]
        return out + lowrank_delta(x, self.a.to(x.device), self.b.to(x.device)).to(out.dtype)


_HANDLE = "_llmpress_lowrank"


def attach_lowrank(mod: nn.Module, a: torch.Tensor, b: torch.Tensor) -> None:
    """Make ``mod`` compute ``W x + B (A x)`` in memory (replacing an earlier path of it)."""
    detach_lowrank(mod)
    handle = mod.register_forward_hook(_LowRankHook(a, b))
    object.__setattr__(mod, _HANDLE, handle)  # not a submodule, not in the state dict


def detach_lowrank(mod: nn.Module) -> bool:
    """Remove the in-memory path :func:`attach_lowrank` added; True if there was one."""
    handle = mod.__dict__.pop(_HANDLE, None)
    if handle is not None:
        handle.remove()
    return handle is not None


def lowrank_paths(model: nn.Module, state: CompressionState | None = None) -> Paths:
    """Every layer's low-rank path ``(A, B)`` (CPU float32): from ``state`` (a run's committed
    results) or, without it, from the model's loaded runtime modules."""
    if state is not None:
        return {n: (r.lowrank[0].float(), r.lowrank[1].float()) for n, r in state.layers.items() if r.lowrank}
    out: Paths = {}
    for name, mod in model.named_modules():
        a = mod._buffers.get(LOWRANK_A) if isinstance(mod, (LlmpressLinear, LowRankLinear)) else None
        if a is not None:
            out[name] = (a.detach().float().cpu(), mod._buffers[LOWRANK_B].detach().float().cpu())
    return out


def strip_lowrank(model: nn.Module) -> int:
    """Remove every low-rank path from ``model`` (in place), leaving the compressed base that a
    PEFT adapter goes on: in-memory hooks removed, loaded :class:`LowRankLinear` layers become
    plain ``nn.Linear`` and packed layers drop their ``weight_lora_*`` buffers. Returns how many."""
    n = 0
    for name, mod in list(model.named_modules()):
        n += detach_lowrank(mod)
        if isinstance(mod, LowRankLinear):
            plain = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None)
            plain.to(device=mod.weight.device, dtype=mod.weight.dtype)
            plain.load_state_dict({k: v for k, v in mod.state_dict().items() if k in ("weight", "bias")})
            replace_module(model, name, plain)
            n += 1
        elif isinstance(mod, LlmpressLinear) and mod.fmt.lowrank is not None:
            del mod._buffers[LOWRANK_A], mod._buffers[LOWRANK_B]
            mod.fmt = ModuleFormat.from_dict({**mod.fmt.to_dict(), "lowrank": None}, name)
            n += 1
    return n


def write_peft_adapter(paths: Paths, out_dir: str | Path, base_model: str | None = None) -> Path:
    """Write low-rank paths as a PEFT LoRA adapter (``adapter_model.safetensors``,
    ``adapter_config.json``): ``lora_A = A``, ``lora_B = B``, ``lora_alpha = r`` (scaling 1);
    layers of another rank than the most common one go to ``rank_pattern``/``alpha_pattern``."""
    from safetensors.torch import save_file

    if not paths:
        raise LlmpressError("no layer has a low-rank path to write as an adapter: add an 'eora' stage")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ranks = {n: int(a.shape[0]) for n, (a, _) in paths.items()}
    r = max(set(ranks.values()), key=list(ranks.values()).count)
    tensors = {}
    for name, (a, b) in paths.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = a.to(torch.float16).contiguous().cpu()
        tensors[f"base_model.model.{name}.lora_B.weight"] = b.to(torch.float16).contiguous().cpu()
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    other = {n: k for n, k in ranks.items() if k != r}
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": r,
        "lora_alpha": r,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "target_modules": sorted(paths),
        "rank_pattern": {f"^{n}$".replace(".", r"\."): k for n, k in other.items()},
        "alpha_pattern": {f"^{n}$".replace(".", r"\."): k for n, k in other.items()},
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    log.info("PEFT adapter (%d layers, rank %d) written to %s", len(paths), r, out)
    return out


def load_peft_adapter(base: nn.Module, adapter_dir: str | Path) -> nn.Module:
    """Load a PEFT LoRA adapter on ``base`` (a compressed model without its low-rank paths,
    see :func:`strip_lowrank`) with ``peft``; packed layers are wrapped by peft's own LoRA
    ``Linear`` (registered for :class:`LlmpressLinear` as a custom module)."""
    try:
        from peft import LoraConfig, PeftModel
        from peft.tuners.lora.layer import Linear as LoraLinear
    except ImportError:  # pragma: no cover - optional dependency
        raise LlmpressError("loading a PEFT adapter needs peft: pip install peft") from None
    if any(_HANDLE in m.__dict__ or isinstance(m, LowRankLinear) for m in base.modules()):
        raise CheckpointError("the base still has its low-rank paths: call strip_lowrank(base) first")
    config = LoraConfig.from_pretrained(str(adapter_dir))
    config._register_custom_module({LlmpressLinear: LoraLinear})
    return PeftModel.from_pretrained(base, str(adapter_dir), config=config)
