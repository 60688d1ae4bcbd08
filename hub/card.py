"""Model cards of compressed models: metadata and body from a saved folder, rendered with Jinja.

:func:`build_card` reads the folder (config.json, ``llmpress_report.json``,
``llmpress_eval.json``, safetensors headers, ``quantization_config``), draws the allocation
plot into it, and renders a template of ``llmpress.model_cards`` (``"default"`` or
``"short"``) or a user's file into a :class:`huggingface_hub.ModelCard`.

Templates are Jinja with ``StrictUndefined`` (a misspelled variable is an error, not an empty
string). A template starts with the metadata block::

    ---
    {{ card_data }}
    ---

and may use these variables (a user template can also ``{% extends "default.md.j2" %}``):
``model_name``, ``repo_id`` (None for a folder not published), ``model_path`` (what
``from_pretrained`` loads: the Hub id, or the folder's absolute path), ``base_model`` (Hub id or
None: only a repo id is valid ``base_model`` metadata), ``base_label``, ``summary``,
``stages`` (list of ``{method, description, options}``), ``recipe_yaml``, ``size`` (a
:class:`SizeSummary`), ``size_rows`` (``{label, before, after}``), ``sparsity``, ``modules``
(``{name, shape, methods, sparsity, bits, loss}``), ``has_loss`` (any module reports a
reconstruction loss), ``plot`` (relative PNG path or None),
``calibration``, ``compute`` (``{device, world_size, devices, wall_time, versions}``), ``usage`` (Python code),
``citations`` (``{method, bibtex}``), ``missing_citations``, ``evaluations`` (``{task, metric,
value, stderr, samples, notes, baseline, recovery}``), ``has_baseline``, ``recovery`` (None, or ``{tokens, steps, preset, loss, teacher, data, seqlen,
wall_time, tokens_per_s, schedule, rows: [{label, ppl}], has_eval, eval_text, gap_closed, plot, record}``), ``tags``, ``quantized``, ``license``, ``pipeline_tag``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from llmpress.cli.eval_harness import EvalRecord
from llmpress.errors import LlmpressError
from llmpress.format.output import atomic_write
from llmpress.hub.allocation import allocation_context
from llmpress.hub.errors import CardTemplateError
from llmpress.hub.folder import (
    CARD_FILE,
    PLOT_FILE,
    FolderInfo,
    ModuleStats,
    SizeStats,
    hub_size,
    local_size,
    read_folder,
)
from llmpress.model.report import CompressionReport

if TYPE_CHECKING:
    from huggingface_hub import ModelCardData

log = logging.getLogger(__name__)

BUILTIN_TEMPLATES = ("default", "short")
LIBRARY_NAME = "transformers"  # loads with transformers (after `import llmpress` for the packed format)

_PIPELINE_TAGS = {
    "AutoModelForCausalLM": "text-generation",
    "AutoModelForMaskedLM": "fill-mask",
    "AutoModelForSeq2SeqLM": "text2text-generation",
    "AutoModelForSequenceClassification": "text-classification",
    "AutoModelForTokenClassification": "token-classification",
}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")


@dataclasses.dataclass(frozen=True)
class SizeSummary:
    """Size and bits per parameter of the dense base and of the compressed checkpoint."""

    before: SizeStats
    after: SizeStats
    layer_bits_before: float
    layer_bits_after: float

    @property
    def ratio(self) -> float:
        return self.before.nbytes / self.after.nbytes if self.after.nbytes else 0.0


@dataclasses.dataclass
class CardContext:
    """The card's metadata and the template variables (see the module docstring)."""

    data: Any  # huggingface_hub.ModelCardData
    variables: dict[str, Any]


def templates_dir() -> Path:
    """The folder of the built-in templates (package ``llmpress.model_cards``)."""
    from llmpress import model_cards

    return Path(model_cards.__file__).resolve().parent


# ------------------------------------------------------------------------- building blocks


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def _is_hub_id(name: str) -> bool:
    """A Hub id that is not also an existing local path."""
    from llmpress.format.loading import is_hub_id

    return not Path(name).exists() and is_hub_id(name)


def _cached_hub_id(path: Path) -> str | None:
    """The Hub id of a folder of the Hugging Face cache (``.../models--org--name/snapshots/<rev>``)."""
    for part in reversed(path.parts):
        if part.startswith("models--"):
            repo_id = part.removeprefix("models--").replace("--", "/")
            return repo_id if _is_hub_id(repo_id) else None
    return None


def _resolve_base(base_model: str | None, info: FolderInfo) -> tuple[str | None, Path | None, str | None]:
    """(Hub id, local folder, name for the text) of the base model, from the argument, the report
    or config.json.

    The Hub's ``base_model`` metadata must be a repo id, so a local folder gives one only when its
    id is known (a snapshot of the Hugging Face cache); any other local folder is named in the
    card's text only, by its folder name (the full path says nothing to readers).
    """
    report = info.report
    gone = None  # the name of a local folder that is not here any more
    for cand in (base_model, report.base_model if report else None, info.config.get("_name_or_path")):
        if not cand:
            continue
        cand = str(cand)
        path = Path(cand).expanduser()
        known = _cached_hub_id(path)
        if path.is_dir():
            return known, path, known or path.name
        if _is_hub_id(cand):
            return cand, None, cand
        if known is not None:
            return known, None, known
        if path.is_absolute() or cand.startswith((".", "~")):
            log.info("base model folder %s is not here; the card names it without its size or license", cand)
            gone = gone or path.name
            continue
        log.warning("base model %r is neither a local folder nor a valid Hub id; ignoring it", cand)
    return None, None, gone


