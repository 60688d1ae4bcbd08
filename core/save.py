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
            # save a cast copy of the weights; the model itself is left as it is
            state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in model.state_dict().items()}
            old = getattr(model.config, "dtype", None)
            model.config.dtype = dtype
            try:
                model.save_pretrained(tmp, state_dict=state)
            finally:
                model.config.dtype = old
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


def cast_saved_tensors(model: Any, dtype: torch.dtype) -> None:
    """Cast floating parameters and *persistent* buffers to ``dtype`` (in place), leaving
    computed buffers such as RoPE's ``inv_freq`` as ``from_pretrained`` would: the model then
    computes exactly like its saved-and-reloaded copy."""
    persistent = set(model.state_dict().keys())
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point() and (name in persistent) and t.dtype != dtype:
            t.data = t.data.to(dtype)


def pack_model(
    model: Any, report: CompressionReport, sparse: str = "auto", dtype: torch.dtype = torch.float16
) -> dict[str, dict[str, Any]]:
    """Replace each compressed layer by its packed runtime module (in place).

    Quantized layers become ``int`` (or ``int-2:4``); pruned-only layers become ``2:4`` or
    ``bitmask`` when that is smaller (``sparse="dense"`` keeps them dense). Returns the
    per-module format entries for ``quantization_config``.
    """
    from llmpress.formats import choose_format
    from llmpress.modules import get_weight
    from llmpress.plugin_manager import get_plugin_manager
    from llmpress.runtime import replace_module

    hook = get_plugin_manager().hook
    dtype_name = str(dtype).replace("torch.", "")
    modules: dict[str, dict[str, Any]] = {}
    from llmpress.runtime import LlmpressLinear

    for name, rep in report.modules.items():
        mod = model.get_submodule(name)
        if isinstance(mod, LlmpressLinear):  # packed by an earlier save: keep it as it is
            modules[name] = mod.fmt.to_dict()
            continue
        quant = report.quant_state.get(name)
        w = get_weight(mod)
        keep = (w != 0) if (rep.sparsity > 0 or quant is not None) else None
        target = choose_format(quant, keep, sparse)
        if target is None:
            continue
        res = hook.llmpress_export_kernel(
            module=mod, packed={"quant": quant, "keep": keep, "dtype": dtype_name}, target=target
        )
        if res is None:
            raise RuntimeError(f"no plugin exports {name} to format {target!r}")
        replace_module(model, name, res["module"])
        modules[name] = res["config"]
    return modules


def save_quantized(
    model: Any,
    out_dir: str | Path,
    *,
    report: CompressionReport,
    tokenizer: Any = None,
    sparse: str = "auto",
    dtype: torch.dtype = torch.float16,
    overwrite: bool = False,
) -> Path:
    """Pack the compressed layers (in place), then save with a ``quantization_config``.

    The folder loads with ``import llmpress; AutoModel*.from_pretrained(dir)``. Without
    packed layers (dense pruning) it is an ordinary checkpoint, as :func:`save_compressed`.
    """
    from llmpress.hf_quantizer import LlmpressConfig

    cast_saved_tensors(model, dtype)
    modules = pack_model(model, report, sparse, dtype)
    if modules:
        model.config.quantization_config = LlmpressConfig(modules=modules, recipe=report.recipe)
    return save_compressed(model, out_dir, tokenizer=tokenizer, report=report, overwrite=overwrite)


def save_result(
    model: Any,
    out_dir: str | Path,
    *,
    report: CompressionReport,
    tokenizer: Any = None,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    fmt: str = "llmpress",
    sparse_format: str | None = None,
) -> Path:
    """Save a compression result in the right form: packed (quantized, or pruned with a
    sparse format), compressed-tensors, or an ordinary dense checkpoint."""
    if fmt == "compressed-tensors":
        from llmpress.compressed_tensors import save_compressed_tensors

        return save_compressed_tensors(
            model,
            out_dir,
            report=report,
            tokenizer=tokenizer,
            overwrite=overwrite,
            dtype=dtype or torch.float16,
        )
    if fmt != "llmpress":
        raise ValueError(f"unknown format {fmt!r}; use 'llmpress' or 'compressed-tensors'")
    if report.quant_state or sparse_format not in (None, "dense"):
        return save_quantized(
            model,
            out_dir,
            report=report,
            tokenizer=tokenizer,
            sparse=sparse_format or "auto",
            dtype=dtype or torch.float16,
            overwrite=overwrite,
        )
    return save_compressed(
        model, out_dir, tokenizer=tokenizer, report=report, dtype=dtype, overwrite=overwrite
    )
