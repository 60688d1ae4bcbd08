"""The ``llmpress`` command line: compress, eval, plugins, demo."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmpress.errors import LlmpressError

if TYPE_CHECKING:
    from llmpress.model.report import CompressionReport
    from llmpress.recipe.recipes import Recipe

log = logging.getLogger("llmpress")


def check_device(device: str) -> None:
    """Raise :class:`LlmpressError` unless ``device`` names a device this torch can use."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as e:
        raise LlmpressError(
            f"--device {device!r} is not a device name ({e}); use cpu, cuda or cuda:N"
        ) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise LlmpressError(
                f"--device {device}: this torch ({torch.__version__}) sees no CUDA GPU; use --device cpu, or "
                f"install a CUDA build of torch"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise LlmpressError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) visible")
    elif dev.type not in ("cpu", "meta") and not getattr(torch, dev.type, None):
        raise LlmpressError(f"--device {device}: unsupported device type {dev.type!r}")


def load_tokenizer(name: str) -> Any:
    """The tokenizer ``--tokenizer NAME`` names (a folder or Hub id), or :class:`LlmpressError`."""
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError, TypeError) as e:
        raise LlmpressError(
            f"--tokenizer {name}: no tokenizer could be loaded ({e}); give a folder with tokenizer files "
            f"(tokenizer.json or tokenizer_config.json) or a Hub id"
        ) from None


def _compress(a: argparse.Namespace) -> int:
    from llmpress.engine import distributed
    from llmpress.format.output import check_output_path, claim_output
    from llmpress.plugin_manager import get_plugin_manager
    from llmpress.recipe.recipes import Recipe

    recipe = Recipe.load(a.recipe)
    stages = recipe.resolve(get_plugin_manager())  # unknown method / bad option: fail before loading anything
    if a.format == "compressed-tensors":
        from llmpress.cli.export_checks import check_recipe_exportable

        check_recipe_exportable([s.config for s in stages])
    check_device(a.device)
    if a.max_gpu_memory is not None:
        from llmpress.cli.budget import parse_memory

        parse_memory(a.max_gpu_memory)  # a bad size fails before loading anything
        if not a.device.startswith("cuda"):
            raise LlmpressError("--max-gpu-memory budgets a GPU: use it with --device cuda (or cuda:N)")
    if a.calib is not None and Path(a.calib).is_file():
        from llmpress.engine.calibration import read_documents

        read_documents(a.calib)  # an unreadable or binary file fails now, not after loading the model
    started = not distributed.is_initialized()
    a.device = distributed.init_from_env(a.device)  # torchrun / accelerate launch: join the group
    try:
        if not distributed.is_main():  # only rank 0 writes; the others compress their share and wait
            check_output_path(Path(a.out).resolve(), a.overwrite)
            return _compress_into(a, recipe, None)
        with claim_output(a.out, a.overwrite) as out:  # held until saved: a concurrent run fails at once
            return _compress_into(a, recipe, out)
    finally:
        if started and distributed.is_initialized():
            import torch.distributed as dist

            dist.destroy_process_group()


def _load_for_compress(a: argparse.Namespace) -> tuple[Any, Any, bool, bool]:
    """``(model, tokenizer, offload_activations, offload_stats)``: loaded whole, or under
    ``--max-gpu-memory`` with accelerate (the rest offloaded to CPU) and activations and
    statistics on CPU when they do not fit."""
    import torch

    from llmpress.engine import distributed
    from llmpress.format.loading import load_model, stored_dtype

    if a.max_gpu_memory is None:
        model, tok = load_model(a.model, dtype=a.dtype, device="cpu" if a.offload_model else a.device)
        return model, tok, a.offload_activations, a.offload_stats
    import transformers
    from accelerate.utils import get_max_memory

    from llmpress.cli.budget import parse_memory, plan_memory

    dev = torch.device(a.device)
    cfg = transformers.AutoConfig.from_pretrained(a.model)
    dt = stored_dtype(a.model) if a.dtype == "auto" else getattr(torch, str(a.dtype), None)
    nbytes = dt.itemsize if isinstance(dt, torch.dtype) else 2
    plan = plan_memory(
        cfg, parse_memory(a.max_gpu_memory), a.nsamples, a.seqlen, nbytes, distributed.world_size()
    )
    idx = dev.index if dev.index is not None else torch.cuda.current_device()
    budgets = {k: v for k, v in get_max_memory().items() if not isinstance(k, int)}  # cpu (and disk)
    budgets[idx] = plan.weights
    model, tok = load_model(
        a.model, dtype=a.dtype, device=a.device, max_memory=budgets, offload_folder=a.offload_folder
    )
    return (
        model,
        tok,
        a.offload_activations or plan.offload_activations,
        a.offload_stats or plan.offload_stats,
    )


