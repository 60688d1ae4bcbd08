"""Handlers of ``llmpress push`` and ``llmpress eval`` (wired into :mod:`llmpress.cli`).

Only argparse at import time; the Hub client, Jinja, matplotlib and lm-eval load when a
command runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

from llmpress.errors import LlmpressError

log = logging.getLogger(__name__)


def add_push_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``llmpress push DIR REPO_ID``."""
    p.add_argument("model_dir", help="saved model folder (from `llmpress compress`)")
    p.add_argument("repo_id", help="namespace/name on the Hub (created if needed)")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--token", default=None, help="write token (default: HF_TOKEN or the stored login)")
    p.add_argument("--endpoint", default=None, help="Hub URL (default: HF_ENDPOINT or huggingface.co)")
    p.add_argument("--revision", default=None, help="branch to commit to (created if missing)")
    p.add_argument("--template", default="default", help="card template: default, short or a .j2 file")
    p.add_argument(
        "--base-model", default=None, help="Hub id of the dense model (card metadata, size, license)"
    )
    p.add_argument("--license", default=None, help="license id (default: the base model's)")
    p.add_argument("--commit-message", default=None)
    p.add_argument("--retries", type=int, default=3, help="attempts per request on transient errors")


def push_command(a: argparse.Namespace) -> int:
    """``llmpress push``: publish the folder and its card in one commit; print the repo URL."""
    from llmpress.hub.publish import push

    info = push(
        Path(a.model_dir),
        a.repo_id,
        private=True if a.private else None,
        token=a.token,
        endpoint=a.endpoint,
        revision=a.revision,
        template=a.template,
        base_model=a.base_model,
        license=a.license,
        commit_message=a.commit_message,
        retries=a.retries,
    )
    print(info.repo_url)
    return 0


def _split_tasks(spec: str | None) -> list[str]:
    return [t.strip() for t in (spec or "").split(",") if t.strip()]


def _limit(value: str | None) -> float | None:
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


def eval_command(a: argparse.Namespace) -> int:
    """``llmpress eval``: perplexity on ``--text`` and/or lm-eval ``--tasks`` on one loaded model.

    Output: ``--json`` prints one JSON object, the perplexity keys at the top level (as
    before) and ``"tasks": {task: {metric: value}}`` when tasks ran. Results are merged into
    ``DIR/llmpress_eval.json`` (unless ``--no-save``) for the model card.
    """
    from llmpress.evaluate import perplexity
    from llmpress.hub.eval_harness import perplexity_record, run_lm_eval, save_eval
    from llmpress.loading import load_model

    tasks = _split_tasks(getattr(a, "tasks", None))
    limit = _limit(getattr(a, "limit", None))
    if a.text is None and not tasks:
        raise LlmpressError(
            "eval needs --text FILE (perplexity) and/or --tasks T1,T2 (lm-eval-harness tasks)"
        )
    model, tok = load_model(a.model_dir, dtype=a.dtype, device=a.device)
    if tok is None:
        raise LlmpressError(
            f"{a.model_dir} has no tokenizer; {'perplexity' if a.text else 'evaluation'} needs one"
        )
    out: dict[str, Any] = {}
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
            progress=not a.json,
        )
        out.update(res)
        records.append(perplexity_record(res, a.text, a.seqlen))
    if tasks:
        include = getattr(a, "include_path", None) or []
        recs = run_lm_eval(model, tok, tasks, limit=limit, include_path=include, batch_size=a.batch_size)
        records += recs
        table: dict[str, dict[str, float]] = {}
        for r in recs:
            table.setdefault(r.task, {})[r.metric] = r.value
        out["tasks"] = table
    if not getattr(a, "no_save", False) and Path(a.model_dir).is_dir():
        save_eval(a.model_dir, records)
    if a.json:
        print(json.dumps(out))
        return 0
    if a.text is not None:
        print(f"perplexity {out['perplexity']:.4f} over {int(out['windows'])} windows of {a.seqlen} tokens")
    for r in records[1 if a.text is not None else 0 :]:
        err = f" ± {r.stderr:.4f}" if r.stderr is not None else ""
        print(f"{r.task} {r.metric} {r.value:.4f}{err} ({r.samples} samples)")
    return 0


def _raise_keyboard_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def local_server_main(argv: list[str] | None = None) -> None:
    """Command line entry point: serve a local Hub until interrupted."""
    parser = argparse.ArgumentParser(description="Serve a local Hugging Face Hub-compatible server.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--root", type=Path, required=True, help="storage directory")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from llmpress.hub.local_server import LocalHubServer

    server = LocalHubServer(args.root, host=args.host, port=args.port).start()
    print(server.url, flush=True)
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
