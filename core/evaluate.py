"""Perplexity over non-overlapping windows of a text (each window scored independently)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from llmpress.errors import ModelError


def text_windows(tokenizer: Any, text: str, seqlen: int, max_tokens: int | None = None) -> torch.Tensor:
    """Token windows [n, seqlen] of ``text`` (remainder dropped)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    n = len(ids) // seqlen
    if n == 0:
        raise ValueError(f"text has {len(ids)} tokens, fewer than one window of {seqlen}")
    return torch.tensor(ids[: n * seqlen], dtype=torch.long).view(n, seqlen)


@torch.no_grad()
def perplexity_of_windows(
    model: nn.Module,
    windows: torch.Tensor,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """exp(mean NLL) over all next-token predictions of every window; logits in fp32."""
    if not getattr(model.config, "is_decoder", False) and not _is_causal(model):
        raise ModelError(f"perplexity needs a causal LM; {type(model).__name__} is not one")
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    nll, count = 0.0, 0
    for x in tqdm(windows.split(batch_size), desc="perplexity", disable=not progress):
        x = x.to(dev)
        logits = model(input_ids=x, use_cache=False).logits[:, :-1].float()  # [B, L-1, V]
        nll += F.cross_entropy(
            logits.reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1), reduction="sum"
        ).item()
        count += x[:, 1:].numel()
    return {
        "perplexity": math.exp(nll / count),
        "nll": nll / count,
        "tokens": float(count),
        "windows": float(windows.shape[0]),
    }


def _is_causal(model: nn.Module) -> bool:
    from transformers.models.auto import modeling_auto

    names = set(modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    return type(model).__name__ in names or type(model).__name__.endswith("ForCausalLM")


def perplexity(
    model: nn.Module,
    tokenizer: Any,
    text: str | Path,
    seqlen: int = 256,
    batch_size: int = 8,
    max_tokens: int | None = None,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """Perplexity of ``model`` on a text (or a text file path) in windows of ``seqlen``."""
    if isinstance(text, Path) or (isinstance(text, str) and len(text) < 4096 and Path(text).is_file()):
        text = Path(text).read_text(encoding="utf-8")
    windows = text_windows(tokenizer, str(text), seqlen, max_tokens)
    return perplexity_of_windows(model, windows, batch_size, device, progress)
