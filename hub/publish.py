"""Publish a saved folder to the Hub in one commit with its card; pull it back.

:func:`push` renders the card into the folder (``README.md`` and the allocation plot), creates
the repo if needed, and uploads every file in a single ``HfApi.create_commit``. A Hub commit is
atomic: on any failure nothing new is visible in the repo, and re-running the same push
completes it (LFS files already uploaded are skipped). Transient failures (HTTP 429/5xx, dropped
connections, also when ``huggingface_hub`` wraps them in another exception) are retried with a
bounded exponential backoff; a client error (HTTP 4xx but 429) is not retried and is named as the
answer it is, also when ``hf_xet`` reports it inside a ``ConnectionError``. Before anything is sent, a folder without weights and a card whose
``model-index`` holds NaN/inf are refused. Tokens are passed to ``HfApi`` only: never logged,
never written to disk.

:func:`push_model` publishes an in-memory compressed model the same way (weights, tokenizer,
llmpress files and card) through :func:`push`; the model's own ``push_to_hub`` is left as it is.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import math
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt, wait_exponential

from llmpress.hub.errors import PublishError

if TYPE_CHECKING:
    from llmpress.model.report import CompressionReport

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_RETRIES = 3
#: remote files that a new push replaces: a file matching these and absent locally is deleted
STALE_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json", "llmpress_*")
#: class names (anywhere in the MRO) of connection errors of httpx, httpcore and requests
_TRANSPORT_ERRORS = {
    "TransportError",
    "NetworkError",
    "TimeoutException",
    "RemoteProtocolError",
    "ConnectError",
    "ConnectionError",
    "ChunkedEncodingError",
    "Timeout",
}
_CONNECT_ERRORS = {"ConnectError", "ConnectTimeout", "ConnectionRefusedError"}
_WEIGHT_FILES = ("*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json", "config.json")


# ------------------------------------------------------------------------------ errors


def _chain(err: BaseException) -> Iterator[BaseException]:
    """``err`` then its causes: ``__cause__``, and ``__context__`` unless suppressed (no cycles)."""
    seen: set[int] = set()
    todo = [err]
    while todo:
        e = todo.pop(0)
        if id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [c for c in (e.__cause__, None if e.__suppress_context__ else e.__context__) if c is not None]


#: how ``hf_xet`` (reqwest) words an HTTP answer in the ``ConnectionError`` it raises:
#: "... HTTP status client error (404 NOT FOUND), domain: http://host/api/..."
_XET_HTTP = re.compile(r"HTTP status (?:client|server) error \((\d{3})[^)]*\)(?:, (?:domain|url): (\S+))?")
#: the Hub's endpoint that hands out Xet (CAS) tokens
_XET_TOKEN = re.compile(r"/xet-(?:read|write)-token(?:/|$)")


def _own_status(err: BaseException) -> int | None:
    response = getattr(err, "response", None)
    status = getattr(response, "status_code", None)
    if status is None and (match := _XET_HTTP.search(str(err))):
        return int(match.group(1))
    return status if isinstance(status, int) else None


def _url(err: BaseException) -> str | None:
    """The URL of the request that ``err`` answered, when known."""
    root = _root_cause(err) or err
    if (match := _XET_HTTP.search(str(root))) and match.group(2):
        return match.group(2).rstrip(".,;")
    response = getattr(root, "response", None)
    url = getattr(response, "url", None) or getattr(getattr(response, "request", None), "url", None)
    return str(url) if url else None


def _is_own_transport(err: BaseException) -> bool:
    return isinstance(err, (ConnectionError, TimeoutError)) or any(
        c.__name__ in _TRANSPORT_ERRORS for c in type(err).__mro__
    )


def _root_cause(err: BaseException) -> BaseException | None:
    """The HTTP or connection error behind ``err`` (``huggingface_hub`` wraps some, e.g. failed LFS
    uploads in a ``RuntimeError``); ``None`` when there is none."""
    return next((e for e in _chain(err) if _own_status(e) is not None or _is_own_transport(e)), None)


def _status(err: BaseException) -> int | None:
    root = _root_cause(err)
    return _own_status(root) if root is not None else None


def _is_transport(err: BaseException) -> bool:
    root = _root_cause(err)
    return root is not None and _own_status(root) is None


def _transient(err: BaseException) -> bool:
    status = _status(err)
    return _is_transport(err) or (status is not None and (status == 429 or status >= 500))


def _scrub(text: str, token: str | None) -> str:
    return text.replace(token, "***") if token else text


def _connection_failure(err: BaseException, endpoint: str) -> str:
    root = _root_cause(err) or err
    name = type(root).__name__
    if any(c.__name__ in _CONNECT_ERRORS for c in type(root).__mro__):
        return f"cannot reach {endpoint} ({name})"
    return f"the connection to {endpoint} dropped ({name}: {root})"


def _explain(
    err: BaseException, what: str, endpoint: str, repo_id: str, attempts: int, *, publishing: bool = True
) -> PublishError:
    """A :class:`PublishError` that says what failed, why, and what to do."""
    root = _root_cause(err) or err
    status = _status(err)
    server = getattr(root, "server_message", None) or ""
    detail = f": {server}" if server else ""
    rerun = (
        "Nothing was published: a Hub commit is atomic, so the repo still holds its previous version; "
        "re-running the same command resumes the upload (files already uploaded through LFS are skipped)."
        if publishing
        else "re-run the same command to retry."
    )
    if _is_transport(err):
        msg = f"{what}: {_connection_failure(err, endpoint)} after {attempts} attempt(s). {rerun}"
    elif status == 401:
        msg = (
            f"{what}: authentication failed at {endpoint} (HTTP 401){detail}. The token was rejected: pass a "
            "valid write token with --token / token= or set HF_TOKEN."
        )
    elif status == 403:
        msg = f"{what}: the token may not write to {repo_id!r} (HTTP 403){detail}. Use a token of its owner or organization."
    elif status == 404:
        url = _url(err) or endpoint
        msg = f"{what}: the Hub answered 404 Not Found for {url}{detail}. "
        if _XET_TOKEN.search(url):
            msg += (
                "The server gives no Xet upload token for this repo: it has no Xet storage (a self-hosted or "
                "older Hub) or the revision does not exist. Set HF_HUB_DISABLE_XET=1 so that huggingface_hub "
                "uploads through Git LFS instead."
            )
        else:
            msg += f"Check that {repo_id!r} exists at {endpoint} and that the token can see it."
    elif status is not None and (status == 429 or status >= 500):
        msg = (
            f"{what}: server error HTTP {status} from {endpoint} after {attempts} attempt(s){detail}. {rerun}"
        )
    elif status is not None:
        at = _url(err)
        msg = f"{what}: the Hub rejected the request (HTTP {status}{f' for {at}' if at else ''}){detail}."
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

    HTTP and network errors, raised directly or as the cause of another exception, become a
    :class:`PublishError`; anything else propagates as is.
    """
    attempts = max(1, retries)

    def announce(state: RetryCallState) -> None:
        e = state.outcome.exception() if state.outcome is not None else None
        if e is None:
            return
        status = _status(e)
        reason = f"HTTP {status}" if status is not None else type(_root_cause(e)).__name__
        wait = state.next_action.sleep if state.next_action is not None else 0.0
        log.warning(
            "%s failed (%s); retry %d/%d in %.1fs", what, reason, state.attempt_number, attempts - 1, wait
        )

    retrying = Retrying(
        retry=retry_if_exception(lambda e: _root_cause(e) is not None and _transient(e)),
        stop=stop_after_attempt(attempts),
        wait=wait_exponential(multiplier=backoff, exp_base=2, min=backoff),  # backoff, 2x, 4x ...
        before_sleep=announce,
        reraise=True,
    )
    try:
        return retrying(fn)
    except Exception as e:
        if _root_cause(e) is None:
            raise
        tried = retrying.statistics.get("attempt_number", 1)
        raise PublishError(_scrub(str(_explain(e, what, endpoint, repo_id, tried)), token)) from e


