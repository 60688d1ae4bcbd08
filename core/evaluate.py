"""Perplexity over non-overlapping windows of a text (each window scored independently).

A model that produces NaN/inf (a damaged checkpoint, an fp16 overflow) raises
:class:`~llmpress.errors.EvalTaskError` instead of returning a NaN or infinite perplexity.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from llmpress.errors import EvalTaskError, ModelError
from llmpress.eval_harness import NON_FINITE_HINT


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
    for i, x in enumerate(tqdm(windows.split(batch_size), desc="perplexity", disable=not progress)):
        x = x.to(dev)
        logits = model(input_ids=x, use_cache=False).logits[:, :-1].float()  # [B, L-1, V]
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1), reduction="sum")
        if not bool(torch.isfinite(loss)):
            first = i * batch_size
            raise _non_finite(logits, f"windows {first}..{first + x.shape[0] - 1}")
        nll += loss.item()
        count += x[:, 1:].numel()
    if nll / count > _MAX_LOG_PERPLEXITY:
        raise EvalTaskError(
            f"perplexity: the mean NLL {nll / count:.4g} overflows exp() (perplexity = inf). {NON_FINITE_HINT}"
        )
    return {
        "perplexity": math.exp(nll / count),
        "nll": nll / count,
        "tokens": float(count),
        "windows": float(windows.shape[0]),
    }


_MAX_LOG_PERPLEXITY = math.log(1e300)  # exp() of more overflows a float


def _non_finite(logits: torch.Tensor, where: str) -> EvalTaskError:
    """The error for a NaN/inf loss: says whether the logits themselves hold NaN or inf."""
    if bool(torch.isnan(logits).any()):
        cause = "its logits contain NaN"
    elif bool(torch.isinf(logits).any()):
        cause = "its logits contain inf"
    else:
        cause = "the loss is not finite"
    return EvalTaskError(f"perplexity: the model produces NaN/inf on {where} ({cause}). {NON_FINITE_HINT}")


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
