"""A local, Hugging Face Hub-compatible HTTP server for tests, served by werkzeug.

::

    with LocalHubServer(tmp_path) as hub:
        api = HfApi(endpoint=hub.url)
        api.create_repo("alice/tiny")
        api.upload_folder(repo_id="alice/tiny", folder_path="out/")

``huggingface_hub`` reads ``HF_ENDPOINT`` once, when it is imported; the pytest plugin
(:mod:`localhub.plugin`) starts one server per test process before that and exports its URL.
"""

from __future__ import annotations

import logging
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from werkzeug.exceptions import HTTPException
from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server
from werkzeug.wrappers import Request, Response

from .objects import HubError
from .routes import HubRoutes, json_response
from .store import DEFAULT_LFS_THRESHOLD, LocalStore

logger = logging.getLogger(__name__)

DEFAULT_USER = "local-user"
"""The user making every request of a server created without ``tokens``."""


@dataclass(frozen=True)
class RequestRecord:
    """One request handled by the server (see :attr:`LocalHubServer.request_log`)."""

    method: str
    path: str
    status: int


@dataclass
class FailureRule:
    """A pending injected failure (see :meth:`LocalHubServer.fail_next`)."""

    remaining: int
    status: int
    paths_containing: str | None
    method: str | None
    crash: bool

    def matches(self, method: str, path: str) -> bool:
        return (
            self.remaining > 0
            and (self.method is None or self.method.upper() == method)
            and (self.paths_containing is None or self.paths_containing in path)
        )


class _Handler(WSGIRequestHandler):
    """werkzeug's request handler, logging through :mod:`logging` at debug level."""

    def log(self, type: str, message: str, *args: Any) -> None:  # noqa: A002 - werkzeug's signature
        logger.debug("%s: " + message.rstrip(), type, *args)


def error_response(err: HubError) -> Response:
    """The Hub's error shape: ``{"error": msg}`` plus ``X-Error-Message`` / ``X-Error-Code`` headers."""
    message = err.message.replace("\r", " ").replace("\n", " ")
    headers = {"X-Error-Message": message.encode("ascii", "backslashreplace").decode(), **err.headers}
    if err.code:
        headers["X-Error-Code"] = err.code
    return json_response({"error": err.message, **err.extra}, err.status, headers)


