"""Evaluation of an in-memory model: lm-eval-harness tasks and perplexity, saved beside the model.

lm-eval runs through its ``HFLM`` wrapper around the model object itself (no re-load, no
re-quantization). Local tasks are task YAMLs in a folder passed as ``include_path``; a YAML
can read a JSONL file next to it with a ``custom_dataset: !function module.fn`` loader (see
``tests/data/lm_eval_tasks/``), which runs offline.

Results are :class:`EvalRecord` rows stored in ``DIR/llmpress_eval.json``::

    {"version": 1, "results": [{"task": "tiny_mc", "metric": "acc", "value": 0.5, ...}, ...]}

A new result replaces the stored one with the same ``(task, metric)``; the model card turns
every row into a ``model-index`` entry. Only finite numbers are recorded: a NaN or infinite
result (a damaged checkpoint, an fp16 overflow) raises :class:`EvalTaskError` instead, and a
file holding one is refused when read.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llmpress.errors import EvalTaskError, LlmpressError
from llmpress.format.output import atomic_write

log = logging.getLogger(__name__)

EVAL_FILE = "llmpress_eval.json"
EVAL_FORMAT_VERSION = 1
_PROBE_TEXT = (
    "The quick brown fox jumps over the lazy dog. It was the best of times, it was the worst of times."
)


@dataclasses.dataclass(frozen=True)
class EvalRecord:
    """One evaluation number: a task, a metric and its value (plus where it came from)."""

    task: str
    metric: str
    value: float
    stderr: float | None = None
    #: dataset shown in the card and in ``model-index`` (``dataset.name``)
    dataset: str | None = None
    #: Hub dataset id when there is one, else the task name (``model-index`` ``dataset.type``)
    dataset_type: str | None = None
    split: str | None = None
    #: number of documents (or perplexity windows) actually scored
    samples: int | None = None
    limit: float | None = None
    num_fewshot: int | None = None
    higher_is_better: bool | None = None
    source: str = "lm-eval"
    notes: str | None = None
    #: the base (uncompressed) model's value for the same task, metric and settings
    baseline: float | None = None

    @property
    def key(self) -> tuple[str, str]:
        return (self.task, self.metric)

    @property
    def recovery(self) -> float | None:
        """The compressed model's share of the base model's score, in percent (for a metric
        where lower is better, such as perplexity, ``base / value``)."""
        if self.baseline is None or not self.value or not self.baseline:
            return None
        lower = self.higher_is_better is False or self.metric == "perplexity"
        return 100.0 * (self.baseline / self.value if lower else self.value / self.baseline)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EvalRecord:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# ------------------------------------------------------------------------ finite values

#: what to check when a model produces NaN/inf, appended to every such error
NON_FINITE_HINT = (
    "Check the checkpoint (damaged or badly compressed weights) and the dtype: fp16 can overflow, "
    "evaluate in float32 (e.g. --dtype float32). Nothing was recorded."
)


def _finite(x: Any) -> bool:
    """Whether ``x`` is absent or a finite number (a string or other object is not)."""
    if x is None:
        return True
    try:
        return not isinstance(x, bool) and math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


def non_finite(records: Sequence[EvalRecord]) -> list[EvalRecord]:
    """The records whose value or stderr is NaN, infinite or not a number."""
    return [r for r in records if not (_finite(r.value) and _finite(r.stderr))]


def _describe(records: Sequence[EvalRecord]) -> str:
    return ", ".join(
        f"{r.task} {r.metric} = {r.value}" + (f" ± {r.stderr}" if r.stderr is not None else "")
        for r in records
    )


def check_finite(records: Sequence[EvalRecord], where: str) -> None:
    """Raise :class:`EvalTaskError` naming each (task, metric) of ``records`` that is not finite."""
    bad = non_finite(records)
    if bad:
        raise EvalTaskError(f"{where}: the model produces NaN/inf: {_describe(bad)}. {NON_FINITE_HINT}")


# ------------------------------------------------------------------------------ storage


def _read_records(path: Path) -> list[EvalRecord]:
    """The rows of an evaluation file as they are (no finiteness check)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise EvalTaskError(f"{path} is not valid JSON ({e}); delete it and re-run `llmpress eval`") from None
    rows = data.get("results", []) if isinstance(data, dict) else []
    return [EvalRecord.from_dict(r) for r in rows if isinstance(r, dict)]