def _compress_into(a: argparse.Namespace, recipe: Any, out: Path | None) -> int:
    """Load, compress and (with ``out``; ``None`` on ranks other than 0) save."""
    import torch

    from llmpress.cli.evaluate import check_seqlen
    from llmpress.engine import distributed
    from llmpress.format.loading import stored_dtype
    from llmpress.format.save import save_result
    from llmpress.pipeline.compress import compress

    saved_dtype = stored_dtype(a.model)  # read before loading: loading in fp32 overwrites config.dtype
    own_tok = None if a.tokenizer is None else load_tokenizer(a.tokenizer)  # a bad name fails before loading
    model, tok, offload_activations, offload_stats = _load_for_compress(a)
    tok = own_tok if own_tok is not None else tok
    if a.format == "compressed-tensors":  # MoE expert projections: refused before any work
        from llmpress.cli.export_checks import check_model_exportable
        from llmpress.plugin_manager import get_plugin_manager

        check_model_exportable(model, recipe.resolve(get_plugin_manager()))
    if a.calib is not None:
        check_seqlen(model.config, a.seqlen, "--seqlen")
    model, report = compress(
        model,
        recipe,
        a.calib,
        tokenizer=tok,
        nsamples=a.nsamples,
        seqlen=a.seqlen,
        seed=a.seed,
        device=a.device,
        batch_size=a.batch_size,
        offload_activations=offload_activations,
        offload_stats=offload_stats,
        progress=distributed.is_main(),
    )
    if out is None:
        distributed.barrier()  # rank 0 saves
        return 0
    save_dtype = saved_dtype if isinstance(saved_dtype, torch.dtype) and not a.keep_dtype else None
    save_result(
        model,
        out,
        report=report,
        tokenizer=tok,
        dtype=save_dtype,
        overwrite=a.overwrite,
        fmt=a.format,
        sparse_format=a.sparse_format,
    )
    distributed.barrier()
    print(compress_summary(report, recipe, out))
    if report.allocation is not None:
        al = report.allocation
        print(
            f"allocation {al['method']}: {al['kind']} budget {al['target']:g} met exactly, "
            f"fitness {al['fitness']}, {al['evaluations']} evaluations"
            + (f"; dropped {', '.join(al['dropped'])}" if al.get("dropped") else "")
        )
    return 0


def compress_summary(report: CompressionReport, recipe: Recipe, out: Path) -> str:
    """The line ``compress`` prints: the measures that apply to the recipe (sparsity when a
    stage prunes, block parameters removed, bits per weight when quantized), size on disk, time."""
    from llmpress.plugin_manager import get_plugin_manager

    stages = recipe.resolve(get_plugin_manager())
    parts = []
    if any(s.config.sparsity_target() is not None for s in stages):
        parts.append(f"overall sparsity {report.overall_sparsity:.4f}")
    removed = report.structure.get("removed_fraction")
    if removed is not None:
        parts.append(f"block parameters removed {removed:.4f}")
    if report.average_bits is not None:
        parts.append(f"{report.average_bits:.2f} bits per weight")
    mb = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 1e6
    parts.append(f"{mb / 1e3:.2f} GB on disk" if mb >= 1e3 else f"{mb:.2f} MB on disk")
    parts.append(f"{report.wall_time_s:.1f}s")
    return f"compressed {len(report.modules)} layers to {out} ({', '.join(parts)})"