# -------------------------------------------------------------------------------- push


def _local_files(folder: Path) -> dict[str, Path]:
    """Repo path -> file, skipping hidden files and folders (``.cache``, temporary files)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if p.is_file() and not any(part.startswith(".") for part in rel.parts):
            out[rel.as_posix()] = p
    return out


def _shards(index: Path) -> set[str]:
    """The shard files a ``*.index.json`` maps weights to."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map") or {}
    except (ValueError, AttributeError) as e:
        raise PublishError(
            f"{index} is not a valid sharded-checkpoint index ({e}); nothing was published"
        ) from None
    return {str(v) for v in weight_map.values()}


def _check_folder(folder: Path) -> None:
    """Refuse a folder that is not a saved model with its weights."""
    if not (folder / "config.json").is_file():
        raise PublishError(
            f"{folder} is not a saved model folder (no config.json); save it with save_compressed first"
        )
    _check_weights(folder)


def _check_weights(folder: Path) -> None:
    """Refuse a folder without weights: a ``*.safetensors`` (or ``*.bin``) file, or sharded
    indexes whose shards are all present."""
    indexes = sorted(folder.glob("*.safetensors.index.json")) + sorted(folder.glob("*.bin.index.json"))
    for index in indexes:
        shards = _shards(index)
        missing = sorted(s for s in shards if not (folder / s).is_file())
        if missing or not shards:
            listed = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
            raise PublishError(
                f"{folder}: the sharded index {index.name} lists "
                f"{f'missing shard(s) {listed}' if missing else 'no shard'}; nothing was published. "
                "Save the model again (save_compressed / `llmpress compress`) so that every shard is written."
            )
    if indexes or any(folder.glob("*.safetensors")) or any(folder.glob("*.bin")):
        return
    raise PublishError(
        f"{folder} holds no weights (no *.safetensors or *.bin file, nor a sharded index whose shards are "
        "all present); nothing was published. Save the model into it first (save_compressed / "
        "`llmpress compress`)."
    )