def _local_label(name: str | None) -> str:
    """How the summary names a base model that has no Hub id."""
    return f"`{name}` (a local model folder)" if name else "a dense model"


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _base_license(hub_id: str | None, local: Path | None, api: Any) -> str | None:
    """The base model's license: its local README metadata, else its Hub card."""
    from huggingface_hub import ModelCard

    try:
        if local is not None and (local / CARD_FILE).is_file():
            return ModelCard.load(local / CARD_FILE).data.license
        if hub_id is not None and api is not None and not _offline():
            card_data = api.model_info(hub_id).card_data
            return card_data.license if card_data is not None else None
    except Exception as e:  # a missing or unreadable base card only loses the license
        log.info("no license found for the base model (%s: %s)", type(e).__name__, e)
    return None


def _size_summary(info: FolderInfo, hub_id: str | None, local: Path | None, api: Any) -> SizeSummary:
    after = info.size()
    before = local_size(local) if local is not None else None
    if before is None and hub_id is not None and api is not None and not _offline():
        before = hub_size(hub_id, api)
    if before is None:  # the dense model at the checkpoint's float dtype
        nbytes = after.params * info.dtype_bits // 8
        before = SizeStats(params=after.params, nbytes=nbytes, measured=False, data_bytes=nbytes)
    mods = info.modules()
    params = sum(m.params for m in mods)
    return SizeSummary(
        before=before,
        after=after,
        layer_bits_before=before.bits_per_param,
        layer_bits_after=8.0 * sum(m.nbytes for m in mods) / params if params else after.bits_per_param,
    )


def _describe_stage(stage: dict[str, Any]) -> str:
    """The stage in words: its method config's :meth:`~llmpress.recipe.config.MethodConfig.describe`
    (the method's name when it is not installed or the entry does not resolve)."""
    from llmpress.recipe.plan import make_plan

    try:
        text = make_plan({"stages": [stage]}).stages[0].config.describe()
    except LlmpressError as e:
        log.info("stage %r described by its name only (%s)", stage.get("method"), e)
        text = str(stage.get("method"))
    if stage.get("targets"):
        text += f" on layers matching {', '.join(map(str, stage['targets']))}"
    if stage.get("ignore"):
        text += f" except {', '.join(map(str, stage['ignore']))}"
    return text


def _tags(info: FolderInfo, extra: Sequence[str]) -> list[str]:
    tags = ["llmpress"]
    for s in info.stages:
        tags.append(str(s.get("method")))
        if "sparsity" in s:
            tags += ["sparse", f"{s.get('pattern') or 'unstructured'}-sparsity"]
        if "bits" in s:
            tags += ["quantized", f"{s['bits']}-bit"]
        if s.get("method") == "distill":
            tags.append("distillation")
    if info.quantized:
        bits = {m.nominal_bits for m in info.modules() if m.nominal_bits}
        tags += ["quantized", *(f"{b}-bit" for b in sorted(bits))]
    return list(dict.fromkeys([*tags, *extra]))


def method_citations(methods: Sequence[str], pm: Any = None) -> tuple[list[dict[str, str]], list[str]]:
    """``([{method, bibtex}], [methods without one])`` from each method config's ``citation``."""
    from llmpress.plugin_manager import get_plugin_manager

    pm = pm or get_plugin_manager()
    found, missing = [], []
    for m in dict.fromkeys(methods):
        info = pm.methods.get(m)
        bib = info.config_cls.citation if info is not None else ""
        if bib:
            found.append({"method": m, "bibtex": bib.strip()})
        else:
            missing.append(m)
    return found, missing


def _auto_class(folder: Path) -> str:
    try:
        import transformers

        from llmpress.format.loading import auto_class_for

        return auto_class_for(transformers.AutoConfig.from_pretrained(folder)).__name__
    except Exception as e:  # unknown architecture: the snippet falls back to the causal LM class
        log.warning("cannot tell the Auto class of %s (%s); assuming AutoModelForCausalLM", folder, e)
        return "AutoModelForCausalLM"