def _evaluate(
    a: argparse.Namespace, model_path: str, tasks: list[str], quiet: bool
) -> tuple[dict[str, Any], list]:
    """Perplexity on ``--text`` and the lm-eval ``tasks`` of one model: ``(numbers, records)``."""
    from llmpress.cli.eval_harness import parse_limit, perplexity_record, run_lm_eval
    from llmpress.cli.evaluate import perplexity
    from llmpress.format.loading import dtype_name, load_model

    model, tok = load_model(model_path, dtype=a.dtype, device=a.device)
    tok = load_tokenizer(a.tokenizer) if a.tokenizer else tok
    if tok is None:
        raise LlmpressError(
            f"{model_path} has no tokenizer; {'perplexity' if a.text else 'evaluation'} needs one: "
            f"pass --tokenizer PATH_OR_ID"
        )
    out: dict[str, Any] = {"dtype": dtype_name(next(model.parameters()).dtype)}
    records = []
    if a.text is not None:
        res = perplexity(
            model,
            tok,
            Path(a.text),
            seqlen=a.seqlen,
            batch_size=a.batch_size,
            max_tokens=a.max_tokens,
            device=a.device,
            progress=not quiet,
        )
        out.update(res)
        records.append(perplexity_record(res, a.text, a.seqlen))
    if tasks:
        task_records = run_lm_eval(
            model,
            tok,
            tasks,
            limit=parse_limit(a.limit),
            include_path=a.include_path,
            batch_size=a.batch_size,
        )
        records += task_records
        table: dict[str, dict[str, float]] = {}
        for r in task_records:
            table.setdefault(r.task, {})[r.metric] = r.value
        out["tasks"] = table
    return out, records


def _baseline_model(a: argparse.Namespace, config: Any) -> tuple[str, str | None]:
    """``(base, note)``: the ``--baseline`` model (the report's when ``auto``), checked before anything
    is evaluated - it loads (config, tokenizer), reads text in windows of ``--seqlen``, and has this
    model's tokenizer and vocabulary (else the recovery compares different things). ``note`` names a
    differing architecture. A local folder is returned as an absolute path (the cache's key)."""
    import transformers

    from llmpress.cli.eval_harness import tokenizer_difference
    from llmpress.cli.evaluate import check_seqlen
    from llmpress.errors import ModelError
    from llmpress.format.loading import load_config, model_source
    from llmpress.model.report import stored_base

    base, where = a.baseline, "--baseline"
    if base == "auto":
        report = Path(a.model_dir) / "llmpress_report.json"
        base = json.loads(report.read_text()).get("base_model") if report.is_file() else None
        if not base:
            raise LlmpressError(
                f"{a.model_dir} does not record its base model; name it: --baseline MODEL (a folder or Hub id)"
            )
        where = f"the base model recorded in {report}"
    try:
        base_config = load_config(base)
    except ModelError as e:
        fix = "; name it: --baseline MODEL (a folder or Hub id)" if a.baseline == "auto" else ""
        raise LlmpressError(f"{where}: {e}{fix}") from None
    base = stored_base(model_source(base)) or base
    if a.text is not None:
        try:
            check_seqlen(base_config, a.seqlen, "--seqlen")
        except ModelError as e:
            raise LlmpressError(f"base model {base}: {e}") from None
    toks = []
    for path in (a.model_dir, base):
        try:
            toks.append(transformers.AutoTokenizer.from_pretrained(model_source(path)))
        except (OSError, ValueError, TypeError) as e:
            raise LlmpressError(f"{path} has no tokenizer ({e}); evaluation needs one") from None
    diff = tokenizer_difference(*toks)
    sizes = getattr(config, "vocab_size", None), getattr(base_config, "vocab_size", None)
    if diff is None and sizes[0] != sizes[1]:
        diff = f"vocabulary sizes {sizes[0]} and {sizes[1]} in config.json"
    if diff is not None:
        raise LlmpressError(
            f"base model {base} does not share this model's tokenizer ({diff}): its scores are not comparable; "
            "give the model this one was compressed from: --baseline MODEL"
        )
    archs = [
        getattr(c, "architectures", None) or [getattr(c, "model_type", "?")] for c in (config, base_config)
    ]
    note = None
    if archs[0] != archs[1]:
        note = f"the base model {base} is a {'/'.join(archs[1])}, this model a {'/'.join(archs[0])}"
    return base, note


