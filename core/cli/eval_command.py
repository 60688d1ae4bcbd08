"""``llmpress eval``: perplexity and lm-eval tasks of a saved model, optionally against its base model."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmpress.cli.options import TOKENIZER_HELP, load_tokenizer
from llmpress.errors import LlmpressError

if TYPE_CHECKING:
    from transformers import PretrainedConfig

log = logging.getLogger("llmpress")


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``eval`` and its options to the subcommands ``sub``."""
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
    e.set_defaults(func=run)


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


def _baseline_model(a: argparse.Namespace, config: PretrainedConfig) -> tuple[str, str | None]:
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


def _check_eval_inputs(a: argparse.Namespace, tasks: list[str]) -> PretrainedConfig:
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


def run(a: argparse.Namespace) -> int:
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