def usage_snippet(repo_id: str, auto_class: str, *, packed: bool, tokenizer: bool) -> str:
    """Python code that loads ``repo_id`` (a Hub id or a local folder) and runs it (works when
    pasted); ``packed`` adds the ``import llmpress`` that llmpress's packed format needs."""
    lines = ["import llmpress  # registers llmpress's packed format with transformers"] if packed else []
    lines.append(f"from transformers import {auto_class}" + (", AutoTokenizer" if tokenizer else ""))
    where = json.dumps(repo_id)  # a quoted Python string, also for a path with quotes or backslashes
    lines += ["", f"model = {auto_class}.from_pretrained({where})"]
    if not tokenizer:
        lines += ["import torch", "", "print(model(torch.tensor([[1, 2, 3]])).logits.shape)"]
    elif auto_class == "AutoModelForCausalLM":
        lines += [
            f"tokenizer = AutoTokenizer.from_pretrained({where})",
            'inputs = tokenizer("The quick brown fox", return_tensors="pt")',
            "outputs = model.generate(**inputs, max_new_tokens=20, do_sample=False)",
            "print(tokenizer.decode(outputs[0], skip_special_tokens=True))",
        ]
    else:
        lines += [
            f"tokenizer = AutoTokenizer.from_pretrained({where})",
            'inputs = tokenizer("The quick brown fox", return_tensors="pt")',
            "print(model(**inputs).logits.shape)",
        ]
    return "\n".join(lines)


def _eval_results(records: Sequence[EvalRecord], task_type: str, model_name: str) -> list[Any]:
    """``model-index`` entries of ``records``; a NaN/infinite value raises :class:`PublishError`."""
    from huggingface_hub import EvalResult

    from llmpress.cli.eval_harness import non_finite
    from llmpress.hub.errors import PublishError

    bad = non_finite(records)
    if bad:
        named = ", ".join(
            f"{r.task} {r.metric} = {r.value}" + (f" ± {r.stderr}" if r.stderr is not None else "")
            for r in bad
        )
        raise PublishError(
            f"the evaluation results for the model card (model-index) hold non-finite value(s): {named}; "
            "nothing was published. The model produced NaN/inf when it was evaluated: check the checkpoint "
            "and the dtype, re-run `llmpress eval`, and remove the bad entries from llmpress_eval.json."
        )
    out = []
    for r in records:
        label = r.metric + (f" ({r.samples} samples)" if r.limit is not None and r.samples else "")
        out.append(
            EvalResult(
                task_type=task_type,
                dataset_type=r.dataset_type or r.task,
                dataset_name=r.dataset or r.task,
                dataset_split=r.split,
                metric_type=r.metric,
                metric_value=r.value,
                metric_name=label,
            )
        )
    return out


def _calibration_text(calib: dict[str, Any]) -> str:
    if not calib:
        return "None: every method of the recipe works without calibration data."
    src = calib.get("source")
    if src and (Path(src).is_absolute() or Path(src).exists()):
        src = Path(src).name  # a local path says nothing to readers (and may leak a home folder)
    where = f" drawn from `{src}`" if src else " (token ids passed in Python)"
    return (
        f"{calib.get('nsamples', '?')} sequences of {calib.get('seqlen', '?')} tokens{where}, "
        f"random windows with seed {calib.get('seed', 0)}."
    )


# ----------------------------------------------------------------------------- recovery


RECOVERY_PLOT_FILE = "llmpress_recovery.png"

#: the papers a recovery stage rests on, by the loss it used (BibTeX key -> entry)
RECOVERY_CITATIONS = {
    "squarehead": """@article{kurtic2023sparse,
  title={Sparse Fine-tuning for Inference Acceleration of Large Language Models},
  author={Kurtic, Eldar and Kuznedelev, Denis and Frantar, Elias and Goin, Michael and Alistarh, Dan},
  journal={arXiv preprint arXiv:2310.06927},
  year={2023}
}""",
    "kl": """@article{muralidharan2024minitron,
  title={Compact Language Models via Pruning and Knowledge Distillation},
  author={Muralidharan, Saurav and Sreenivas, Sharath Turuvekere and Joshi, Raviraj and Chochowski, Marcin and Patwary, Mostofa and Shoeybi, Mohammad and Catanzaro, Bryan and Kautz, Jan and Molchanov, Pavlo},
  journal={arXiv preprint arXiv:2407.14679},
  year={2024}
}""",
}
#: the loss weights of the distill stage's presets (used when the record names only the preset)
RECOVERY_PRESETS = {"sparse-finetune": {"ce": 1.0, "squarehead": 1.0}, "minitron": {"kl": 1.0}}
_LOSS_NAMES = {"ce": "cross-entropy on the data", "kl": "KL divergence to the teacher's logits",
               "squarehead": "SquareHead (normalised hidden-state MSE per block)"}  # fmt: skip
Points = list[tuple[int, float]]


def _perplexity(value: object) -> float | None:
    """A perplexity from a number or an evaluation dict (``perplexity`` / ``ppl``)."""
    if isinstance(value, dict):
        value = value.get("perplexity", value.get("ppl"))
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _points(values: object, key: str = "loss") -> Points:
    """``(step, value)`` points from a list of numbers, of pairs, or of ``{step, key}`` dicts."""
    out: Points = []
    for i, v in enumerate(values if isinstance(values, list) else []):
        if isinstance(v, (int, float)):
            out.append((i + 1, float(v)))
        elif isinstance(v, (list, tuple)) and len(v) == 2:
            out.append((int(v[0]), float(v[1])))
        elif isinstance(v, dict) and _perplexity(v.get(key, v)) is not None:
            out.append((int(v.get("step", i + 1)), float(_perplexity(v.get(key, v)) or 0.0)))
    return out