def _baseline_records(a: argparse.Namespace, base: str, tasks: list[str], quiet: bool) -> list:
    """The base model's records for ``--baseline``: from the cache beside the results, else evaluated."""
    from llmpress.cli.eval_harness import load_baseline, save_baseline

    settings = {
        "text": None if a.text is None else Path(a.text).name,
        "seqlen": a.seqlen,
        "max_tokens": a.max_tokens,
        "tasks": sorted(tasks),
        "limit": a.limit,
        "dtype": a.dtype,
    }
    cached = load_baseline(a.model_dir, base, settings)
    if cached:
        log.info("base model %s: cached results", base)
        return cached
    log.info("evaluating the base model %s", base)
    _, records = _evaluate(a, base, tasks, quiet)
    if not a.no_save and Path(a.model_dir).is_dir():
        save_baseline(a.model_dir, base, settings, records)
    return records


def _check_eval_inputs(a: argparse.Namespace, tasks: list[str]) -> Any:
    """Refuse what ``llmpress eval`` cannot evaluate before any model is loaded; the model's config."""
    from llmpress.cli.evaluate import check_seqlen, read_text
    from llmpress.format.loading import load_config

    if a.text is None and not tasks:
        raise LlmpressError(
            "eval needs --text FILE (perplexity) and/or --tasks T1,T2 (lm-eval-harness tasks)"
        )
    if a.batch_size < 1:
        raise LlmpressError(f"--batch-size must be at least 1, got {a.batch_size}")
    if a.text is not None:
        if a.max_tokens is not None and a.max_tokens < a.seqlen:
            raise LlmpressError(
                f"--max-tokens {a.max_tokens} is fewer than one window of --seqlen {a.seqlen}; raise it"
            )
        read_text(a.text)  # missing, binary or empty: refused now, not after loading the model
    config = load_config(a.model_dir)
    if a.text is not None:
        check_seqlen(config, a.seqlen, "--seqlen")
    return config


def _eval(a: argparse.Namespace) -> int:
    """``llmpress eval``: perplexity on ``--text`` and/or lm-eval ``--tasks`` on one loaded model.

    ``--json`` prints one JSON object: the perplexity keys at the top level and
    ``"tasks": {task: {metric: value}}`` when tasks ran. Results are merged into
    ``DIR/llmpress_eval.json`` (unless ``--no-save``) for the model card. ``--baseline``
    also evaluates the base model (once; cached in ``DIR/llmpress_eval_baseline.json``) and
    records its value and the recovery next to each result; the base model is checked first
    (it loads, shares this model's tokenizer; a differing architecture is named).
    """
    from llmpress.cli.eval_harness import save_eval, with_baseline

    tasks = [t.strip() for t in (a.tasks or "").split(",") if t.strip()]
    config = _check_eval_inputs(a, tasks)
    base, note = _baseline_model(a, config) if a.baseline else (None, None)
    out, records = _evaluate(a, a.model_dir, tasks, a.json)
    if base is not None:
        records = with_baseline(records, _baseline_records(a, base, tasks, a.json))
        out["baseline"] = {f"{r.task}/{r.metric}": r.baseline for r in records}
        out["recovery"] = {f"{r.task}/{r.metric}": r.recovery for r in records}
        out["base_model"] = base
        if note is not None:
            out["baseline_note"] = note
    if not a.no_save and Path(a.model_dir).is_dir():
        save_eval(a.model_dir, records)
    if a.json:
        print(json.dumps(out))
        return 0
    for r in records:
        base_txt = (
            f"; base model {r.baseline:.4f}, recovery {r.recovery:.1f} %" if r.recovery is not None else ""
        )
        if r.metric == "perplexity" and a.text is not None and r.task == Path(a.text).name:
            print(
                f"perplexity {out['perplexity']:.4f} over {int(out['windows'])} windows of {a.seqlen} tokens"
                + base_txt
            )
            continue
        err = f" ± {r.stderr:.4f}" if r.stderr is not None else ""
        print(f"{r.task} {r.metric} {r.value:.4f}{err} ({r.samples} samples){base_txt}")
    if note is not None:
        print(f"note: {note}: the recovery compares different architectures")
    return 0


#: ``llmpress plugins``: the heading of each of :meth:`Llmpress.sections`, and what a row lists
_SECTIONS = {
    "stage_methods": ("Stage methods (a recipe stage's `method:`)", "methods"),
    "allocation_searches": ("Allocation searches (a stage's `allocation: {method: ...}`)", "methods"),
    "kernels": (
        "Kernels and export targets (picked per packed layer at load; LLMPRESS_KERNEL=name)",
        "kernels",
    ),
    "general": ("General plugins (hooks called for every method)", "hooks"),
}