def _card_metadata(card: Any) -> dict[str, Any]:
    """The YAML metadata block of a card (a ``ModelCard`` or Markdown text); empty when there is none."""
    import yaml

    text = card if isinstance(card, str) else str(card)
    match = re.match(r"^\s*---\r?\n(.*?)\r?\n---", text, re.DOTALL)
    if match is None:
        return {}
    try:
        meta = yaml.safe_load(match.group(1))
    except yaml.YAMLError as e:
        raise PublishError(
            f"the model card's metadata is not valid YAML ({e}); nothing was published"
        ) from None
    return meta if isinstance(meta, dict) else {}


def _not_finite(value: Any) -> bool:
    """Whether a metric value is a NaN/infinite number (or a string such as ``"NaN"`` or ``".inf"``)."""
    if isinstance(value, bool):
        return False
    if isinstance(value, str):  # "NaN", "inf", or YAML's ".nan" / "-.inf" quoted
        try:
            value = float(value.strip().lstrip("+-").lstrip("."))
        except ValueError:
            return False
    return isinstance(value, (int, float)) and not math.isfinite(value)


def _dicts(value: Any) -> list[dict[str, Any]]:
    """The dicts of a YAML list (anything else: none)."""
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def _model_index_metrics(meta: dict[str, Any]) -> Iterator[tuple[str, str, Any]]:
    """``(task, metric, value)`` of every metric in the card's ``model-index``."""
    for entry in _dicts(meta.get("model-index")):
        for result in _dicts(entry.get("results")):
            dataset, task = (
                d if isinstance(d, dict) else {} for d in (result.get("dataset"), result.get("task"))
            )
            name = dataset.get("name") or dataset.get("type") or task.get("name") or task.get("type") or "?"
            for m in _dicts(result.get("metrics")):
                yield str(name), str(m.get("type") or m.get("name") or "?"), m.get("value")