def _base_perplexity(data: dict[str, Any], ev: dict[str, Any]) -> float | None:
    """The base (teacher) model's perplexity: ``eval_base``/``eval_teacher``/``eval_dense`` or
    ``eval: {base|teacher|dense}`` (``teacher`` as a string is the teacher's path, not an eval)."""
    for src, keys in (
        (data, ("eval_base", "eval_teacher", "eval_dense")),
        (ev, ("base", "teacher", "dense")),
    ):
        for k in keys:
            if k in src and _perplexity(src[k]) is not None:
                return _perplexity(src[k])
    return None


def _loss_curves(raw: object) -> dict[str, Points]:
    """Per loss name its points: from a list (one curve ``loss``, or per-step dicts holding
    ``loss``, ``ce``, ``kl``, ``squarehead``) or a dict of lists."""
    if isinstance(raw, dict):
        return {str(k): _points(v) for k, v in raw.items() if _points(v)}
    if isinstance(raw, list) and raw and all(isinstance(r, dict) for r in raw):
        names = [k for k in ("loss", "ce", "kl", "squarehead") if any(k in r for r in raw)]
        return {k: _points([r for r in raw if k in r], k) for k in names}
    return {"loss": _points(raw)} if _points(raw) else {}


class RecoveryRecord(BaseModel):
    """A recovery stage's course as the card reads it from ``CompressionReport.recovery``
    (tolerant of the spellings: ``eval_before`` or ``eval: {before}``, ``loss_curve`` or ``loss``)."""

    model_config = ConfigDict(extra="ignore")

    tokens: int = 0
    steps: int = 0
    preset: str | None = None
    weights: dict[str, float] = Field(default_factory=dict)
    temperature: float | None = None
    teacher: str | None = None
    data: str | None = None
    seqlen: int | None = None
    wall_s: float | None = None
    tokens_per_s: float | None = None
    curves: dict[str, Points] = Field(default_factory=dict)
    evals: Points = Field(default_factory=list)
    #: gradual pruning during training (``{from, to, every, score}``), if the stage had one
    schedule: dict[str, float | str] | None = None
    eval_text: str | None = None
    base: float | None = None
    before: float | None = None
    after: float | None = None

    @model_validator(mode="before")
    @classmethod
    def _normalise(cls, data: Any) -> Any:  # noqa: ANN401 - the report's raw dict
        if not isinstance(data, dict):
            return data
        raw_ev, raw_w = data.get("eval"), data.get("weights") or data.get("loss_weights") or data
        ev: dict[str, Any] = raw_ev if isinstance(raw_ev, dict) else {}
        weights = {k: float(raw_w[k]) for k in _LOSS_NAMES if isinstance(raw_w.get(k), (int, float))}
        return {
            **data,
            "weights": {k: v for k, v in weights.items() if v} or RECOVERY_PRESETS.get(str(data.get("preset")), {}),
            "temperature": data.get("temperature", raw_w.get("temperature")),
            "wall_s": data.get("wall_s", data.get("wall_time_s")),
            "curves": _loss_curves(data.get("loss_curve", data.get("losses", data.get("loss")))),
            "evals": _points(data.get("evals", ev.get("curve", ev.get("history"))), "perplexity"),
            "eval_text": ev.get("text") if isinstance(ev.get("text"), str) else data.get("eval_text"),
            "base": _base_perplexity(data, ev),
            "before": _perplexity(data.get("eval_before", ev.get("before"))),
            "after": _perplexity(data.get("eval_after", ev.get("after"))),
            "teacher": data.get("teacher") if isinstance(data.get("teacher"), str) else None,
            "data": data.get("data") if isinstance(data.get("data"), str) else None,
        }  # fmt: skip


def _public_name(src: str) -> str:
    """A local path says nothing to readers (and may leak a home folder): its last part."""
    return Path(src).name if Path(src).is_absolute() or Path(src).exists() else src


def _teacher_text(teacher: str | None) -> str:
    """A teacher folder or Hub id in backticks; the stage's own words (the default teacher) as they are."""
    if not teacher or teacher.startswith("the model "):
        return "the model as it was before the recipe's first stage"
    return f"`{_public_name(teacher)}`"


def _data_text(data: str | None) -> str:
    """The training data: a file or Hub id in backticks, the stage's description as it is."""
    if not data:
        return "the calibration source"
    return f"`{_public_name(data)}`" if " " not in data else f"the calibration {data}"


def _schedule_text(schedule: dict[str, float | str] | None) -> str | None:
    """Gradual pruning during training, in words (``None``: the masks were fixed)."""
    if not schedule or "to" not in schedule:
        return None
    start, end = float(schedule.get("from", 0.0)), float(schedule["to"])
    every, score = schedule.get("every"), schedule.get("score", "magnitude")
    how = f", the mask re-selected every {int(float(every))} steps by {score} score" if every else ""
    return f"Sparsity rose from {100 * start:.0f} % to {100 * end:.0f} % during training on a cubic schedule{how}."


