"""Publish a saved folder to the Hub in one commit with its card; pull it back.

:func:`push` renders the card into the folder (``README.md`` and the allocation plot), creates
the repo if needed, and uploads every file in a single ``HfApi.create_commit``. A Hub commit is
atomic: on any failure nothing new is visible in the repo, and re-running the same push
completes it. Transient failures (HTTP 429/5xx, dropped connections) are retried with a bounded
exponential backoff. Tokens are passed to ``HfApi`` only: never logged, never written to disk.

:func:`attach_card` makes a compressed model's own ``model.push_to_hub(repo_id)`` publish the
same folder (weights, tokenizer, llmpress files and card) through :func:`push`.
"""

from __future__ import annotations

import fnmatch
import logging
import shutil
import tempfile
import time
import types
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from llmpress.hub.errors import PublishError

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_RETRIES = 3
#: remote files that a new push replaces: a file matching these and absent locally is deleted
STALE_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json", "llmpress_*")
_TRANSPORT_ERRORS = {
    "TransportError",
    "NetworkError",
    "TimeoutException",
    "RemoteProtocolError",
    "ConnectError",
}
_WEIGHT_FILES = ("*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json", "config.json")


# ------------------------------------------------------------------------------ errors


def _status(err: BaseException) -> int | None:
    response = getattr(err, "response", None)
    return getattr(response, "status_code", None)


def _is_transport(err: BaseException) -> bool:
    return isinstance(err, (ConnectionError, TimeoutError)) or any(
        c.__name__ in _TRANSPORT_ERRORS for c in type(err).__mro__
    )


def _transient(err: BaseException) -> bool:
    status = _status(err)
    return _is_transport(err) or (status is not None and (status == 429 or status >= 500))


def _scrub(text: str, token: str | None) -> str:
    return text.replace(token, "***") if token else text


def _explain(err: BaseException, what: str, endpoint: str, repo_id: str, attempts: int) -> PublishError:
    """A :class:`PublishError` that says what failed, why, and what to do."""
    status = _status(err)
    server = getattr(err, "server_message", None) or ""
    detail = f": {server}" if server else ""
    rerun = (
        "A Hub commit is atomic, so the repo holds either its previous or the complete new version; "
        "re-run the same command to finish."
    )
    if _is_transport(err):
        msg = f"{what}: cannot reach {endpoint} ({type(err).__name__}) after {attempts} attempt(s). {rerun}"
    elif status == 401:
        msg = (
            f"{what}: authentication failed at {endpoint} (HTTP 401){detail}. The token was rejected: pass a "
            "valid write token with --token / token= or set HF_TOKEN."
        )
    elif status == 403:
        msg = f"{what}: the token may not write to {repo_id!r} (HTTP 403){detail}. Use a token of its owner or organization."
    elif status == 404:
        msg = f"{what}: {repo_id!r} not found at {endpoint} (HTTP 404){detail}, or the token cannot see it."
    elif status is not None and (status == 429 or status >= 500):
        msg = (
            f"{what}: server error HTTP {status} from {endpoint} after {attempts} attempt(s){detail}. {rerun}"
        )
    elif status is not None:
        msg = f"{what}: the Hub rejected the request (HTTP {status}){detail}."
    else:
        msg = f"{what}: {type(err).__name__}: {err}"
    return PublishError(msg)


def _with_retries(
    what: str,
    fn: Callable[[], T],
    *,
    retries: int,
    backoff: float,
    endpoint: str,
    repo_id: str,
    token: str | None,
) -> T:
    """Call ``fn``; retry transient failures up to ``retries`` attempts (waits backoff, 2x, 4x...).

    HTTP and network errors become a :class:`PublishError`; anything else propagates as is.
    """
    attempts = max(1, retries)
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as e:
            if _status(e) is None and not _is_transport(e):
                raise
            if not _transient(e) or attempt == attempts:
                raise PublishError(_scrub(str(_explain(e, what, endpoint, repo_id, attempt)), token)) from e
            wait = backoff * 2 ** (attempt - 1)
            reason = f"HTTP {_status(e)}" if _status(e) is not None else type(e).__name__
            log.warning("%s failed (%s); retry %d/%d in %.1fs", what, reason, attempt, attempts - 1, wait)
            time.sleep(wait)
    raise AssertionError("unreachable")


