"""A local, Hugging Face Hub-compatible HTTP server for tests.

It implements the subset of the Hub HTTP API that ``huggingface_hub`` (with Xet disabled) and
``transformers`` use to create repos, upload (regular and LFS files), list and download files::

    with LocalHubServer(tmp_path) as hub:
        api = HfApi(endpoint=hub.url)
        api.create_repo("alice/tiny")
        api.upload_folder(repo_id="alice/tiny", folder_path="out/")

To make the module-level helpers (``hf_hub_download``, ``snapshot_download``,
``transformers``'s ``from_pretrained``/``push_to_hub``...) talk to it, use the ``local_hub``
pytest fixture of :mod:`llmpress.hub.testing`, which also patches ``huggingface_hub``'s cached
constants.

Command line::

    python -m llmpress.hub.local_server --host 127.0.0.1 --port 0 --root /tmp/hub
"""

from __future__ import annotations

import contextlib
import logging
import socket
import socketserver
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any

from ._local_http import Request, Response, error_response
from ._local_routes import HubRoutes
from ._local_store import DEFAULT_LFS_THRESHOLD, HubError, LocalStore

logger = logging.getLogger(__name__)

DEFAULT_USER = "local-user"
"""User name of every request when the server is created without ``tokens``."""

__all__ = ["DEFAULT_USER", "FailureRule", "LocalHubServer", "RequestRecord"]


@dataclass(frozen=True)
class RequestRecord:
    """One request handled by the server (see :attr:`LocalHubServer.request_log`)."""

    method: str
    path: str
    status: int


@dataclass
class FailureRule:
    """A pending simulated failure (see :meth:`LocalHubServer.fail_next`)."""

    remaining: int
    status: int
    paths_containing: str | None
    method: str | None

    def matches(self, method: str, path: str) -> bool:
        return (
            self.remaining > 0
            and (self.method is None or self.method.upper() == method)
            and (self.paths_containing is None or self.paths_containing in path)
        )


class _HubHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128  # snapshot_download & co open many connections at once
    hub: LocalHubServer

    def server_bind(self) -> None:
        # Skip HTTPServer.server_bind's reverse DNS lookup (socket.getfqdn), which can be slow.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _HubHTTPServer

    def setup(self) -> None:
        super().setup()
        self.server.hub._track_connection(self.connection, add=True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.hub._track_connection(self.connection, add=False)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        logger.debug("%s - %s", self.address_string(), format % args)

    def _handle(self) -> None:
        hub = self.server.hub
        request = Request(self)
        try:
            response = hub._dispatch(request)
        except HubError as err:
            response = error_response(err)
        except Exception:  # pragma: no cover - defensive: never kill the connection thread silently
            logger.exception("Local Hub: unhandled error on %s %s", request.method, request.path)
            response = error_response(HubError(500, "Internal server error"))
        try:
            request.drain()
        except Exception:
            self.close_connection = True
        hub._record(RequestRecord(request.method, request.path, response.status))
        try:
            self._send(response, head_only=request.method == "HEAD")
        except (BrokenPipeError, ConnectionResetError):
            logger.debug("Local Hub: client went away during %s %s", request.method, request.path)
            self.close_connection = True

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = _handle

    def _send(self, response: Response, head_only: bool) -> None:
        self.send_response(response.status)
        length = response.length
        for key, value in response.headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(length))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if head_only or length == 0:
            return
        if response.file is None:
            self.wfile.write(response.body)
            return
        start, remaining = response.file_range or (0, length)
        with response.file.open("rb") as f:
            f.seek(start)
            while remaining > 0:
                data = f.read(min(remaining, 1 << 20))
                if not data:
                    break
                self.wfile.write(data)
                remaining -= len(data)