def _check_card_results(card: Any) -> None:
    """Refuse a card whose ``model-index`` holds a NaN or infinite metric value, naming each one."""
    metrics = _model_index_metrics(_card_metadata(card))
    bad = [f"{task} {metric} = {value}" for task, metric, value in metrics if _not_finite(value)]
    if bad:
        raise PublishError(
            f"the model card's evaluation results (model-index) hold non-finite value(s): {', '.join(bad)}; "
            "nothing was published. The model produced NaN/inf when it was evaluated: check the checkpoint "
            "and the dtype, re-run `llmpress eval`, and remove the bad entries from llmpress_eval.json."
        )


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
    :param base_model: Hub id of the dense model, for the card (metadata, size, license); a local
        folder gives its size and license, and ``base_model`` metadata only when it is a snapshot
        of the Hugging Face cache (the metadata must be a repo id).
    :param retries: attempts per request on transient errors; ``backoff`` is the first wait (s).
    :returns: the ``huggingface_hub.CommitInfo`` of the commit (``.repo_url``, ``.oid``).
    :raises PublishError: with the cause (authentication, repo name, server, network) and the fix;
        also, before anything is sent, for a folder without weights or a card whose ``model-index``
        holds NaN/inf.
    """
    from huggingface_hub import HfApi, constants

    from llmpress.hub.card import build_card, write_card

    folder = Path(folder)
    _check_folder(folder)
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
    _check_card_results(card)
    write_card(folder, card)

    return _commit_folder(
        api,
        call,
        folder,
        repo_id,
        private=private,
        revision=revision,
        commit_message=commit_message,
        commit_description=commit_description,
        create_pr=create_pr,
    )


def _commit_folder(
    api: Any,
    call: Callable[[str, Callable[[], Any]], Any],
    folder: Path,
    repo_id: str,
    *,
    private: bool | None,
    revision: str | None,
    commit_message: str | None,
    commit_description: str | None,
    create_pr: bool,
) -> Any:
    """Create the repo (and branch) if needed and upload ``folder`` in one commit, deleting the
    remote weight and llmpress files it no longer has; ``call`` runs each request with retries."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, constants

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

    from llmpress.format.loading import load_model

    _validate_repo_id(repo_id)
    try:
        path = snapshot_download(
            repo_id, revision=revision, token=token, endpoint=endpoint, local_dir=local_dir
        )
    except (HfHubHTTPError, OSError) as e:
        raise PublishError(
            _scrub(str(_explain(e, "download", endpoint or "the Hub", repo_id, 1, publishing=False)), token)
        ) from None
    return load_model(path, dtype=dtype, device=device)


# ---------------------------------------------------------------------------- push_model


def _fill_folder(tmp: Path, source: Path | None, report: CompressionReport | None, tokenizer: Any) -> None:
    """Add to a folder the model's ``save_pretrained`` wrote: the files of the saved ``source``
    folder but weights and card (tokenizer, llmpress_*.json...), the tokenizer and the report."""
    from llmpress.format.save import RECIPE_FILE, REPORT_FILE

    if source is not None:
        for name, p in _local_files(source).items():
            skip = any(fnmatch.fnmatch(name, pat) for pat in _WEIGHT_FILES) or name in ("README.md",)
            if not skip and not (tmp / name).exists():
                (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(p, tmp / name)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    if report is not None:
        report.write(tmp / REPORT_FILE)
        (tmp / RECIPE_FILE).write_text(json.dumps(report.recipe, indent=2))


def push_model(
    model: Any,
    repo_id: str,
    result: CompressionReport | None = None,
    *,
    source: str | Path | None = None,
    tokenizer: Any = None,
    max_shard_size: int | str = "50GB",
    template: str | Path = "default",
    base_model: str | None = None,
    license: str | None = None,
    tags: Sequence[str] = (),
    private: bool | None = None,
    token: str | None = None,
    endpoint: str | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    commit_description: str | None = None,
    create_pr: bool = False,
    retries: int = DEFAULT_RETRIES,
    backoff: float = 1.0,
) -> Any:
    """Publish an in-memory compressed model with llmpress's card, in one commit (the explicit
    counterpart of transformers' ``model.push_to_hub``, which uploads a generic card).

    The model is saved with its own ``save_pretrained`` into a temporary folder, completed with
    the files of the saved ``source`` folder (tokenizer, llmpress_*.json; not its weights or
    card), ``tokenizer`` and ``result`` (the run's report), then published through :func:`push`,
    whose other arguments these are. The model is not changed.

    :returns: the ``huggingface_hub.CommitInfo`` of the commit.
    :raises PublishError: ``source`` is not a saved model folder, or as :func:`push`.
    """
    src = Path(source) if source is not None else None
    if src is not None and not (src / "config.json").is_file():
        raise PublishError(f"push_model: {src} is not a saved model folder (no config.json)")
    with tempfile.TemporaryDirectory(prefix="llmpress-push-") as d:
        tmp = Path(d)
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
        _fill_folder(tmp, src, result, tokenizer)
        return push(
            tmp,
            repo_id,
            private=private,
            token=token,
            endpoint=endpoint,
            revision=revision,
            template=template,
            base_model=base_model,
            license=license,
            tags=tags,
            commit_message=commit_message,
            commit_description=commit_description,
            create_pr=create_pr,
            retries=retries,
            backoff=backoff,
        )