def recovery_citations(rec: RecoveryRecord, known: Sequence[dict[str, str]]) -> list[dict[str, str]]:
    """The recovery papers to cite (SquareHead for a hidden-state loss, Minitron for KL; both
    when the weights are unknown) that ``known`` citations do not already hold."""
    cited = "\n".join(c["bibtex"] for c in known)
    losses = [k for k in RECOVERY_CITATIONS if rec.weights.get(k)] or list(RECOVERY_CITATIONS)
    out = []
    for loss in losses:
        bib = RECOVERY_CITATIONS[loss]
        key = bib.split("{", 1)[1].split(",", 1)[0]
        if key not in cited:
            out.append({"method": "distill", "bibtex": bib})
    return out


def _fmt_ppl(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def recovery_context(
    raw: dict[str, Any] | None, folder: Path | None, records: Sequence[EvalRecord] = ()
) -> dict[str, Any] | None:
    """Template variables of the Recovery section (``raw``: the report's ``recovery``), or
    ``None`` when no recovery stage ran; draws the loss curve into ``folder`` when given.

    The base model's perplexity is the record's; else the ``llmpress eval --baseline`` result
    of ``records`` on the same text file (by name), if there is one."""
    if not isinstance(raw, dict):
        return None
    rec = RecoveryRecord.model_validate(raw)
    if rec.base is None and rec.eval_text:
        name = Path(rec.eval_text).name
        same = [r.baseline for r in records if r.metric == "perplexity" and r.task == name and r.baseline]
        rec.base = same[0] if same else None
    plot = None
    if folder is not None:
        from llmpress.hub.plot import recovery_plot

        try:
            plot = (
                RECOVERY_PLOT_FILE
                if recovery_plot(rec.curves, folder / RECOVERY_PLOT_FILE, rec.evals)
                else None
            )
        except OSError as e:  # pragma: no cover - read-only folder
            log.warning("could not write the recovery plot into %s (%s)", folder, e)
    closed = None
    if None not in (rec.base, rec.before, rec.after) and rec.before != rec.base:
        closed = f"{100 * (rec.before - rec.after) / (rec.before - rec.base):.0f} %"  # type: ignore[operator]
    loss = " + ".join(f"{w:g} × {_LOSS_NAMES.get(k, k)}" for k, w in rec.weights.items()) or "not recorded"
    return {
        "tokens": f"{rec.tokens:,}",
        "steps": f"{rec.steps:,}",
        "preset": rec.preset,
        "loss": loss
        + (f" (temperature {rec.temperature:g})" if rec.temperature and rec.weights.get("kl") else ""),
        "teacher": _teacher_text(rec.teacher),
        "data": _data_text(rec.data),
        "seqlen": rec.seqlen,
        "wall_time": f"{rec.wall_s:.0f} s" if rec.wall_s is not None else None,
        "tokens_per_s": f"{rec.tokens_per_s:,.0f}" if rec.tokens_per_s else None,
        "rows": [
            {"label": "base model (teacher)", "ppl": _fmt_ppl(rec.base)},
            {"label": "compressed, before recovery", "ppl": _fmt_ppl(rec.before)},
            {"label": "compressed, after recovery", "ppl": _fmt_ppl(rec.after)},
        ],
        "schedule": _schedule_text(rec.schedule),
        "has_eval": rec.before is not None or rec.after is not None,
        "eval_text": f"`{_public_name(rec.eval_text)}`" if rec.eval_text else "held-out text",
        "gap_closed": closed,
        "plot": plot,
        "record": rec,
    }


# ------------------------------------------------------------------------------ context


WIDTHS_PLOT_FILE = "llmpress_widths.png"


def _widths_rows(structure: dict[str, Any], folder: Path | None) -> tuple[list[dict[str, str]], str | None]:
    """Table rows of per-block widths (``before → after``) and the widths plot (drawn into
    ``folder`` when given) from the report's ``structure``."""
    layers = structure.get("layers") or []
    rows = []
    for i, row in enumerate(layers):
        cells = {"block": str(i)}
        for k in ("heads", "kv_heads", "neurons"):
            b, a = row.get(k, (None, None))
            cells[k] = "-" if b is None else (f"{b}" if a == b else f"{b} → {a}")
        rows.append(cells)
    plot = None
    if folder is not None and layers:
        from llmpress.hub.plot import widths_plot

        try:
            plot = WIDTHS_PLOT_FILE if widths_plot(layers, folder / WIDTHS_PLOT_FILE) else None
        except OSError as e:
            log.warning("could not write the widths plot into %s (%s)", folder, e)
    return rows, plot


def _summary(
    info: FolderInfo,
    hub_id: str | None,
    base_name: str | None,
    stages: list[dict[str, Any]],
    n_modules: int,
    size: SizeSummary,
    sparsity: float,
    quantized: bool,
) -> str:
    """The card's opening paragraph."""
    summary = (
        f"This is {f'[{hub_id}](https://huggingface.co/{hub_id})' if hub_id else _local_label(base_name)} compressed with "
        f"llmpress: {'; then '.join(_describe_stage(s) for s in stages) or 'no compression stage'}. "
        f"The recipe compressed {n_modules} linear layers of the repeated blocks (embeddings and the output head stay "
        f"dense); their measured sparsity is {100 * sparsity:.1f} %. The checkpoint takes "
        f"{_fmt_bytes(size.after.nbytes)} ({size.after.bits_per_param:.2f} bits per parameter) against "
        f"{_fmt_bytes(size.before.nbytes)} ({size.before.bits_per_param:.2f}) for the dense model"
        f"{'' if size.before.measured else ' (estimated at the same dtype)'}."
    )
    summary += _stored_bits_text(info.report)
    kv = (info.quantization_config or {}).get("kv_cache")
    if isinstance(kv, dict) and kv.get("dtype") == "float8_e4m3fn":
        summary += (
            f" The KV cache is stored in FP8 (E4M3) with one calibrated key scale and one value scale per "
            f"attention layer ({len(kv.get('scales', {}))} layers)."
        )
    if isinstance(kv, dict) and kv.get("dtype") in ("int8", "int4"):
        group = (
            f"group of {kv['group_size']} channels of a head" if kv.get("group_size") else "attention head"
        )
        summary += (
            f" The KV cache is rounded to {str(kv['dtype']).upper()} (symmetric, one scale per token and per "
            f"{group}, computed at run time; simulated by llmpress's attention wrapper)."
        )
    summary += _lowrank_text(info.quantization_config or {})
    if info.quantizes_activations:
        summary += (
            " Weight-and-activation 8-bit formats suit high-throughput serving on recent GPUs, where FP8 is "
            'practically lossless and tuned INT8 within a few percent (Kurtic et al., 2024, "Give Me BF16 or '
            'Give Me Death"); for single-stream serving, 4-bit weight-only formats decode faster.'
        )
    if info.packed:
        summary += (
            " Load it after `import llmpress`, which registers llmpress's packed format with transformers."
        )
    elif sparsity > 0 and not quantized:
        summary += (
            " Pruned weights are stored as zeros in dense tensors, so the file does not shrink; speed and size "
            "gains need sparse kernels or a packed format."
        )

    return summary


def _stored_bits_text(report: CompressionReport | None) -> str:
    """A sentence on the stored bits per weight where the method reports them (SpQR), or ``""``."""
    bits = None if report is None else report.stored_bits
    if report is None or bits is None:
        return ""
    outliers = int(sum(m.info.get("outliers", 0.0) for m in report.modules.values()))
    return (
        f" Its quantized layers store {bits:.3f} bits per weight on average, counting the codes, both levels "
        f"of quantization statistics and {outliers:,} fp16 outliers (about 32 bits each); the per-layer "
        f"table gives each layer's."
    )


def _lowrank_text(qc: dict[str, Any]) -> str:
    """A sentence on the layers' low-rank compensation paths (EoRA): ranks and parameter overhead."""
    mods = [m for m in (qc.get("modules") or {}).values() if isinstance(m, dict) and m.get("lowrank")]
    if not mods:
        return ""
    ranks = sorted({int(m["lowrank"]) for m in mods})
    extra = sum(int(m["lowrank"]) * (int(m["in_features"]) + int(m["out_features"])) for m in mods)
    weights = sum(int(m["in_features"]) * int(m["out_features"]) for m in mods)
    return (
        f" {len(mods)} layers carry a low-rank compensation path (EoRA) of rank {'/'.join(map(str, ranks))}: "
        f"{extra:,} extra parameters stored in fp16, {100 * extra / max(weights, 1):.2f} % of those layers' "
        f"weights."
    )


def _allocation_plot(info: FolderInfo, mods: list[ModuleStats], quantized: bool) -> str | None:
    """Draw the per-layer allocation plot into the folder; its file name, or ``None``."""
    from llmpress.hub.plot import allocation_plot

    try:
        shown = allocation_plot(mods, info.path / PLOT_FILE, show_bits=quantized or info.packed)
    except OSError as e:
        log.warning("could not write the allocation plot into %s (%s)", info.path, e)
        return None
    return PLOT_FILE if shown else None


def _size_rows(size: SizeSummary, sparsity: float) -> list[dict[str, str]]:
    """The size table: before and after."""
    return [
        {
            "label": "checkpoint size",
            "before": _fmt_bytes(size.before.nbytes),
            "after": _fmt_bytes(size.after.nbytes),
        },
        {"label": "parameters", "before": f"{size.before.params:,}", "after": f"{size.after.params:,}"},
        {
            "label": "bits per parameter (overall)",
            "before": f"{size.before.bits_per_param:.2f}",
            "after": f"{size.after.bits_per_param:.2f}",
        },
        {
            "label": "bits per parameter (compressed layers)",
            "before": f"{size.layer_bits_before:.2f}",
            "after": f"{size.layer_bits_after:.2f}",
        },
        {"label": "sparsity (compressed layers)", "before": "0.0 %", "after": f"{100 * sparsity:.1f} %"},
    ]


def _module_rows(mods: list[ModuleStats]) -> list[dict[str, str]]:
    """The per-layer table."""
    return [
        {
            "name": m.name,
            "shape": f"{m.shape[0]}×{m.shape[1]}",
            "methods": ", ".join(m.methods),
            "sparsity": f"{100 * m.sparsity:.1f} %",
            "bits": f"{m.bits_per_param:.2f}" + (f" ({m.nominal_bits}-bit)" if m.nominal_bits else ""),
            "loss": ", ".join(f"{k} {v:.4g}" for k, v in m.losses) or "-",
        }
        for m in mods
    ]


def _evaluation_rows(records: list[EvalRecord]) -> list[dict[str, Any]]:
    """The evaluation table."""
    return [
        {
            "task": r.task,
            "metric": r.metric,
            "value": f"{r.value:.4f}",
            "stderr": f"{r.stderr:.4f}" if r.stderr is not None else "",
            "samples": r.samples if r.samples is not None else "",
            "notes": r.notes or (f"limit {r.limit:g}" if r.limit is not None else ""),
            "baseline": f"{r.baseline:.4f}" if r.baseline is not None else "",
            "recovery": f"{r.recovery:.1f} %" if r.recovery is not None else "",
        }
        for r in records
    ]


def _compute(report: CompressionReport) -> dict[str, Any]:
    """Where and how long the compression ran, from the report."""
    return {
        "device": report.device,
        "world_size": report.world_size,
        "devices": report.devices or [report.device],
        "wall_time": f"{report.wall_time_s:.1f} s",
        "versions": report.versions,
    }


def _cited_methods(info: FolderInfo) -> list[str]:
    """The methods the card cites: the recipe's stages and the allocation search's method."""
    searched = ((info.report.allocation if info.report else None) or {}).get("searched_with") or {}
    return [str(s.get("method")) for s in info.stages] + (
        [str(searched["method"])] if "method" in searched else []
    )


def _citations(
    info: FolderInfo, recovery: dict[str, Any] | None, pm: Any
) -> tuple[list[dict[str, str]], list[str]]:
    """The methods' citations (and those missing), plus the recovery papers not cited yet."""
    citations, missing = method_citations(_cited_methods(info), pm)
    if recovery is not None:
        citations += recovery_citations(recovery["record"], citations)
        missing = [m for m in missing if m != "distill"]
    return citations, missing


def _card_data(
    hub_id: str | None,
    quantized: bool,
    license: str | None,
    tags: list[str],
    model_name: str,
    records: list[EvalRecord],
    pipeline_tag: str | None,
    recovery: dict[str, Any] | None = None,
) -> ModelCardData:
    """The card's metadata (YAML header)."""
    from huggingface_hub import ModelCardData

    relation: dict[str, Any] = {}
    if hub_id is not None and quantized:
        # The Hub defines base_model_relation in {adapter, merge, quantized, finetune}. Pruned-only
        # models fit none of them (no training, no new weights besides zeros), so it is omitted.
        relation["base_model_relation"] = "quantized"
    elif hub_id is not None and recovery is not None:  # a recovery stage trained the weights
        relation["base_model_relation"] = "finetune"
    return ModelCardData(
        base_model=hub_id,
        library_name=LIBRARY_NAME,
        pipeline_tag=pipeline_tag,
        license=license,
        tags=tags,
        model_name=model_name,
        eval_results=_eval_results(records, pipeline_tag or "text-generation", model_name) or None,
        **relation,
    )


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / f).is_file() for f in _TOKENIZER_FILES)


