"""Handler of ``llmpress push`` (wired into :mod:`llmpress.cli.main`).

Only argparse at import time; the Hub client, Jinja and matplotlib load when the command runs.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

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
        "--base-model",
        default=None,
        help="Hub id of the dense model (card metadata, size, license); a local folder is named in the text only",
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
