"""A GPU memory budget (``--max-gpu-memory``): what stays on the GPU, what waits on the CPU.

The budget covers the weights accelerate keeps on the GPU plus the compression working set:
two blocks' weights (the onloaded one and its compressed copy), fp32 statistics of the
block's inputs (only the one being solved when statistics rest on the CPU, as they do for
many-expert blocks), and the calibration activations unless they rest on the CPU. The
activations cross to the GPU for every pass over every block, the offloaded weights once, so
the activations keep the GPU first and the weights get what is left.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from typing import TYPE_CHECKING

from llmpress.errors import LlmpressError

if TYPE_CHECKING:
    from transformers import PretrainedConfig

log = logging.getLogger(__name__)

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_memory(text: str) -> int:
    """Bytes of a size like ``20GiB``, ``500MB`` or ``1e9``."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    unit = m.group(2).upper() if m else ""
    if m is None or unit not in _UNITS:
        raise LlmpressError(f"--max-gpu-memory {text!r} is not a size; write it like 20GiB, 500MiB or 40GB")
    return int(float(m.group(1)) * _UNITS[unit])


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """``weights``: bytes of weights accelerate may place on the GPU; ``offload_activations``:
    keep calibration activations on the CPU."""

    weights: int
    offload_activations: bool
    working_set: int
    #: keep layer input statistics on the CPU (mixture-of-experts blocks: one ``X^T X`` per expert)
    offload_stats: bool = False


def plan_memory(
    config: PretrainedConfig, budget: int, nsamples: int, seqlen: int, param_bytes: int, world: int = 1
) -> MemoryPlan:
    """Split ``budget`` between resident weights and the compression working set."""
    h = int(getattr(config, "hidden_size", 0) or 0)
    inter = int(getattr(config, "intermediate_size", 0) or 4 * h)
    layers = int(getattr(config, "num_hidden_layers", 1) or 1)
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    experts = int(getattr(config, "num_local_experts", 0) or getattr(config, "num_experts", 0) or 0)
    moe_inter = int(getattr(config, "moe_intermediate_size", 0) or inter)
    if experts:  # attention, then every expert's MLP (gate/up input, down input)
        block_params = 4 * h * h + 3 * h * moe_inter * experts
        stats = 4 * (2 * h * h + experts * (h * h + moe_inter * moe_inter))
    else:
        block_params = 4 * h * h + 3 * h * inter
        stats = 4 * (h * h + inter * inter)  # the widest inputs' X^T X (attention/MLP in, MLP down)
    solve = 2 * 4 * max(h, inter, moe_inter) ** 2  # one layer's X^T X and its factor, for its solve
    block = block_params * param_bytes
    acts = 2 * -(-nsamples // world) * seqlen * h * param_bytes  # block inputs and outputs
    base = 2 * block + 2 * vocab * h * param_bytes // max(layers, 1)
    # statistics go to the CPU when they are a large share (many experts) or do not fit with the
    # activations; activations cross to the GPU for every pass over every block, weights once:
    # activations stay on the GPU whenever they fit, the weights get what is left
    offload_stats = stats > budget // 4 or (base + stats + acts > budget and base + solve + acts <= budget)
    fixed = base + (solve if offload_stats else stats)
    offload_acts = fixed + acts > budget
    working = fixed + (0 if offload_acts else acts)
    if working >= budget:
        need = (working + 2**30 - 1) // 2**30
        raise LlmpressError(
            f"--max-gpu-memory {budget / 2**30:.1f}GiB is less than one block's working set (~{need}GiB); "
            f"raise it, or lower --nsamples/--seqlen"
        )
    log.info(
        "GPU budget %.1f GiB: %.1f GiB for weights, calibration activations on %s, statistics on %s",
        budget / 2**30,
        (budget - working) / 2**30,
        "CPU" if offload_acts else "GPU",
        "CPU" if offload_stats else "GPU",
    )
    return MemoryPlan(
        weights=budget - working,
        offload_activations=offload_acts,
        working_set=working,
        offload_stats=offload_stats,
    )