def _structure_variables(structure: dict[str, Any], folder: Path | None) -> dict[str, Any]:
    """Template variables of structured pruning: per-block widths (and their plot, drawn into
    ``folder`` when given), the hidden width and the removed fraction of block parameters."""
    widths, widths_plot_file = _widths_rows(structure, folder)
    return {
        "widths": widths,
        "widths_plot": widths_plot_file,
        "hidden_width": (
            " to ".join(str(w) for w in structure["hidden"])
            if len(structure.get("hidden") or []) == 2
            else None
        ),
        "structure_removed": (
            f"{100 * float(structure['removed_fraction']):.1f} %" if "removed_fraction" in structure else None
        ),
    }


def build_card_context(
    folder: str | Path,
    *,
    repo_id: str | None = None,
    base_model: str | None = None,
    license: str | None = None,
    tags: Sequence[str] = (),
    api: Any = None,
    pm: Any = None,
    write_plot: bool = True,
) -> CardContext:
    """Metadata and template variables of ``folder``'s card.

    :param repo_id: where the model is (or will be) published; used in the title and the usage
        snippet. ``None``: not published; the snippet loads the local folder (by its absolute path)
        and the title is the folder name.
    :param base_model: Hub id (or local folder) of the dense model; default: the report's or
        config.json's record of it. A Hub id goes into ``base_model`` metadata; its license
        and size are read from the Hub through ``api`` (an ``HfApi``) when possible.
    :param license: overrides the license carried from the base model.
    :param write_plot: draw ``llmpress_allocation.png`` into the folder for the card.
    """
    info = read_folder(folder)
    path = info.path
    model_path = repo_id or str(path.resolve())  # what from_pretrained loads
    model_name = repo_id.split("/")[-1] if repo_id else path.resolve().name
    hub_id, local, base_name = _resolve_base(base_model, info)
    base_label = base_name or "a dense model"
    size = _size_summary(info, hub_id, local, api)
    mods = info.modules()
    report = info.report or CompressionReport(recipe={})
    stages = info.stages
    quantized = info.quantized
    auto_class = _auto_class(path)
    pipeline_tag = _PIPELINE_TAGS.get(auto_class)
    license = license or _base_license(hub_id, local, api)
    records = [
        EvalRecord.from_dict(r) for r in (info.evaluation or {}).get("results", []) if isinstance(r, dict)
    ]
    recovery = recovery_context(report.recovery, path if write_plot else None, records)
    citations, missing = _citations(info, recovery, pm)
    plot = _allocation_plot(info, mods, quantized) if write_plot and mods else None
    sparsity = report.overall_sparsity
    summary = _summary(info, hub_id, base_name, stages, len(mods), size, sparsity, quantized)
    tag_list = _tags(info, tags)
    data = _card_data(hub_id, quantized, license, tag_list, model_name, records, pipeline_tag, recovery)
    variables: dict[str, Any] = {
        "model_name": model_name,
        "repo_id": repo_id,
        "model_path": model_path,
        "base_model": hub_id,
        "base_label": base_label,
        "summary": summary,
        "stages": [
            {"method": s.get("method"), "description": _describe_stage(s), "options": s} for s in stages
        ],
        "recipe_yaml": yaml.safe_dump(report.recipe, sort_keys=False).strip(),
        "size": size,
        "size_rows": _size_rows(size, sparsity),
        "size_estimated": not size.before.measured,
        "sparsity": sparsity,
        "modules": _module_rows(mods),
        "has_loss": any(m.losses for m in mods),
        **_structure_variables(report.structure, path if write_plot else None),
        "plot": plot,
        "allocation": allocation_context(report.allocation, path, write_plot),
        "recovery": recovery,
        "transforms": report.transforms,
        "calibration": _calibration_text(report.calibration),
        "compute": _compute(report),
        "usage": usage_snippet(model_path, auto_class, packed=info.packed, tokenizer=_has_tokenizer(path)),
        "citations": citations,
        "missing_citations": missing,
        "evaluations": _evaluation_rows(records),
        "has_baseline": any(r.baseline is not None for r in records),
        "tags": tag_list,
        "quantized": quantized,
        "license": license,
        "pipeline_tag": pipeline_tag,
    }
    return CardContext(data=data, variables=variables)