def _refuse_non_finite_file(path: Path, records: Sequence[EvalRecord]) -> None:
    bad = non_finite(records)
    if bad:
        raise EvalTaskError(
            f"{path} holds result(s) that are not finite numbers: {_describe(bad)} (the model produced NaN/inf "
            "when it was evaluated, or the file was edited). "
            "Delete those entries (or the file) and re-run `llmpress eval` on a sound checkpoint."
        )


def load_eval(folder: str | Path) -> list[EvalRecord]:
    """The records saved in ``folder/llmpress_eval.json`` (empty if there is none).

    :raises EvalTaskError: the file is not JSON or holds a NaN/infinite value.
    """
    path = Path(folder) / EVAL_FILE
    if not path.is_file():
        return []
    records = _read_records(path)
    _refuse_non_finite_file(path, records)
    return records


def save_eval(folder: str | Path, records: Sequence[EvalRecord]) -> Path:
    """Merge ``records`` into ``folder/llmpress_eval.json`` (atomically); same (task, metric) replaced.

    :raises EvalTaskError: a record (new, or kept from the file) is NaN or infinite; nothing is written.
    """
    folder = Path(folder)
    check_finite(records, f"refusing to save to {folder / EVAL_FILE}")
    path = folder / EVAL_FILE
    new = {r.key: r for r in records}
    kept = [r for r in (_read_records(path) if path.is_file() else []) if r.key not in new]
    _refuse_non_finite_file(path, kept)  # an old bad entry that this save does not replace
    merged = {r.key: r for r in kept}
    merged.update(new)
    data = {
        "version": EVAL_FORMAT_VERSION,
        "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "results": [r.to_dict() for r in merged.values()],
    }
    atomic_write(path, json.dumps(data, indent=2, allow_nan=False))
    log.info("saved %d evaluation result(s) to %s", len(records), path)
    return path


# ----------------------------------------------------------------------------- perplexity


BASELINE_FILE = "llmpress_eval_baseline.json"


def load_baseline(folder: str | Path, base: str, settings: dict[str, Any]) -> list[EvalRecord]:
    """The base model's cached records for these ``settings`` (empty when none match)."""
    path = Path(folder) / BASELINE_FILE
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return []
    if not isinstance(data, dict) or data.get("base") != base or data.get("settings") != settings:
        return []
    records = [EvalRecord.from_dict(r) for r in data.get("results", []) if isinstance(r, dict)]
    return [] if non_finite(records) else records


def save_baseline(
    folder: str | Path, base: str, settings: dict[str, Any], records: Sequence[EvalRecord]
) -> Path:
    """Cache the base model's records beside the compressed model's (atomically)."""
    check_finite(records, f"refusing to save the base model's results to {Path(folder) / BASELINE_FILE}")
    path = Path(folder) / BASELINE_FILE
    data = {"base": base, "settings": settings, "results": [r.to_dict() for r in records]}
    return atomic_write(path, json.dumps(data, indent=2, allow_nan=False))


def tokenizer_difference(tokenizer: Any, base: Any) -> str | None:
    """How ``base`` tokenizes differently from ``tokenizer`` (``None`` when they agree): their
    vocabularies, or the ids of a probe text (normalization, pre-tokenization, BOS)."""
    va, vb = tokenizer.get_vocab(), base.get_vocab()
    if va != vb:
        differ = sum(vb.get(t) != i for t, i in va.items()) + len(vb.keys() - va.keys())
        return f"vocabularies of {len(va)} and {len(vb)} tokens, {differ} token(s) differ"
    ids, base_ids = tokenizer(_PROBE_TEXT)["input_ids"], base(_PROBE_TEXT)["input_ids"]
    if list(ids) != list(base_ids):
        return f"a probe text tokenizes to different ids ({len(ids)} and {len(base_ids)} tokens)"
    return None


