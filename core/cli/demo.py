"""``llmpress demo``: the whole product on a laptop CPU in about two minutes.

It trains (or takes from the cache) a small byte-level Llama on fixed standard-library source, then
prunes it (magnitude, Wanda, SparseGPT at 50 % and 2:4), quantizes it (RTN and GPTQ at 4 and
3 bits) and does both (SparseGPT 2:4 then GPTQ 4-bit). Each result is evaluated on held-out
source, saved (pruned ones as plain checkpoints, quantized ones packed), loaded back with
plain ``AutoModelForCausalLM.from_pretrained`` and compared with the in-memory model; one
result gets its model card. :func:`run_demo` returns the rows of one table.

The numbers only mean something if the model is trained properly: with small batches, a
warm-up and a cosine decay (:class:`DemoConfig`). Even so, a model this small (2 layers, width
128) has no outlier features - input channels far larger than the rest, which appear in models
of billions of parameters - and Wanda's gain over magnitude rests on them: here the two are a
near tie that the CPU's instruction set decides (it changes the trained model). The demo
therefore checks (:func:`orderings`) the orderings the papers predict for any model, each
with a clear gap: SparseGPT beats magnitude, and Wanda at 2:4; 2:4 costs magnitude and
Wanda more than 50 % unstructured; GPTQ beats RTN at 3 bits; 2:4 on top of 4-bit costs more
than 4-bit alone. (With SparseGPT's weight update, 2:4 costs this model only a little more than
50 %: too little to check.) Magnitude compares weights per output row, the group Wanda uses.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import logging
import math
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

EVAL_TASK = "llmpress-source-heldout"


def _byte_chars() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte, the alphabet of a byte-level BPE."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def byte_tokenizer() -> Any:
    """Bytes as tokens (vocabulary 256, token id = byte value) as a Hugging Face fast tokenizer:
    saved with every demo folder, so ``llmpress compress``, ``llmpress eval --text`` and
    ``AutoTokenizer.from_pretrained`` work on them. A BPE with no merges over the byte alphabet."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = _byte_chars()
    tok = Tokenizer(models.BPE(vocab={c: b for b, c in chars.items()}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """The demo model, its training, calibration and evaluation.

    Training uses AdamW with a linear warm-up, then a cosine decay to ``final_lr`` times
    ``lr``, on small batches: at the same compute, many small annealed steps reach a far
    better model than a few large ones at a constant rate. Calibration windows come from the
    training text, evaluation windows from the held-out text (at most ``eval_tokens``).
    """

    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    seqlen: int = 128
    batch_size: int = 4
    steps: int = 1800
    lr: float = 2e-3
    warmup: int = 100
    final_lr: float = 0.1
    seed: int = 0
    nsamples: int = 32
    eval_tokens: int = 32768
    group_size: int = 32

    def cache_key(self, corpus: str) -> str:
        """A short hash of the corpus, this config and the torch/transformers versions."""
        import transformers

        h = hashlib.sha256(corpus.encode("utf-8"))
        h.update(json.dumps(dataclasses.asdict(self), sort_keys=True).encode())
        h.update(f"{torch.__version__} {transformers.__version__}".encode())
        return h.hexdigest()[:16]


DEFAULT_CONFIG = DemoConfig()


@dataclasses.dataclass(frozen=True)
class DemoCase:
    """One row of the table: a recipe and how to describe it."""

    name: str
    pattern: str
    bits: int | None
    stages: tuple[dict[str, Any], ...]

    @property
    def folder(self) -> str:
        bits = f"-w{self.bits}" if self.bits else ""
        pattern = {"50%": "-50", "2:4": "-2of4", "-": ""}[self.pattern]
        return f"{self.name.replace('+', '-')}{pattern}{bits}"


@dataclasses.dataclass
class DemoRow:
    """The measured result of one :class:`DemoCase` (or of the dense model)."""

    name: str
    pattern: str
    bits: int | None
    sparsity: float
    ppl: float
    size_mb: float  # the weight files only (see :func:`weights_mb`)
    reload: str
    time_s: float
    folder: Path


@dataclasses.dataclass
class DemoResult:
    """What :func:`run_demo` produced: the table's rows, the output folder, the card, and the
    config and evaluation windows ``[n, seqlen]`` the legend describes."""

    rows: list[DemoRow]
    out: Path
    card: Path
    config: DemoConfig
    eval_windows: int


def demo_cases(group_size: int = 32) -> list[DemoCase]:
    """Pruning at 50 % and 2:4, quantization at 4 and 3 bits, and 2:4 + 4-bit together.

    Magnitude compares weights per output row, as Wanda does (see the module docstring)."""
    cases = [
        DemoCase(method, label, None, ({"method": method, "sparsity": 0.5, "pattern": pattern, **extra},))
        for method, extra in (("magnitude", {"group": "row"}), ("wanda", {}), ("sparsegpt", {}))
        for label, pattern in (("50%", "unstructured"), ("2:4", "2:4"))
    ]
    cases += [
        DemoCase(method, "-", bits, ({"method": method, "bits": bits, "group_size": group_size},))
        for method in ("rtn", "gptq")
        for bits in (4, 3)
    ]
    joint = (
        {"method": "sparsegpt", "sparsity": 0.5, "pattern": "2:4"},
        {"method": "gptq", "bits": 4, "group_size": group_size},
    )
    return [*cases, DemoCase("sparsegpt+gptq", "2:4", 4, joint)]


# ------------------------------------------------------------------------------ corpus


#: standard-library modules whose source is the demo's text: it does not change when llmpress's
#: own code does, so neither do the demo model and its numbers
CORPUS_MODULES = (
    "argparse",
    "textwrap",
    "dataclasses",
    "functools",
    "pathlib",
    "json.decoder",
    "json.encoder",
    "shutil",
    "contextlib",
)


def demo_corpus() -> str:
    """The Python source of a fixed set of standard-library modules, in a fixed order."""
    import importlib
    import inspect

    texts = []
    for name in CORPUS_MODULES:
        source = inspect.getsourcefile(importlib.import_module(name))
        assert source is not None, name
        texts.append(Path(source).read_text(encoding="utf-8"))
    return "\n\n".join(texts)


def split_corpus(text: str, held_out: float = 0.1) -> tuple[str, str]:
    """(training text, held-out text): the last ``held_out`` of the corpus is held out."""
    cut = int(len(text) * (1 - held_out))
    return text[:cut], text[cut:]


# ---------------------------------------------------------------------------- training


def _llama_config(cfg: DemoConfig) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=256,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.seqlen,
        tie_word_embeddings=False,
    )


def lr_factor(step: int, cfg: DemoConfig) -> float:
    """Linear warm-up over ``cfg.warmup`` steps, then cosine decay to ``cfg.final_lr``."""
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    done = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.final_lr + (1 - cfg.final_lr) * 0.5 * (1 + math.cos(math.pi * done))


def train_demo_model(text: str, cfg: DemoConfig, on_step: Callable[[int, float], None] | None = None) -> Any:
    """A small Llama trained on ``text`` (byte level) on the CPU; deterministic for a seed."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(cfg.seed)
    model = LlamaForCausalLM(_llama_config(cfg))
    data = torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
    g = torch.Generator().manual_seed(cfg.seed)
    model.train()
    for step in range(cfg.steps):
        starts = torch.randint(0, data.numel() - cfg.seqlen - 1, (cfg.batch_size,), generator=g)
        x = torch.stack([data[s : s + cfg.seqlen] for s in starts.tolist()])
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if on_step is not None:
            on_step(step, loss.item())
    return model.eval()


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/llmpress`` (``~/.cache/llmpress``)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llmpress"


def demo_model(
    text: str,
    cfg: DemoConfig,
    cache_dir: Path | None,
    on_step: Callable[[int, float], None] | None = None,
) -> Any:
    """The trained demo model: from ``cache_dir/demo-<hash>`` if there, else trained (and cached)."""
    from llmpress.format.loading import load_model
    from llmpress.format.save import atomic_directory

    path = None if cache_dir is None else Path(cache_dir) / f"demo-{cfg.cache_key(text)}"
    if path is not None and (path / "config.json").is_file():
        log.info("demo model from the cache %s", path)
        return load_model(path, dtype=torch.float32, tokenizer=False)[0]
    model = train_demo_model(text, cfg, on_step)
    if path is not None:
        try:
            with atomic_directory(path, overwrite=True) as tmp:
                model.save_pretrained(tmp)
        except OSError as e:  # a read-only home only costs the next run its training
            log.warning("could not cache the demo model in %s (%s)", path, e)
    return model


# ------------------------------------------------------------------------ measurements


def weights_mb(folder: Path) -> float:
    """Size of the weight files (``*.safetensors``) in ``folder`` in MB (10^6 bytes): the config,
    report, tokenizer and evaluation files beside them (a few kB, more for a longer report) are
    left out, so that equal weights show equal sizes."""
    return sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 1e6


@torch.no_grad()
def reload_check(model: Any, folder: Path, probe: torch.Tensor) -> str:
    """Load ``folder`` (``from_pretrained`` through :func:`llmpress.load_model`) in ``model``'s
    dtype and compare its logits on ``probe`` with ``model``'s: ``"identical"`` or the largest
    absolute difference."""
    from llmpress.format.loading import load_model

    loaded, _ = load_model(folder, dtype=model.dtype, tokenizer=False)
    a = model(input_ids=probe).logits.float()
    b = loaded(input_ids=probe).logits.float()
    return "identical" if torch.equal(a, b) else f"{(a - b).abs().max().item():.1e}"


def _record_perplexity(folder: Path, result: dict[str, float], cfg: DemoConfig) -> None:
    """Write the held-out perplexity into ``folder/llmpress_eval.json`` (shown by the card)."""
    from llmpress.cli.eval_harness import perplexity_record, save_eval

    save_eval(folder, [perplexity_record(result, EVAL_TASK, cfg.seqlen)])


def run_case(
    case: DemoCase,
    dense: Any,
    calib: torch.Tensor,
    windows: torch.Tensor,
    out: Path,
    cfg: DemoConfig,
    tokenizer: Any,
) -> DemoRow:
    """Compress a copy of ``dense`` with ``case``, evaluate, save (with ``tokenizer``), reload
    and compare."""
    from llmpress.cli.evaluate import perplexity_of_windows
    from llmpress.format.save import save_result, to_runtime
    from llmpress.pipeline.compress import compress

    model = copy.deepcopy(dense)
    t0 = time.perf_counter()
    model, report = compress(model, {"stages": list(case.stages)}, calib, progress=False)
    elapsed = time.perf_counter() - t0
    ppl = perplexity_of_windows(model, windows)
    folder = out / case.folder
    if report.state.quantized:  # packed, fp16: loads after `import llmpress`
        save_result(model, folder, report=report, tokenizer=tokenizer, overwrite=True)
        to_runtime(model, result=report)  # exactly what loading the folder gives
    else:  # an ordinary fp32 checkpoint: the in-memory model is what loading gives
        save_result(model, folder, report=report, tokenizer=tokenizer, dtype=torch.float32, overwrite=True)
    _record_perplexity(folder, ppl, cfg)
    return DemoRow(
        name=case.name,
        pattern=case.pattern,
        bits=case.bits,
        sparsity=report.overall_sparsity,
        ppl=ppl["perplexity"],
        size_mb=weights_mb(folder),
        reload=reload_check(model, folder, windows[:2]),
        time_s=elapsed,
        folder=folder,
    )


def dense_row(dense: Any, windows: torch.Tensor, out: Path, cfg: DemoConfig, tokenizer: Any) -> DemoRow:
    """The uncompressed model, saved and reloaded like the others."""
    from llmpress.cli.evaluate import perplexity_of_windows
    from llmpress.format.save import save_compressed

    ppl = perplexity_of_windows(dense, windows)
    folder = save_compressed(dense, out / "dense-llama", tokenizer=tokenizer, overwrite=True)
    _record_perplexity(folder, ppl, cfg)
    reload = reload_check(dense, folder, windows[:2])
    return DemoRow("dense", "-", None, 0.0, ppl["perplexity"], weights_mb(folder), reload, 0.0, folder)


def write_demo_card(folder: Path, base: Path) -> Path:
    """Render the model card of ``folder`` into it (``base``: the dense model's folder)."""
    from llmpress.hub.card import build_card, write_card

    card = build_card(folder, base_model=str(base))  # not published: the card shows the local path
    return write_card(folder, card)


# ------------------------------------------------------------------------------ quiet


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence llmpress's INFO logs, transformers' and huggingface_hub's progress bars and
    warnings while the demo's own bar runs; everything is restored afterwards."""
    import huggingface_hub.utils as hf_utils
    from transformers.utils import logging as tf_logging

    loggers = [logging.getLogger(), logging.getLogger("llmpress")]  # root: matplotlib's INFO lines too
    old_levels, old_verbosity = [lg.level for lg in loggers], tf_logging.get_verbosity()
    tf_bars, hub_bars = tf_logging.is_progress_bar_enabled(), not hf_utils.are_progress_bars_disabled()
    for lg in loggers:
        lg.setLevel(max(lg.getEffectiveLevel(), logging.WARNING))
    tf_logging.set_verbosity_error()
    tf_logging.disable_progress_bar()
    hf_utils.disable_progress_bars()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, old_levels):
            lg.setLevel(level)
        tf_logging.set_verbosity(old_verbosity)
        if tf_bars:
            tf_logging.enable_progress_bar()
        if hub_bars:
            hf_utils.enable_progress_bars()


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run with ``n`` intra-op threads (``None``: as they are), restored afterwards."""
    old = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


# -------------------------------------------------------------------------------- run


def run_demo(
    out: str | Path | None = None,
    config: DemoConfig | None = None,
    *,
    steps: int | None = None,
    cache_dir: str | Path | None = None,
    cache: bool = True,
    threads: int | None = 1,
    progress: bool = True,
) -> DemoResult:
    """Run the demo; results go to ``out`` (default: a new temporary folder).

    :param config: model and training (default :data:`DEFAULT_CONFIG`); smaller ones run faster.
    :param steps: training steps, overriding the config's.
    :param cache_dir: where the trained demo model is cached (default :func:`default_cache_dir`);
        ``cache=False`` always trains.
    :param threads: torch intra-op threads while the demo runs (``None``: as they are). One
        thread is as fast as several for this model's small matrices, and the numbers are then
        the same on every machine.
    """
    from llmpress.cli.evaluate import text_windows
    from llmpress.engine.calibration import build_calibration

    cfg = config or DEFAULT_CONFIG
    if steps is not None:
        cfg = dataclasses.replace(cfg, steps=steps)
    base = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="llmpress-demo-"))
    cache_path = (Path(cache_dir) if cache_dir else default_cache_dir()) if cache else None
    cases = demo_cases(cfg.group_size)
    text = demo_corpus()
    train, held = split_corpus(text)
    tok = byte_tokenizer()
    with torch_threads(threads), quiet():
        torch.manual_seed(cfg.seed)
        bar = tqdm(total=cfg.steps + len(cases) + 2, desc="training", unit="step", disable=not progress)

        def on_step(step: int, loss: float) -> None:
            bar.update(1)
            if step % 10 == 0:
                bar.set_postfix(loss=f"{loss:.2f}")

        dense = demo_model(train, cfg, cache_path, on_step)
        bar.update(cfg.steps - bar.n)  # all at once when the model came from the cache
        bar.set_postfix_str("")
        calib = build_calibration(tok, [train], nsamples=cfg.nsamples, seqlen=cfg.seqlen, seed=cfg.seed)
        windows = text_windows(tok, held, cfg.seqlen, max_tokens=cfg.eval_tokens)
        bar.set_description("dense")
        rows = [dense_row(dense, windows, base, cfg, tok)]
        bar.update(1)
        for case in cases:
            bar.set_description(f"{case.name} {case.pattern}" + (f" {case.bits}-bit" if case.bits else ""))
            rows.append(run_case(case, dense, calib, windows, base, cfg, tok))
            bar.update(1)
        bar.set_description("model card")
        card = write_demo_card(rows[-1].folder, rows[0].folder)
        bar.update(1)
        bar.set_description("done")
        bar.close()
    log.debug("demo results in %s", base)
    return DemoResult(rows=rows, out=base, card=card, config=cfg, eval_windows=int(windows.shape[0]))


# ------------------------------------------------------------------------------ table


def format_table(rows: list[DemoRow]) -> str:
    """The demo's result table as text."""
    head = (
        f"{'method':<15} {'pattern':>7} {'bits':>4} {'sparsity':>8} {'perplexity':>10} "
        f"{'weights MB':>10} {'reload':>10} {'time':>7}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r.name:<15} {r.pattern:>7} {r.bits or 32:>4} {r.sparsity:>8.1%} {r.ppl:>10.3f} "
            f"{r.size_mb:>10.3f} {r.reload:>10} {'-' if r.name == 'dense' else f'{r.time_s:.1f}s':>7}"
        )
    return "\n".join(lines)


def format_legend(result: DemoResult) -> str:
    """What the table's columns mean, for this run's config and evaluation text."""
    cfg = result.config
    return "\n".join(
        [
            "bits        32: the fp32 weights as trained; 4 and 3: integers in groups of "
            f"{cfg.group_size} with fp16 scales",
            "sparsity    zero weights in the compressed layers (attention and MLP projections)",
            f"perplexity  per byte on {result.eval_windows} windows of {cfg.seqlen} bytes of held-out text "
            "(lower is better): the last",
            "            10 % of the corpus, never trained on",
            "weights MB  the .safetensors files; pruned models are saved as ordinary fp32 checkpoints "
            "with their zeros,",
            "            so they are as large as dense (`llmpress compress --sparse-format bitmask` packs them)",
            "reload      the logits of AutoModelForCausalLM.from_pretrained(folder) against the in-memory "
            "model's on",
            "            2 held-out windows: identical (bit for bit) or the largest difference",
            "time        compression, calibration statistics included",
        ]
    )


#: an ordering holds when the better method's perplexity increase over dense is at most this
#: fraction of the worse one's: a clear gap, not one decided by the last digit
CLEAR_GAP = 2 / 3


@dataclasses.dataclass(frozen=True)
class Ordering:
    """A comparison the papers predict: ``better`` hurts the model clearly less than ``worse``."""

    claim: str
    better: float
    worse: float
    dense: float

    @property
    def ratio(self) -> float:
        """``better``'s perplexity increase over dense as a fraction of ``worse``'s."""
        return (self.better - self.dense) / (self.worse - self.dense) if self.worse > self.dense else math.inf

    @property
    def holds(self) -> bool:
        return self.ratio <= CLEAR_GAP


def orderings(rows: list[DemoRow]) -> list[Ordering]:
    """The orderings the papers predict for any model, measured on ``rows`` (see the module
    docstring for why Wanda against magnitude is not one of them)."""
    ppl = {(r.name, r.pattern, r.bits): r.ppl for r in rows}

    def check(
        claim: str, better: tuple[str, str, int | None], worse: tuple[str, str, int | None]
    ) -> Ordering:
        return Ordering(claim, ppl[better], ppl[worse], ppl["dense", "-", None])

    return [
        *(
            check(f"SparseGPT < magnitude at {p}", ("sparsegpt", p, None), ("magnitude", p, None))
            for p in ("50%", "2:4")
        ),
        check("SparseGPT < Wanda at 2:4", ("sparsegpt", "2:4", None), ("wanda", "2:4", None)),
        *(
            check(f"{n} 50% < {n} 2:4", (m, "50%", None), (m, "2:4", None))
            for m, n in (("magnitude", "magnitude"), ("wanda", "Wanda"))
        ),
        check("GPTQ < RTN at 3-bit", ("gptq", "-", 3), ("rtn", "-", 3)),
        check("GPTQ 4-bit < SparseGPT 2:4 + GPTQ 4-bit", ("gptq", "-", 4), ("sparsegpt+gptq", "2:4", 4)),
    ]


def format_orderings(rows: list[DemoRow]) -> str:
    """The papers' orderings, one line each: holds or not, the two perplexities and the ratio of
    their increases over dense; then why Wanda against magnitude is not one of them."""
    lines = [f"the papers' orderings (holds: at most {CLEAR_GAP:.0%} of the other's increase over dense)"]
    for c in orderings(rows):
        lines.append(
            f"  {'holds' if c.holds else 'FAILS'}  {c.claim:<40} {c.better:.3f} vs {c.worse:.3f}, "
            f"increase {max(c.ratio, 0.0):.0%} of the other's"
        )
    lines.append("  Wanda against magnitude is not checked: Wanda's gain needs outlier features (a few input")
    lines.append(
        "  channels far larger than the rest), which models of billions of parameters have and this one lacks"
    )
    return "\n".join(lines)
