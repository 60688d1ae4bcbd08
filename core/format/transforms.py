"""Online transforms: a Hadamard rotation of a layer's inputs, applied at run time (QuaRot's R4).

An offline rotation is fused into the weights and needs nothing at run time. An *online* one
(the Hadamard before ``down_proj``) is a computation on every call: the layer's weight was
rotated offline (``W H``) and its input is rotated at run time (``x H``), so that
``(x H)(W H)^T = x W^T``. Each is stored in ``quantization_config.transforms`` as an
:class:`OnlineTransform` entry (type, where it applies, its size and construction, which
layers), and rebuilt on load by :func:`attach_transforms`: every named layer gets an
:class:`OnlineHadamard` child (``<layer>.online_transform``, no tensors: the matrix is rebuilt
from its plan) and a forward pre-hook that applies it first. The layer keeps its state-dict
names, and the hook runs before any other pre-hook (calibration statistics see the rotated
inputs). Cost: one transform per call of each layer, ``n log2 n`` additions per row for a
Sylvester block plus an ``m x m`` matmul for a Paley base ``m``
(:mod:`llmpress.kernels.hadamard`: Triton on GPU, torch on CPU).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from llmpress.errors import CheckpointError
from llmpress.kernels.hadamard import fwht
from llmpress.math.hadamard import HadamardPlan, HadamardSizeError, apply_hadamard, hadamard_plan

#: the name of the transform child of a layer
CHILD = "online_transform"


class OnlineTransform(BaseModel):
    """One entry of ``quantization_config.transforms``: a Hadamard transform of ``size`` inputs
    (diagonal blocks of ``block_size``, each Paley ``base`` (1: none) times Sylvester) applied
    to the input of every layer in ``modules`` (``location: input``; the weight was rotated
    offline)."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    type: Literal["hadamard"] = "hadamard"
    location: Literal["input"] = "input"
    size: int = Field(ge=2)
    block_size: int = Field(ge=2)
    base: int = Field(default=1, ge=1)
    modules: list[str]
    #: what the transform is in the method's words (``"R4"``)
    role: str | None = None

    @model_validator(mode="after")
    def _constructible(self) -> OnlineTransform:
        try:
            plan = hadamard_plan(self.size, self.block_size)
        except HadamardSizeError as e:
            raise ValueError(str(e)) from None
        if plan.base != self.base:
            raise ValueError(f"block {self.block_size} is built with base {plan.base}, not {self.base}")
        return self

    @classmethod
    def of(cls, plan: HadamardPlan, modules: list[str], role: str | None = None) -> OnlineTransform:
        return cls(size=plan.size, block_size=plan.block, base=plan.base, modules=modules, role=role)

    def plan(self) -> HadamardPlan:
        return HadamardPlan(self.size, self.block_size, self.base)

    def describe(self) -> str:
        """One line for reports and model cards: what it is, where, and its cost per call."""
        who = f"{self.role} " if self.role else ""
        return (
            f"{who}online {self.plan().describe()} on the input of {len(self.modules)} layers "
            f"(one transform per call of each)"
        )


class OnlineHadamard(nn.Module):
    """``x -> x @ M`` of a :class:`HadamardPlan` on the last dimension (no stored tensors)."""

    def __init__(self, plan: HadamardPlan) -> None:
        super().__init__()
        self.plan = plan

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return apply_hadamard(x, self.plan, fwht)

    def extra_repr(self) -> str:
        return self.plan.describe()


def _pre_hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    return (getattr(module, CHILD)(args[0]), *args[1:])


def attach(module: nn.Module, plan: HadamardPlan) -> None:
    """Rotate ``module``'s input online by ``plan`` (idempotent for the same plan)."""
    have = getattr(module, CHILD, None)
    if isinstance(have, OnlineHadamard):
        if have.plan != plan:
            raise CheckpointError(f"{type(module).__name__} already has another online transform")
        return
    module.add_module(CHILD, OnlineHadamard(plan))
    module.register_forward_pre_hook(_pre_hook, prepend=True)


def attach_transforms(model: nn.Module, entries: list[OnlineTransform] | list[dict[str, Any]]) -> None:
    """Rebuild the online transforms of a saved model (``quantization_config.transforms``)."""
    known = dict(model.named_modules())
    for raw in entries:
        entry = raw if isinstance(raw, OnlineTransform) else OnlineTransform.model_validate(raw)
        for name in entry.modules:
            mod = known.get(name)
            if mod is None:
                raise CheckpointError(
                    f"quantization_config.transforms names module {name!r}, which this "
                    f"{type(model).__name__} does not have; the checkpoint does not match its config.json"
                )
            width = getattr(mod, "in_features", None)
            if width is not None and width != entry.size:
                raise CheckpointError(
                    f"{name}: an online Hadamard of size {entry.size} for a layer of {width} inputs"
                )
            attach(mod, entry.plan())


def online_transforms(model: nn.Module) -> dict[str, HadamardPlan]:
    """Layer name -> the plan of its online transform, for every layer that has one."""
    suffix = "." + CHILD
    return {
        n[: -len(suffix)]: m.plan
        for n, m in model.named_modules()
        if n.endswith(suffix) and isinstance(m, OnlineHadamard)
    }