def with_baseline(records: Sequence[EvalRecord], base: Sequence[EvalRecord]) -> list[EvalRecord]:
    """``records`` with each one's ``baseline`` set from the base model's record of the same key."""
    by_key = {r.key: r.value for r in base}
    return [dataclasses.replace(r, baseline=by_key.get(r.key)) for r in records]


def perplexity_record(result: dict[str, float], text: str | Path, seqlen: int) -> EvalRecord:
    """An :class:`EvalRecord` for a :func:`llmpress.perplexity` result on a text file.

    :raises EvalTaskError: the perplexity is NaN or infinite.
    """
    name = Path(text).name
    record = EvalRecord(
        task=name,
        metric="perplexity",
        value=float(result["perplexity"]),
        dataset=name,
        dataset_type="text",
        samples=int(result["windows"]),
        higher_is_better=False,
        source="llmpress perplexity",
        notes=f"{int(result['windows'])} windows of {seqlen} tokens",
    )
    check_finite([record], f"perplexity on {name}")
    return record


# ------------------------------------------------------------------------------- lm-eval


def parse_limit(value: str | None) -> float | None:
    """``--limit`` as lm-eval takes it: a number of documents per task, or a fraction when < 1."""
    if value is None:
        return None
    try:
        n = float(value)
    except ValueError:
        raise LlmpressError(
            f"--limit must be a number of documents (or a fraction < 1), got {value!r}"
        ) from None
    if n <= 0:
        raise LlmpressError(f"--limit must be positive, got {value!r}")
    return int(n) if n >= 1 else n


def _lm_eval() -> Any:
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM  # noqa: F401 - checks the HF backend is present
    except ImportError as e:
        raise EvalTaskError(
            f"lm-eval-harness is needed for --tasks but cannot be imported ({e}); "
            "install it with: pip install 'llmpress[eval]'"
        ) from e
    return lm_eval


def _known(tm: Any, task: str) -> bool:
    return task in tm.all_tasks or bool(tm.match_tasks([task])) or Path(task).is_file()


def task_manager(tasks: Sequence[str], include_path: Sequence[str | Path] | None = None) -> Any:
    """An lm-eval ``TaskManager`` that knows every name in ``tasks``.

    When local task folders are given and hold every task, lm-eval's built-in task index is
    skipped (indexing it takes seconds). Unknown names raise :class:`EvalTaskError`.
    """
    _lm_eval()
    from lm_eval.tasks import TaskManager

    paths = [str(Path(p)) for p in include_path or []]
    for p in paths:
        if not Path(p).exists():
            raise EvalTaskError(f"--include-path {p} does not exist")
    if paths:
        tm = TaskManager(include_path=paths, include_defaults=False)
        if all(_known(tm, t) for t in tasks):
            return tm
    tm = TaskManager(include_path=paths or None)
    unknown = [t for t in tasks if not _known(tm, t)]
    if unknown:
        hint = (
            "pass --include-path DIR for local task YAMLs"
            if not paths
            else f"searched {paths} and lm-eval's tasks"
        )
        raise EvalTaskError(f"unknown lm-eval task(s) {unknown}; {hint} (`lm-eval ls tasks` lists them)")
    return tm


