"""Perplexity over non-overlapping windows of a text (each window scored independently).

A model that produces NaN/inf (a damaged checkpoint, an fp16 overflow) raises
:class:`~llmpress.errors.EvalTaskError` instead of returning a NaN or infinite perplexity, and
windows longer than the model's positions raise :class:`~llmpress.errors.ModelError` (past them a
model gives a finite but wrong perplexity). Text files get the checks calibration files get
(UTF-8, not binary, not empty).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from llmpress.cli.eval_harness import NON_FINITE_HINT
from llmpress.engine.calibration import read_documents
from llmpress.errors import CalibrationError, EvalTaskError, ModelError
from llmpress.format.loading import max_positions


def read_text(path: str | Path) -> str:
    """The text of an evaluation file: a ``.txt`` whole, a ``.jsonl`` its ``text`` fields joined by
    blank lines.

    :raises CalibrationError: no such file, not UTF-8 (a binary file), or no text in it.
    """
    path = Path(path)
    if not path.is_file():
        problem = "is not a file" if path.exists() else "does not exist"
        raise CalibrationError(f"evaluation file {path} {problem}")
    return "\n\n".join(read_documents(str(path), what="evaluation"))


def check_seqlen(model_config: Any, seqlen: int, option: str = "seqlen") -> None:
    """Raise :class:`ModelError` when windows of ``seqlen`` tokens exceed the model's positions
    (or are shorter than 2 tokens: nothing to predict). ``option`` names the setting in the message."""
    if seqlen < 2:
        raise ModelError(f"{option} {seqlen}: a window needs at least 2 tokens (one predicts the next)")
    limit = max_positions(model_config)
    if limit is not None and seqlen > limit:
        raise ModelError(
            f"{option} {seqlen} exceeds the model's {limit} positions; use {option} {limit} or less"
        )


def text_windows(tokenizer: Any, text: str, seqlen: int, max_tokens: int | None = None) -> torch.Tensor:
    """Token windows [n, seqlen] of ``text`` (remainder dropped)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    n = len(ids) // seqlen
    if n == 0:
        cut = f" (cut to max_tokens {max_tokens})" if max_tokens is not None else ""
        raise CalibrationError(
            f"the evaluation text has {len(ids)} tokens{cut}, fewer than one window of {seqlen}; "
            "give more text or a smaller seqlen (--seqlen)"
        )
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
    check_seqlen(model.config, windows.shape[1])
    if batch_size < 1:
        raise ModelError(f"batch_size must be at least 1, got {batch_size}")
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
    """Perplexity of ``model`` on a text (or a text file path) in windows of ``seqlen``.

    :raises ModelError: ``seqlen`` exceeds the model's positions (checked before any work).
    :raises CalibrationError: a file that is missing, binary or empty, or text shorter than a window.
    """
    check_seqlen(model.config, seqlen)
    if isinstance(text, Path) or (isinstance(text, str) and len(text) < 4096 and Path(text).is_file()):
        text = read_text(text)
    windows = text_windows(tokenizer, str(text), seqlen, max_tokens)
    return perplexity_of_windows(model, windows, batch_size, device, progress)