def _plugins(a: argparse.Namespace) -> int:
    from llmpress.plugin_manager import get_plugin_manager

    pm = get_plugin_manager()
    sections = pm.sections()
    if a.json:  # default: the flat {plugin: [methods]} of earlier versions; --sections: by kind
        print(json.dumps(sections if a.sections else pm.plugins(), indent=2))
        return 0
    width = max((len(n) for rows in sections.values() for n in rows), default=10)
    for key, rows in sections.items():
        if not rows:
            continue
        heading, what = _SECTIONS[key]
        print(f"{heading}:")
        for name, names in sorted(rows.items()):
            print(f"{name:<{width}}  {pm.plugin_origin(name):<28} {what}: {', '.join(names) or '-'}")
    return 0


def _demo(a: argparse.Namespace) -> int:
    from llmpress.cli.demo import format_legend, format_orderings, format_table, run_demo

    result = run_demo(a.out, steps=a.steps, cache=not a.no_cache, threads=a.threads or None)
    print(format_table(result.rows))
    print(f"\n{format_legend(result)}\n\n{format_orderings(result.rows)}")
    kept = (
        "" if a.out else " (a new temporary folder, kept: delete it when done, or choose one with --out DIR)"
    )
    print(f"\nresults:    {result.out}{kept}\nmodel card: {result.card}")
    return 0