class LocalHubServer:
    """A local Hugging Face Hub-compatible HTTP server (werkzeug, one thread per request).

    Args:
        root: directory holding the repos and blobs (see :mod:`localhub.store`).
        host: interface to bind.
        port: port to bind; ``0`` picks a free port, kept across :meth:`stop` and :meth:`start`.
        tokens: ``token -> username``. If ``None``, every request is made by :data:`DEFAULT_USER`
            with no permission checks. If given, writes and private repos need
            ``Authorization: Bearer <token>`` with a known token (401 otherwise), and a user only
            writes to (and reads private repos of) its own namespace (403 / 404 otherwise).
        lfs_threshold: files at least this large are uploaded through LFS (besides
            ``.gitattributes`` patterns such as ``*.safetensors`` and binary files).

    Attributes:
        store: the :class:`~localhub.store.LocalStore` holding repos, commits and blobs.
    """

    def __init__(
        self,
        root: Path,
        host: str = "127.0.0.1",
        port: int = 0,
        tokens: dict[str, str] | None = None,
        *,
        lfs_threshold: int = DEFAULT_LFS_THRESHOLD,
    ):
        self.host = host
        self.port = port
        self._lock = threading.Lock()
        self._httpd: BaseWSGIServer | None = None
        self._thread: threading.Thread | None = None
        self.reset(root, tokens, lfs_threshold=lfs_threshold)

    def reset(
        self, root: Path, tokens: dict[str, str] | None = None, *, lfs_threshold: int = DEFAULT_LFS_THRESHOLD
    ) -> LocalHubServer:
        """Serve the storage at ``root`` with ``tokens`` from now on; forget failures and the request log."""
        with self._lock:
            self.tokens = dict(tokens) if tokens is not None else None
            self.store = LocalStore(Path(root), lfs_threshold=lfs_threshold)
            self._routes = HubRoutes(self.store, self._user_for, enforce_permissions=self.tokens is not None)
            self._failures: list[FailureRule] = []
            self._log: list[RequestRecord] = []
        return self

    # ------------------------------------------------------------- lifecycle
    @property
    def root(self) -> Path:
        """Storage directory of the server."""
        return self.store.root

    @property
    def url(self) -> str:
        """Base URL of the running server, e.g. ``http://127.0.0.1:54321``."""
        if self._httpd is None:
            raise RuntimeError("LocalHubServer is not running: call start() first.")
        host = "127.0.0.1" if self.host in ("", "0.0.0.0") else self.host
        return f"http://{host}:{self.port}"

    @property
    def running(self) -> bool:
        """Whether the server is serving."""
        return self._httpd is not None

    def start(self) -> LocalHubServer:
        """Bind and serve in a background thread; returns ``self``. No-op if already running."""
        if self._httpd is not None:
            return self
        try:
            httpd = make_server(self.host, self.port, self._wsgi, threaded=True, request_handler=_Handler)
        except SystemExit:  # werkzeug exits when the port is taken
            raise OSError(f"cannot bind the local Hub to {self.host}:{self.port}") from None
        self.port = httpd.server_port
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever, name=f"local-hub-{self.port}", daemon=True
        )
        self._thread.start()
        logger.info("local Hub serving %s on %s", self.root, self.url)
        return self

    def stop(self) -> None:
        """Stop serving (connections are closed after each answer). The data on disk is kept."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.shutdown()
        httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        logger.info("local Hub on port %s stopped", self.port)

    def __enter__(self) -> LocalHubServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # ------------------------------------------------------ injected failures
    def fail_next(
        self,
        n: int = 1,
        status: int = 500,
        paths_containing: str | None = None,
        method: str | None = None,
        *,
        crash: bool = False,
    ) -> None:
        """Make the next ``n`` matching requests fail with ``status`` (in the Hub's error shape).

        Args:
            n: number of requests to fail.
            status: HTTP status to answer.
            paths_containing: only requests whose (URL-decoded) path contains this, e.g.
                ``"/commit/"``, ``"/preupload/"``, ``"/info/lfs/objects/batch"``, ``"/__lfs__/upload/"``.
            method: only requests with this HTTP method.
            crash: instead of answering, stop the server and drop the connection, as a server
                that dies mid-request; :meth:`start` brings it back with its data.

        ``huggingface_hub`` retries 5xx answers of some endpoints (preupload, LFS, downloads) with
        an exponential backoff, but never the ``/commit/`` endpoint.
        """
        if n < 0:
            raise ValueError("n must be >= 0")
        with self._lock:
            self._failures.append(FailureRule(n, status, paths_containing, method, crash))

    def clear_failures(self) -> None:
        """Forget the pending :meth:`fail_next` rules."""
        with self._lock:
            self._failures.clear()

    @property
    def request_log(self) -> list[RequestRecord]:
        """The handled requests, oldest first (a copy)."""
        with self._lock:
            return list(self._log)

    # -------------------------------------------------------------- internals
    def _take_failure(self, request: Request) -> FailureRule | None:
        with self._lock:
            for rule in self._failures:
                if rule.matches(request.method, request.path):
                    rule.remaining -= 1
                    return rule
        return None

    def _user_for(self, request: Request) -> str | None:
        """The user making ``request`` (None if anonymous); 401 for an unknown token."""
        if self.tokens is None:
            return DEFAULT_USER
        auth = request.headers.get("Authorization")
        if not auth:
            return None
        scheme, _, token = auth.partition(" ")
        user = self.tokens.get(token.strip()) if scheme.lower() == "bearer" else None
        if user is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        return user

    def _crash(self, request: Request) -> None:
        """Stop the server and drop the connection of ``request`` without an answer."""
        logger.info("injected crash on %s %s", request.method, request.path)
        stopper = threading.Thread(target=self.stop)  # shutdown() waits for serve_forever's thread
        stopper.start()
        stopper.join()
        request.environ["werkzeug.socket"].shutdown(socket.SHUT_RDWR)
        raise ConnectionAbortedError("local Hub crash injected by fail_next(crash=True)")

    def _respond(self, request: Request) -> Response:
        rule = self._take_failure(request)
        if rule is not None and rule.crash:
            self._crash(request)
        if rule is not None:
            logger.info("injected failure %s on %s %s", rule.status, request.method, request.path)
            return error_response(HubError(rule.status, f"Simulated failure (fail_next) on {request.path}"))
        try:
            return self._routes.dispatch(request)
        except HubError as err:
            return error_response(err)
        except HTTPException as exc:  # routing (404, 405) and Range (416) errors
            message = exc.description or exc.name
            if exc.code in (404, 405):
                logger.warning("local Hub: unsupported endpoint %s %s", request.method, request.path)
                message = f"{exc.name}: {request.method} {request.path} is not implemented by the local Hub"
            headers = {k: v for k, v in exc.get_headers() if k.lower() != "content-type"}
            return error_response(HubError(exc.code or 500, message, headers=headers))
        except Exception:
            logger.exception("local Hub: unhandled error on %s %s", request.method, request.path)
            return error_response(HubError(500, "Internal server error"))

    def _wsgi(self, environ: dict[str, Any], start_response: Any) -> Any:
        request = Request(environ)
        response = self._respond(request)
        with self._lock:
            self._log.append(RequestRecord(request.method, request.path, response.status_code))
        logger.debug("%s %s -> %s", request.method, request.path, response.status_code)
        return response(environ, start_response)
