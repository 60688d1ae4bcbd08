"""Compress a model, evaluate it and publish it with its model card; prints the repo URL.

    python examples/publish.py --endpoint https://huggingface.co --repo-id me/tiny-wanda --token hf_...

Try it offline against the test suite's local Hub-compatible server (``tests/localhub``)::

    PYTHONPATH=tests python -m localhub --root /tmp/hub --port 8080 &
    HF_HUB_DISABLE_XET=1 python examples/publish.py --endpoint http://127.0.0.1:8080 --repo-id me/tiny

Without ``--model`` it builds a small Llama trained for ``--steps`` on llmpress's own source
(byte-level tokens), so nothing is downloaded. With ``--model`` (a folder or Hub id), pass
``--calib`` and ``--eval-text`` files. ``--tasks`` adds lm-eval-harness tasks
(``--include-path`` for local task YAMLs).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path
from typing import Any

import llmpress
import llmpress.hub
from llmpress.cli.eval_harness import evaluate


def byte_tokenizer() -> Any:
    """A transformers tokenizer whose ids are the UTF-8 bytes (what the demo model is trained on)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars, extra = {}, 0
    for b in range(256):  # GPT-2's byte -> printable character map, so that id == byte value
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    vocab = {chars[b]: b for b in range(256)}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token=chars[10], pad_token=chars[0])


def demo_model(steps: int, workdir: Path) -> tuple[Any, Any, list[str], Path]:
    """(model, tokenizer, calibration texts, held-out text file) of the built-in small model."""
    from llmpress.cli.demo import DemoConfig, demo_corpus, train_demo_model

    text = demo_corpus()
    split = int(len(text) * 0.9)
    held = workdir / "llmpress-source-heldout.txt"
    held.write_text(text[split:], encoding="utf-8")
    model = train_demo_model(text[:split], DemoConfig(steps=steps, warmup=min(100, steps // 10)))
    return model, byte_tokenizer(), [text[:split]], held


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--endpoint", required=True, help="Hub URL, e.g. https://huggingface.co or a local server")
    p.add_argument("--repo-id", required=True, help="namespace/name to publish to")
    p.add_argument("--token", default=None, help="write token (default: HF_TOKEN)")
    p.add_argument("--private", action="store_true")
    p.add_argument("--model", default=None, help="model folder or Hub id (default: the built-in small model)")
    p.add_argument("--calib", default=None, help="calibration text file (required with --model)")
    p.add_argument("--eval-text", default=None, help="text file for perplexity")
    p.add_argument("--recipe", default=None, help="recipe YAML/JSON (default: Wanda 50 %% unstructured)")
    p.add_argument("--tasks", default="", help="comma-separated lm-eval tasks")
    p.add_argument("--include-path", default=None, help="folder of local lm-eval task YAMLs")
    p.add_argument("--limit", type=int, default=None, help="documents per lm-eval task")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=64)
    p.add_argument("--steps", type=int, default=300, help="training steps of the built-in model")
    p.add_argument("--out", default=None, help="where to save the compressed folder (default: a temp dir)")
    a = p.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="llmpress-publish-"))
    if a.model is None:
        model, tok, calib, held = demo_model(a.steps, work)
        eval_text: Path | None = Path(a.eval_text) if a.eval_text else held
    else:
        if a.calib is None:
            p.error("--calib is required with --model")
        model, tok = llmpress.load_model(a.model)
        calib, eval_text = a.calib, Path(a.eval_text) if a.eval_text else None
    recipe = a.recipe or {"stages": [{"method": "wanda", "sparsity": 0.5}]}
    model, report = llmpress.compress(
        model, recipe, calib, tokenizer=tok, nsamples=a.nsamples, seqlen=a.seqlen
    )
    out = Path(a.out) if a.out else work / a.repo_id.split("/")[-1]
    llmpress.save_compressed(model, out, tokenizer=tok, report=report, overwrite=True)

    tasks = [t for t in a.tasks.split(",") if t]
    include = [a.include_path] if a.include_path else None
    for r in evaluate(
        model,
        tok,
        text=eval_text,
        tasks=tasks,
        limit=a.limit,
        include_path=include,
        seqlen=a.seqlen,
        save_to=out,
    ):
        logging.getLogger("publish").info("%s %s = %.4f", r.task, r.metric, r.value)

    info = llmpress.hub.push(
        out, a.repo_id, endpoint=a.endpoint, token=a.token, private=a.private or None, base_model=a.model
    )
    print(info.repo_url)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    raise SystemExit(main())