# -------------------------------------------------------------------------------- push


def _local_files(folder: Path) -> dict[str, Path]:
    """Repo path -> file, skipping hidden files and folders (``.cache``, temporary files)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if p.is_file() and not any(part.startswith(".") for part in rel.parts):
            out[rel.as_posix()] = p
    return out


def _validate_repo_id(repo_id: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise PublishError(
            f"invalid repo id {repo_id!r}: use 'name' or 'namespace/name' with letters, digits, '-', '_' "
            f"and '.' ({e})"
        ) from None


def push(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    endpoint: str | None = None,
    revision: str | None = None,
    template: str | Path = "default",
    card: Any = None,
    base_model: str | None = None,
    license: str | None = None,
    tags: Sequence[str] = (),
    commit_message: str | None = None,
    commit_description: str | None = None,
    create_pr: bool = False,
    retries: int = DEFAULT_RETRIES,
    backoff: float = 1.0,
) -> Any:
    """Upload a saved model folder and its model card to ``repo_id`` in one commit.

    :param folder: a folder written by :func:`llmpress.save_compressed` (any HF model folder works).
    :param repo_id: ``namespace/name`` (or ``name`` in the token owner's namespace); created if needed.
    :param private: visibility of a repo created now (an existing repo keeps its own).
    :param token: a write token; default: ``HF_TOKEN`` or the stored login. Never logged or saved.
    :param endpoint: Hub URL (default: ``HF_ENDPOINT`` or huggingface.co).
    :param revision: branch to commit to (created from main if missing).
    :param template: card template: ``"default"``, ``"short"`` or a Jinja file path.
    :param card: a ready ``ModelCard`` or Markdown text to publish instead of rendering one.
    :param base_model: Hub id of the dense model, for the card (metadata, size, license).
    :param retries: attempts per request on transient errors; ``backoff`` is the first wait (s).
    :returns: the ``huggingface_hub.CommitInfo`` of the commit (``.repo_url``, ``.oid``).
    :raises PublishError: with the cause (authentication, repo name, server, network) and the fix.
    """
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, constants

    from llmpress.hub.card import build_card, write_card

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise PublishError(
            f"{folder} is not a saved model folder (no config.json); save it with save_compressed first"
        )
    _validate_repo_id(repo_id)
    api = HfApi(endpoint=endpoint, token=token)
    url = (endpoint or constants.ENDPOINT).rstrip("/")

    def call(what: str, fn: Callable[[], T]) -> T:
        return _with_retries(
            what, fn, retries=retries, backoff=backoff, endpoint=url, repo_id=repo_id, token=token
        )

    if card is None:
        card = build_card(
            folder,
            template=template,
            repo_id=repo_id,
            base_model=base_model,
            license=license,
            tags=tags,
            api=api,
        )
    write_card(folder, card)

    repo_url = call("create repo", lambda: api.create_repo(repo_id, private=private, exist_ok=True))
    repo_id = repo_url.repo_id
    if revision and revision != constants.DEFAULT_REVISION:
        call("create branch", lambda: api.create_branch(repo_id, branch=revision, exist_ok=True))
    local = _local_files(folder)
    remote = call("list files", lambda: api.list_repo_files(repo_id, revision=revision))
    stale = [f for f in remote if f not in local and any(fnmatch.fnmatch(f, p) for p in STALE_PATTERNS)]
    message = commit_message or f"Upload llmpress-compressed model ({len(local)} files)"

    def commit() -> Any:  # fresh operations per attempt: no upload state carried over
        ops: list[Any] = [
            CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(p)) for name, p in local.items()
        ]
        ops += [CommitOperationDelete(path_in_repo=name) for name in stale]
        return api.create_commit(
            repo_id,
            ops,
            commit_message=message,
            commit_description=commit_description,
            revision=revision,
            create_pr=create_pr,
        )

    info = call("upload", commit)
    log.info(
        "published %s (%d files%s) at %s",
        repo_id,
        len(local),
        f", {len(stale)} removed" if stale else "",
        info.commit_url,
    )
    return info


def repo_url(info: Any) -> str:
    """The browsable URL of a pushed repo from :func:`push`'s ``CommitInfo``."""
    return str(info.repo_url)


# -------------------------------------------------------------------------------- pull


def pull(
    repo_id: str,
    *,
    revision: str | None = None,
    token: str | None = None,
    endpoint: str | None = None,
    local_dir: str | Path | None = None,
    dtype: Any = "auto",
    device: str = "cpu",
) -> tuple[Any, Any]:
    """Download ``repo_id`` and load ``(model, tokenizer)`` with the Auto class its config implies.

    Quantized llmpress checkpoints load through llmpress's quantizer (registered by ``import
    llmpress``); pruned-only ones are plain checkpoints.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError

    from llmpress.loading import load_model

    _validate_repo_id(repo_id)
    try:
        path = snapshot_download(
            repo_id, revision=revision, token=token, endpoint=endpoint, local_dir=local_dir
        )
    except (HfHubHTTPError, OSError) as e:
        raise PublishError(
            _scrub(str(_explain(e, "download", endpoint or "the Hub", repo_id, 1)), token)
        ) from None
    return load_model(path, dtype=dtype, device=device)


# ---------------------------------------------------------------------------- attach_card


def attach_card(
    model: Any,
    source: str | Path | None = None,
    *,
    report: Any = None,
    tokenizer: Any = None,
    template: str | Path = "default",
    base_model: str | None = None,
    license: str | None = None,
) -> Any:
    """Make ``model.push_to_hub(repo_id, ...)`` publish llmpress's folder and card.

    transformers' own ``push_to_hub`` uploads the weights with the repo's existing README or a
    generic card. After ``attach_card``, the model's ``push_to_hub`` (same arguments) saves the
    model with its own ``save_pretrained``, adds the tokenizer and llmpress files (from the
    saved ``source`` folder, or ``report``/``tokenizer``) and publishes through :func:`push`:
    one commit with the llmpress card. Returns ``model``.
    """
    from llmpress.save import RECIPE_FILE, REPORT_FILE

    src = Path(source) if source is not None else None
    if src is not None and not (src / "config.json").is_file():
        raise PublishError(f"attach_card: {src} is not a saved model folder (no config.json)")

    def fill(tmp: Path) -> None:
        if src is not None:  # tokenizer, llmpress_*.json... (weights and config come from the model)
            for name, p in _local_files(src).items():
                skip = any(fnmatch.fnmatch(name, pat) for pat in _WEIGHT_FILES) or name in ("README.md",)
                if not skip and not (tmp / name).exists():
                    (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(p, tmp / name)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if report is not None:
            import json

            (tmp / REPORT_FILE).write_text(json.dumps(report.to_dict(), indent=2))
            (tmp / RECIPE_FILE).write_text(json.dumps(report.recipe, indent=2))

    def push_to_hub(
        self: Any,
        repo_id: str,
        *,
        commit_message: str | None = None,
        commit_description: str | None = None,
        private: bool | None = None,
        token: str | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        max_shard_size: int | str | None = "50GB",
        tags: list[str] | None = None,
        **kwargs: Any,
    ) -> Any:
        with tempfile.TemporaryDirectory(prefix="llmpress-push-") as d:
            tmp = Path(d)
            type(self).save_pretrained(self, tmp, max_shard_size=max_shard_size)
            fill(tmp)
            return push(
                tmp,
                repo_id,
                private=private,
                token=token,
                revision=revision,
                template=template,
                base_model=base_model,
                license=license,
                tags=tags or (),
                commit_message=commit_message,
                commit_description=commit_description,
                create_pr=create_pr,
                **kwargs,
            )

    model.push_to_hub = types.MethodType(push_to_hub, model)
    return model