def _stderr(value: Any, task: str, metric: str) -> float | None:
    """lm-eval's stderr as a float; ``None`` when absent, ``"N/A"`` or not finite (e.g. one document)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    if not math.isfinite(value):
        log.warning("lm-eval gave %s %s a stderr of %s; recorded without one", task, metric, value)
        return None
    return float(value)


def _records(results: dict[str, Any], limit: float | None) -> list[EvalRecord]:
    """Flatten lm-eval's ``results`` (``{"task": {"acc,none": v, "acc_stderr,none": s}}``).

    :raises EvalTaskError: a metric is NaN or infinite (named with its task).
    """
    out = []
    for task, res in results.get("results", {}).items():
        cfg = results.get("configs", {}).get(task, {})
        hib = results.get("higher_is_better", {}).get(task, {})
        samples = results.get("n-samples", {}).get(task, {}).get("effective")
        path = cfg.get("dataset_path")
        hub_dataset = (
            isinstance(path, str)
            and path not in ("json", "csv", "text", "parquet")
            and not Path(path).exists()
        )
        for key, value in res.items():
            if "," not in key or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            metric, filt = key.split(",", 1)
            if metric.endswith("_stderr"):
                continue
            out.append(
                EvalRecord(
                    task=task,
                    metric=metric if filt == "none" else f"{metric} ({filt})",
                    value=float(value),
                    stderr=_stderr(res.get(f"{metric}_stderr,{filt}"), task, metric),
                    dataset=(cfg.get("dataset_name") or path) if hub_dataset else task,
                    dataset_type=path if hub_dataset else task,
                    split=cfg.get("test_split") or cfg.get("validation_split"),
                    samples=int(samples) if samples is not None else None,
                    limit=limit,
                    num_fewshot=results.get("n-shot", {}).get(task),
                    higher_is_better=hib.get(metric),
                    source=f"lm-eval {results.get('lm_eval_version', '')}".strip(),
                )
            )
    check_finite(out, "lm-eval")
    return out


def check_logits(model: Any, tokenizer: Any, what: str) -> None:
    """Raise :class:`EvalTaskError` when one forward pass on a short text gives NaN/inf logits.

    lm-eval turns NaN log-likelihoods into a finite but meaningless accuracy (every argmax picks
    the first choice), so a broken model is caught before the tasks run.
    """
    import torch

    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return
    ids = tokenizer(_PROBE_TEXT, add_special_tokens=False, return_tensors="pt")["input_ids"]
    device = next(model.parameters()).device
    with torch.no_grad():
        logits = model(input_ids=ids.to(device), use_cache=False).logits
    if not bool(torch.isfinite(logits).all()):
        kind = "NaN" if bool(torch.isnan(logits).any()) else "inf"
        raise EvalTaskError(
            f"{what}: the model produces NaN/inf: its logits contain {kind} on a probe text. {NON_FINITE_HINT}"
        )


def special_token_fallback(model: Any, tokenizer: Any) -> tuple[int, int | None] | None:
    """``(prefix, eos)`` ids for lm-eval when ``tokenizer`` has no EOS token (``None`` when it
    has one, and lm-eval needs no help).

    lm-eval conditions an empty context on a prefix token (BOS, else EOS) and stops generating at
    EOS. The fallbacks are the model config's BOS/EOS ids, else token id 0 as the prefix (a warning
    says which); ``eos`` stays ``None`` when the config names none (generation tasks are refused).
    """
    if tokenizer.eos_token_id is not None:
        return None
    vocab = len(tokenizer)
    configs = [getattr(model, "config", None), getattr(model, "generation_config", None)]

    def config_id(key: str) -> int | None:
        for cfg in configs:
            v = getattr(cfg, key, None)
            v = v[0] if isinstance(v, (list, tuple)) and v else v
            if isinstance(v, int) and 0 <= v < vocab:
                return v
        return None

    eos = config_id("eos_token_id")
    notes = []
    prefix = tokenizer.bos_token_id
    if prefix is None:
        from_config = next((i for i in (config_id("bos_token_id"), eos) if i is not None), None)
        prefix = 0 if from_config is None else from_config
        notes.append(
            f"lm-eval conditions empty contexts on token id {prefix} ({tokenizer.decode([prefix])!r}, "
            f"{'an arbitrary fallback' if from_config is None else 'from the model config'}): scores of "
            "tasks with empty contexts (loglikelihood_rolling, e.g. wikitext) depend on this choice"
        )
    notes.append(
        "generation tasks are refused (no end-of-sequence token)"
        if eos is None
        else f"generation stops at the model config's EOS id {eos}"
    )
    what = "EOS" if tokenizer.bos_token_id is not None else "BOS or EOS"
    log.warning("the tokenizer has no %s token: %s", what, "; ".join(notes))
    return prefix, eos


def _hflm(model: Any, tokenizer: Any, batch_size: int) -> Any:
    """lm-eval's ``HFLM`` on the in-memory ``model``, with :func:`special_token_fallback`'s ids
    for a tokenizer that has no EOS token (the caller's tokenizer is not changed)."""
    from lm_eval.models.huggingface import HFLM

    fallback = special_token_fallback(model, tokenizer)
    if fallback is None:
        return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    prefix, eos = fallback
    tokenizer = copy.deepcopy(tokenizer)
    if tokenizer.pad_token_id is None and tokenizer.unk_token_id is None:
        tokenizer.pad_token_id = prefix  # else lm-eval adds a pad token beyond the model's vocabulary

    class FallbackLM(HFLM):
        @property
        def eot_token_id(self) -> int:
            if eos is None:
                raise EvalTaskError(
                    "lm-eval generation tasks need an end-of-sequence token, and neither the tokenizer "
                    "nor the model config names one; set the tokenizer's eos_token (tokenizer_config.json) "
                    "or run loglikelihood tasks (multiple choice, perplexity)"
                )
            return eos

    return FallbackLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, prefix_token_id=prefix)


