"""Calibration data: token windows ``[nsamples, seqlen]`` drawn with a fixed seed.

Sources: a local ``.txt`` file (the whole text), a ``.jsonl`` file (one document per line,
``{"text": ...}``), a list of strings, a local dataset folder or a Hugging Face Hub
dataset id (through ``datasets``, streamed), or an already tokenized tensor.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from llmpress.errors import CalibrationError

log = logging.getLogger(__name__)

CalibrationSource = str | Path | Sequence[str] | torch.Tensor


def read_documents(
    source: str | Path | Sequence[str],
    *,
    split: str = "train",
    config_name: str | None = None,
    text_field: str = "text",
    max_documents: int = 20_000,
    what: str = "calibration",
) -> list[str]:
    """Documents from a file, a list of strings, a local dataset folder or a Hub dataset id.

    ``what`` names the data in error messages (``"evaluation"`` for ``llmpress eval --text``).
    """
    if isinstance(source, (list, tuple)):
        docs = [str(s) for s in source]
    else:
        path = Path(str(source))
        if len(str(source)) > 4096 or "\n" in str(source):
            raise CalibrationError(
                "a calibration string is taken as a path; pass raw text as a list of strings"
            )
        if path.is_file():
            docs = _read_file(path, text_field, what)
        elif path.is_dir() or not str(source).endswith((".txt", ".jsonl", ".json")):
            docs = _read_dataset(str(source), split, config_name, text_field, max_documents)
        else:
            raise CalibrationError(f"{what} file {path} does not exist")
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise CalibrationError(f"{what} source {source!r} holds no text")
    return docs


def _read_file(path: Path, text_field: str, what: str = "calibration") -> list[str]:
    try:
        return _read_text_file(path, text_field, what)
    except UnicodeDecodeError as e:
        raise CalibrationError(
            f"{what} file {path} is not UTF-8 text (a binary file?): {e.reason} at byte {e.start}; "
            f"use a .txt file or a .jsonl file with a 'text' field per line"
        ) from None


def _read_text_file(path: Path, text_field: str, what: str = "calibration") -> list[str]:
    if path.suffix.lower() in (".jsonl", ".json"):
        docs = []
        with path.open(encoding="utf-8") as f:
            for ln, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise CalibrationError(f"{path}:{ln}: not valid JSON ({e})") from e
                if isinstance(rec, str):
                    docs.append(rec)
                elif isinstance(rec, dict) and text_field in rec:
                    docs.append(str(rec[text_field]))
                else:
                    raise CalibrationError(
                        f"{path}:{ln}: expected a string or an object with a {text_field!r} field"
                    )
        return docs
    text = path.read_text(encoding="utf-8")
    if "\x00" in text:
        raise CalibrationError(f"{what} file {path} holds NUL bytes (a binary file?); use plain text")
    return [text]


def _read_dataset(name: str, split: str, config_name: str | None, text_field: str, limit: int) -> list[str]:
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise CalibrationError(
            f"{name!r} is not a local file, and reading a dataset needs `pip install llmpress[data]`"
        ) from e
    log.info("streaming calibration documents from dataset %s (%s, split %s)", name, config_name, split)
    try:
        ds = datasets.load_dataset(name, config_name, split=split, streaming=True)
    except Exception as e:
        raise CalibrationError(
            f"could not load calibration dataset {name!r} (split {split!r}): {e}. Pass a local .txt/.jsonl "
            f"file instead when offline"
        ) from e
    docs = []
    for rec in ds:
        if text_field not in rec:
            raise CalibrationError(f"dataset {name!r} has no {text_field!r} column; columns: {sorted(rec)}")
        docs.append(str(rec[text_field]))
        if len(docs) >= limit:
            break
    return docs


def tokenize_documents(tokenizer: Any, docs: Sequence[str]) -> torch.Tensor:
    """Token stream of all documents joined by the EOS token (if the tokenizer has one)."""
    eos = getattr(tokenizer, "eos_token_id", None)
    ids: list[int] = []
    for i, d in enumerate(docs):
        if i and eos is not None:
            ids.append(int(eos))
        ids.extend(tokenizer(d, add_special_tokens=False)["input_ids"])
    return torch.tensor(ids, dtype=torch.long)


def sample_windows(stream: torch.Tensor, nsamples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """``nsamples`` random windows of ``seqlen`` tokens from a 1-D stream -> [nsamples, seqlen]."""
    if nsamples < 1 or seqlen < 2:
        raise CalibrationError(f"need nsamples >= 1 and seqlen >= 2, got {nsamples} x {seqlen}")
    n = stream.numel()
    if n < seqlen:
        raise CalibrationError(
            f"calibration text has {n} tokens, fewer than one window of {seqlen}; give more text or a smaller --seqlen"
        )
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, n - seqlen + 1, (nsamples,), generator=g)  # [nsamples]
    return torch.stack([stream[s : s + seqlen] for s in starts.tolist()])  # [nsamples, seqlen]


def build_calibration(
    tokenizer: Any,
    source: CalibrationSource,
    nsamples: int = 128,
    seqlen: int = 2048,
    seed: int = 0,
    **dataset_kwargs: Any,
) -> torch.Tensor:
    """Calibration token ids [nsamples, seqlen] from any supported source."""
    if isinstance(source, torch.Tensor):
        if source.dim() == 2:
            return source[:nsamples, :seqlen].long()
        return sample_windows(source.long(), nsamples, seqlen, seed)
    docs = read_documents(source, **dataset_kwargs)
    stream = tokenize_documents(tokenizer, docs)
    log.info(
        "calibration: %d tokens from %d documents -> %d x %d", stream.numel(), len(docs), nsamples, seqlen
    )
    return sample_windows(stream, nsamples, seqlen, seed)