# ------------------------------------------------------------------------------ rendering


def _template_path(template: str | Path) -> Path:
    if str(template) in BUILTIN_TEMPLATES:
        return templates_dir() / f"{template}.md.j2"
    path = Path(template).expanduser()
    if not path.is_file():
        raise CardTemplateError(
            f"model card template {str(template)!r} not found: use {' or '.join(map(repr, BUILTIN_TEMPLATES))} "
            "or the path of a Jinja file"
        )
    return path.resolve()


def _template_line(err: BaseException, filenames: set[str]) -> int | None:
    """Line of the template being rendered when ``err`` was raised (Jinja maps frames to it)."""
    lines = [f.lineno for f in traceback.extract_tb(err.__traceback__) if f.filename in filenames]
    return lines[-1] if lines else getattr(err, "lineno", None)


def render_card(context: CardContext, template: str | Path = "default") -> Any:
    """Render ``template`` with ``context`` into a :class:`huggingface_hub.ModelCard`.

    :raises CardTemplateError: naming the template file and line for a syntax error, an
        undefined variable or an error raised while rendering, or for invalid metadata.
    """
    import jinja2
    from huggingface_hub import ModelCard

    path = _template_path(template)
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader([str(path.parent), str(templates_dir())]),
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    card_data = context.data.to_yaml()
    try:
        tpl = env.get_template(path.name)
    except jinja2.TemplateSyntaxError as e:
        raise CardTemplateError(
            f"model card template {e.filename or path}, line {e.lineno}: {e.message}"
        ) from None
    filenames = {str(path), str(templates_dir() / path.name)}
    try:
        text = tpl.render(card_data=card_data, **context.variables)
    except jinja2.TemplateSyntaxError as e:  # in an included/extended template
        raise CardTemplateError(
            f"model card template {e.filename or path}, line {e.lineno}: {e.message}"
        ) from None
    except (jinja2.TemplateError, TypeError, ValueError, KeyError, AttributeError) as e:
        filenames |= {str(p) for p in templates_dir().glob("*.j2")}
        line = _template_line(e, filenames)
        where = f", line {line}" if line else ""
        raise CardTemplateError(f"model card template {path}{where}: {type(e).__name__}: {e}") from None
    if not text.lstrip().startswith("---"):  # a template without metadata still gets it
        text = f"---\n{card_data}\n---\n\n{text}"
    try:
        return ModelCard(text)
    except ValueError as e:
        raise CardTemplateError(f"model card template {path} produced invalid metadata: {e}") from None


def build_card(folder: str | Path, *, template: str | Path = "default", **kwargs: Any) -> Any:
    """Build and render the card of a saved folder (``kwargs``: see :func:`build_card_context`)."""
    return render_card(build_card_context(folder, **kwargs), template)


def write_card(folder: str | Path, card: Any) -> Path:
    """Write ``card`` (a ``ModelCard`` or text) as ``folder/README.md``, atomically."""
    return atomic_write(Path(folder) / CARD_FILE, card if isinstance(card, str) else str(card))