class LocalHubServer:
    """A local Hugging Face Hub-compatible HTTP server (stdlib ``ThreadingHTTPServer``).

    Args:
        root: directory holding the repos (``root/{type}s/{namespace}/{name}/``) and blobs.
        host: interface to bind.
        port: port to bind; ``0`` picks a free port (kept across :meth:`stop`/:meth:`start`).
        tokens: ``token -> username``. If ``None``, any (or no) token is accepted and every request is
            made by :data:`DEFAULT_USER`, with no permission checks. If given, writes and private repos
            require ``Authorization: Bearer <token>`` with a known token (401 otherwise), a user may only
            write to (and read private repos of) its own namespace (403 / 404 otherwise).
        lfs_threshold: files at least this large are uploaded through LFS (besides ``.gitattributes``
            patterns such as ``*.safetensors`` and binary files).

    Attributes:
        store: the :class:`~llmpress.hub._local_store.LocalStore` holding repos, commits and blobs
            (handy to inspect the server state in tests).
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
        self._root = Path(root).resolve()
        self.host = host
        self.port = port
        self.tokens = dict(tokens) if tokens is not None else None
        self.store = LocalStore(self._root, lfs_threshold=lfs_threshold)
        self._routes = HubRoutes(self.store, self._user_for, enforce_permissions=self.tokens is not None)
        self._httpd: _HubHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._failures: list[FailureRule] = []
        self._log: list[RequestRecord] = []
        self._connections: set[socket.socket] = set()

    # ----------------------------------------------------------- public API
    @property
    def root(self) -> Path:
        """Storage directory of the server."""
        return self._root

    @property
    def url(self) -> str:
        """Base URL of the running server, e.g. ``http://127.0.0.1:54321`` (to use as ``HF_ENDPOINT``)."""
        if self._httpd is None:
            raise RuntimeError("LocalHubServer is not running: call start() first.")
        host = "127.0.0.1" if self.host in ("", "0.0.0.0") else self.host
        return f"http://{host}:{self.port}"

    @property
    def running(self) -> bool:
        """Whether the server is currently serving."""
        return self._httpd is not None

    def start(self) -> LocalHubServer:
        """Bind and serve in a background thread; returns ``self``. No-op if already running."""
        if self._httpd is not None:
            return self
        httpd = _HubHTTPServer((self.host, self.port), _Handler)
        httpd.hub = self
        self.port = httpd.server_address[1]  # keep the port across restarts
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever,
            kwargs={"poll_interval": 0.1},
            name=f"local-hub-{self.port}",
            daemon=True,
        )
        self._thread.start()
        logger.info("Local Hub serving %s on %s", self._root, self.url)
        return self

    def stop(self) -> None:
        """Stop serving and close open client connections. The data on disk is kept."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.shutdown()
        httpd.server_close()
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        logger.info("Local Hub on port %s stopped", self.port)

    def __enter__(self) -> LocalHubServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def fail_next(
        self, n: int = 1, status: int = 500, paths_containing: str | None = None, method: str | None = None
    ) -> None:
        """Make the next ``n`` matching requests fail with ``status`` (and the Hub's JSON error shape).

        Args:
            n: number of requests to fail.
            status: HTTP status to answer.
            paths_containing: only fail requests whose (URL-decoded) path contains this string,
                e.g. ``"/commit/"``, ``"/preupload/"``, ``"/info/lfs/objects/batch"``, ``"/__lfs__/upload/"``
                or ``"/resolve/"``.
            method: only fail requests with this HTTP method.

        Note that ``huggingface_hub`` retries 5xx answers of some endpoints (preupload, LFS batch and
        upload, downloads) with an exponential backoff (1 s, 2 s, 4 s...), while the ``/commit/``
        endpoint is never retried.
        """
        if n < 0:
            raise ValueError("n must be >= 0")
        with self._lock:
            self._failures.append(FailureRule(n, status, paths_containing, method))

    def clear_failures(self) -> None:
        """Forget the pending :meth:`fail_next` rules."""
        with self._lock:
            self._failures.clear()

    @property
    def request_log(self) -> list[RequestRecord]:
        """Copy of the list of handled requests, oldest first."""
        with self._lock:
            return list(self._log)

    def clear_request_log(self) -> None:
        """Empty :attr:`request_log`."""
        with self._lock:
            self._log.clear()

    # ------------------------------------------------------------- internals
    def _track_connection(self, conn: socket.socket, add: bool) -> None:
        with self._lock:
            if add:
                self._connections.add(conn)
            else:
                self._connections.discard(conn)

    def _record(self, record: RequestRecord) -> None:
        with self._lock:
            self._log.append(record)
        logger.debug("Local Hub: %s %s -> %s", record.method, record.path, record.status)

    def _take_failure(self, request: Request) -> FailureRule | None:
        with self._lock:
            for rule in self._failures:
                if rule.matches(request.method, request.path):
                    rule.remaining -= 1
                    return rule
        return None

    def _user_for(self, request: Request) -> str | None:
        """User making ``request`` (None if anonymous); 401 for an unknown token."""
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

    def _dispatch(self, request: Request) -> Response:
        rule = self._take_failure(request)
        if rule is not None:
            logger.info(
                "Local Hub: simulated failure %s for %s %s", rule.status, request.method, request.path
            )
            return error_response(HubError(rule.status, f"Simulated failure (fail_next) on {request.path}"))
        return self._routes.dispatch(request)


if __name__ == "__main__":
    from llmpress.hub.cli import local_server_main

    local_server_main()