class _DefaultsFormatter(argparse.HelpFormatter):
    """Help that shows each option's default value; an option whose default is "not given"
    says in its help what happens then, and flags are off unless given."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (
            action.option_strings
            and default is not None
            and default is not False
            and default is not argparse.SUPPRESS
            and "%(default)" not in text
        ):
            text += " (default: %(default)s)"
        return text


TOKENIZER_HELP = "tokenizer folder or Hub id (default: the model's own; for a model saved without one)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llmpress", description="Compress Hugging Face models with plugins.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    p.add_argument(
        "-p",
        "--plugin",
        action="append",
        default=[],
        metavar="MODULE",
        help="import MODULE and register it as a plugin (repeatable; also $LLMPRESS_PLUGINS)",
    )
    sub = p.add_subparsers(dest="cmd", required=True)

    c = sub.add_parser("compress", help="compress a model with a recipe", formatter_class=_DefaultsFormatter)
    c.add_argument("model", help="local model folder or Hub id")
    c.add_argument("--recipe", required=True, help="YAML or JSON recipe file")
    c.add_argument(
        "--calib",
        help="calibration text (.txt, .jsonl, dataset folder or Hub dataset id); without it only "
        "data-free methods run (magnitude, rtn, fp8)",
    )
    c.add_argument("--out", required=True, help="output folder (written atomically)")
    c.add_argument("--tokenizer", default=None, metavar="PATH_OR_ID", help=TOKENIZER_HELP)
    c.add_argument("--nsamples", type=int, default=128, help="calibration sequences")
    c.add_argument("--seqlen", type=int, default=2048, help="tokens per calibration sequence")
    c.add_argument("--seed", type=int, default=0, help="seed that draws the calibration sequences")
    c.add_argument("--device", default="cpu", help="compute device, e.g. cuda or cuda:0")
    c.add_argument("--dtype", default="auto", help="compute dtype (auto: fp32 on CPU, stored dtype on GPU)")
    c.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="calibration sequences per block forward (default: as many as hold 8192 tokens)",
    )
    c.add_argument("--offload-activations", action="store_true", help="keep calibration activations on CPU")
    c.add_argument(
        "--offload-stats",
        action="store_true",
        help="keep layer input statistics (X^T X) on CPU, each layer's on the device only for its solve",
    )
    c.add_argument(
        "--offload-model", action="store_true", help="keep the model on CPU, one block at a time on --device"
    )
    c.add_argument(
        "--max-gpu-memory",
        default=None,
        metavar="SIZE",
        help="GPU budget, e.g. 20GiB: load with accelerate (device_map) keeping what does not fit on CPU, "
        "one block at a time on the GPU; calibration activations go to CPU when they do not fit "
        "(default: none, the whole model on --device)",
    )
    c.add_argument(
        "--offload-folder",
        default=None,
        help="with --max-gpu-memory: weights that do not fit in CPU memory (default: none, all in memory)",
    )
    c.add_argument(
        "--keep-dtype", action="store_true", help="save in the compute dtype instead of the checkpoint's"
    )
    c.add_argument(
        "--format",
        default="llmpress",
        choices=["llmpress", "compressed-tensors"],
        help="on-disk format: llmpress (packed, loads after `import llmpress`) or compressed-tensors "
        "(weight-only int4/int8, read natively by vLLM and transformers)",
    )
    c.add_argument(
        "--sparse-format",
        default=None,
        choices=["dense", "auto", "bitmask", "2:4"],
        help="storage of pruned layers: dense (an ordinary checkpoint; default for pruning-only recipes), "
        "auto (2:4 or bitmask when smaller; default with quantization), bitmask or 2:4",
    )
    c.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    c.set_defaults(func=_compress)

    e = sub.add_parser("eval", help="evaluate a (compressed) model")
    e.add_argument("model_dir")
    e.add_argument("--text", default=None, help="text file for perplexity")
    e.add_argument(
        "--tasks", default=None, help="comma-separated lm-eval-harness tasks, e.g. hellaswag,arc_easy"
    )
    e.add_argument("--limit", default=None, help="documents per task (a fraction if < 1)")
    e.add_argument("--include-path", action="append", default=None, help="folder of local lm-eval task YAMLs")
    e.add_argument("--no-save", action="store_true", help="do not record results in DIR/llmpress_eval.json")
    e.add_argument("--tokenizer", default=None, metavar="PATH_OR_ID", help=TOKENIZER_HELP)
    e.add_argument("--seqlen", type=int, default=256)
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--max-tokens", type=int, default=None)
    e.add_argument("--device", default="cpu")
    e.add_argument("--dtype", default="auto", help="compute dtype (auto: fp32 on CPU, stored dtype on GPU)")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.add_argument(
        "--baseline",
        nargs="?",
        const="auto",
        default=None,
        metavar="MODEL",
        help="also evaluate the base model (default: the one the report names; cached beside the results) "
        "and show the recovery",
    )
    e.set_defaults(func=_eval)

    from llmpress.hub import cli as hub_cli  # argparse only; the Hub client loads when `push` runs

    pu = sub.add_parser("push", help="publish a saved model folder and its model card to the Hub")
    hub_cli.add_push_arguments(pu)
    pu.set_defaults(func=hub_cli.push_command)

    pl = sub.add_parser("plugins", help="list plugins: stage methods, allocation searches, kernels")
    pl.add_argument("--json", action="store_true", help="print JSON: {plugin: [methods]}")
    pl.add_argument(
        "--sections",
        action="store_true",
        help="with --json: {stage_methods|allocation_searches|kernels|general: {plugin: [names]}}",
    )
    pl.set_defaults(func=_plugins)

    d = sub.add_parser("demo", help="train a small model, compress it every way, evaluate, save and reload")
    d.add_argument(
        "--out", default=None, help="write the results here (default: a new temporary folder, kept)"
    )
    d.add_argument("--steps", type=int, default=None, help="training steps of the demo model")
    d.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    d.add_argument("--no-cache", action="store_true", help="train the demo model even if it is cached")
    d.set_defaults(func=_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    worker = os.environ.get("RANK", "0") != "0"  # torchrun: the other ranks log warnings only
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING if worker else logging.INFO,
        format=(f"[rank {os.environ['RANK']}] " if worker else "") + "%(levelname)s %(name)s: %(message)s",
    )
    try:
        if args.plugin:
            from llmpress.plugin_manager import get_plugin_manager

            pm = get_plugin_manager()
            for mod in args.plugin:
                if pm.pm.get_plugin(mod) is None:
                    pm.register(_import_plugin(mod), name=mod)
        return int(args.func(args) or 0)
    except (LlmpressError, FileExistsError, FileNotFoundError, PermissionError, NotADirectoryError) as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("error: interrupted; nothing was written", file=sys.stderr)
        return 130


def _import_plugin(module: str) -> object:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise LlmpressError(f"cannot import plugin module {module!r} (--plugin): {e}") from e


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