def run_lm_eval(
    model: Any,
    tokenizer: Any,
    tasks: Sequence[str],
    *,
    limit: float | None = None,
    include_path: Sequence[str | Path] | None = None,
    batch_size: int = 8,
    num_fewshot: int | None = None,
    seed: int = 0,
) -> list[EvalRecord]:
    """Run lm-eval-harness ``tasks`` on the in-memory ``model`` through ``HFLM``.

    :param model: a loaded (possibly compressed) transformers model; it is not re-loaded.
    :param tasks: lm-eval task, group or tag names, or task YAML paths.
    :param limit: documents per task (a fraction when < 1); ``None`` runs them all.
    :param include_path: folders of local task YAMLs.
    :returns: one :class:`EvalRecord` per (task, metric).
    :raises EvalTaskError: unknown task, or the model produces NaN/inf (logits or a metric).
    """
    if not tasks:
        raise EvalTaskError("no lm-eval task given")
    lm_eval = _lm_eval()
    tm = task_manager(tasks, include_path)
    check_logits(model, tokenizer, f"lm-eval {list(tasks)}")
    lm = _hflm(model, tokenizer, batch_size)
    t0 = time.perf_counter()
    try:
        results = lm_eval.simple_evaluate(
            model=lm,
            tasks=list(tasks),
            limit=limit,
            num_fewshot=num_fewshot,
            task_manager=tm,
            log_samples=False,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
    except EvalTaskError:
        raise
    except (KeyError, ValueError, FileNotFoundError, ConnectionError) as e:
        raise EvalTaskError(f"lm-eval could not run {list(tasks)}: {type(e).__name__}: {e}") from e
    if results is None:  # non-zero rank of a distributed run
        return []
    records = _records(results, limit)
    log.info("lm-eval %s: %d result(s) in %.1fs", list(tasks), len(records), time.perf_counter() - t0)
    return records


def evaluate(
    model: Any,
    tokenizer: Any,
    *,
    tasks: Sequence[str] = (),
    text: str | Path | None = None,
    limit: float | None = None,
    include_path: Sequence[str | Path] | None = None,
    seqlen: int = 256,
    batch_size: int = 8,
    save_to: str | Path | None = None,
) -> list[EvalRecord]:
    """Perplexity on ``text`` and/or lm-eval ``tasks`` on one in-memory model; optionally saved.

    :param save_to: a model folder; the records are merged into its ``llmpress_eval.json``
        so that the model card (``llmpress push``) lists them in its ``model-index``.
    """
    from llmpress.cli.evaluate import perplexity

    records: list[EvalRecord] = []
    if text is not None:
        res = perplexity(model, tokenizer, Path(text), seqlen=seqlen, batch_size=batch_size)
        records.append(perplexity_record(res, text, seqlen))
    if tasks:
        records += run_lm_eval(
            model, tokenizer, tasks, limit=limit, include_path=include_path, batch_size=batch_size
        )
    if save_to is not None and records:
        save_eval(save_to, records)
    return records
