"""Atomic saving of compressed models: write to a temporary folder, then rename."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from llmpress.report import CompressionReport

log = logging.getLogger(__name__)

REPORT_FILE = "llmpress_report.json"
RECIPE_FILE = "llmpress_recipe.json"


@contextlib.contextmanager
def atomic_directory(out_dir: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``out_dir``; on success it replaces ``out_dir``.

    On any error the temporary folder is removed and ``out_dir`` is left as it was.
    """
    out = Path(out_dir).resolve()
    if out.exists() and not overwrite:
        raise FileExistsError(
            f"output directory {out} already exists; pass overwrite=True (--overwrite) or pick another"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_compressed(
    model: Any,
    out_dir: str | Path,
    *,
    tokenizer: Any = None,
    report: CompressionReport | None = None,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    extra: Callable[[Path], None] | None = None,
) -> Path:
    """Save a pruned model as an ordinary checkpoint plus the recipe and measured sparsity.

    The folder loads with plain ``AutoModel*.from_pretrained`` (no llmpress needed).
    ``dtype`` casts the saved weights (e.g. back to the checkpoint's fp16).
    """
    with atomic_directory(out_dir, overwrite) as tmp:
        if dtype is not None and dtype != next(model.parameters()).dtype:
            orig = next(model.parameters()).dtype
            model.to(dtype)
            try:
                model.save_pretrained(tmp)
            finally:
                model.to(orig)
        else:
            model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if report is not None:
            (tmp / REPORT_FILE).write_text(json.dumps(report.to_dict(), indent=2))
            (tmp / RECIPE_FILE).write_text(json.dumps(report.recipe, indent=2))
        if extra is not None:
            extra(tmp)
    log.info("saved to %s", out_dir)
    return Path(out_dir)
