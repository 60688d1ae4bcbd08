"""HTTP plumbing of :mod:`llmpress.hub.local_server`: requests, responses and the Hub error shape."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from ._local_store import HubError

_JSON = "application/json; charset=utf-8"
LFS_JSON = "application/vnd.git-lfs+json"
_RANGE_RE = re.compile(r"bytes=(\d*)-(\d*)")


class Request:
    """An incoming HTTP request, with a lazily read body (``Content-Length`` or chunked)."""

    def __init__(self, handler: BaseHTTPRequestHandler):
        self._handler = handler
        self.method = handler.command
        split = urlsplit(handler.path)
        self.path = unquote(split.path)
        self.query = parse_qs(split.query, keep_blank_values=True)
        segments = [unquote(segment) for segment in split.path.split("/")[1:]]
        while segments and segments[-1] == "":
            segments.pop()
        self.segments = segments
        self.headers = handler.headers
        self._body_started = False

    @property
    def base_url(self) -> str:
        """Public URL of the server as seen by the client (from the ``Host`` header)."""
        host = self.headers.get("Host")
        if not host:
            address: Any = self._handler.server.server_address
            host = f"{address[0]}:{address[1]}"
        return f"http://{host}"

    def flag(self, name: str) -> bool:
        """Whether query parameter ``name`` is set to a truthy value."""
        values = self.query.get(name) or [""]
        return values[-1].lower() in ("1", "true", "yes")

    def iter_body(self, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        """Stream the request body (can only be consumed once)."""
        if self._body_started:
            return
        self._body_started = True
        rfile = self._handler.rfile
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            while True:
                line = rfile.readline(65537)
                if not line:
                    raise HubError(400, "Truncated chunked body")
                try:
                    size = int(line.split(b";", 1)[0].strip(), 16)
                except ValueError:
                    raise HubError(400, "Malformed chunked body") from None
                if size == 0:
                    while rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return
                remaining = size
                while remaining > 0:
                    data = rfile.read(min(remaining, chunk_size))
                    if not data:
                        raise HubError(400, "Truncated chunked body")
                    remaining -= len(data)
                    yield data
                rfile.readline()  # CRLF closing the chunk
        else:
            try:
                remaining = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                raise HubError(400, "Invalid Content-Length") from None
            while remaining > 0:
                data = rfile.read(min(remaining, chunk_size))
                if not data:
                    raise HubError(400, "Truncated body")
                remaining -= len(data)
                yield data

    def body(self) -> bytes:
        """The whole request body."""
        return b"".join(self.iter_body())

    def drain(self) -> None:
        """Consume whatever is left of the body so the connection can be reused."""
        for _ in self.iter_body():
            pass


@dataclass
class Response:
    """An HTTP response: either an in-memory ``body`` or (a range of) a ``file``."""

    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    file: Path | None = None
    file_range: tuple[int, int] | None = None  # (start, length)
    file_size: int = 0

    @property
    def length(self) -> int:
        if self.file is None:
            return len(self.body)
        return self.file_range[1] if self.file_range is not None else self.file_size


def json_response(
    data: Any, status: int = 200, headers: Mapping[str, str] | None = None, ctype: str = _JSON
) -> Response:
    """A JSON response."""
    return Response(status, {"Content-Type": ctype, **(headers or {})}, json.dumps(data).encode())


def header_safe(text: str) -> str:
    """Make ``text`` usable as an HTTP header value (single line, ASCII)."""
    return text.replace("\r", " ").replace("\n", " ").encode("ascii", "backslashreplace").decode("ascii")


def error_response(err: HubError) -> Response:
    """The Hub's error shape: ``{"error": msg}`` body plus ``X-Error-Message``/``X-Error-Code`` headers."""
    headers = {"X-Error-Message": header_safe(err.message), **err.headers}
    if err.code:
        headers["X-Error-Code"] = err.code
    return json_response({"error": err.message, **err.extra}, err.status, headers)


def json_body(request: Request, default: dict[str, Any] | None = None) -> dict[str, Any]:
    """Parse the JSON object in the body of ``request`` (400 if invalid; ``default`` if empty and given)."""
    raw = request.body()
    if not raw.strip():
        if default is not None:
            return default
        raise HubError(400, "Expected a JSON body")
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise HubError(400, f"Invalid JSON body: {err}") from None
    if not isinstance(data, dict):
        raise HubError(400, "Expected a JSON object")
    return data


def file_response(request: Request, path: Path, headers: dict[str, str]) -> Response:
    """Serve ``path``, honoring a single ``Range: bytes=...`` header (206/416)."""
    size = path.stat().st_size
    headers = {"Accept-Ranges": "bytes", **headers}
    range_header = request.headers.get("Range")
    match = _RANGE_RE.fullmatch(range_header.strip()) if range_header else None
    if match is None or (not match.group(1) and not match.group(2)):
        return Response(200, headers, file=path, file_size=size)
    start_s, end_s = match.groups()
    if start_s:
        start, end = int(start_s), min(int(end_s), size - 1) if end_s else size - 1
    else:  # suffix range: last N bytes
        start, end = max(size - int(end_s), 0), size - 1
    if start >= size or start > end:
        error = error_response(HubError(416, "Requested range not satisfiable"))
        error.headers["Content-Range"] = f"bytes */{size}"
        return error
    headers["Content-Range"] = f"bytes {start}-{end}/{size}"
    return Response(206, headers, file=path, file_range=(start, end - start + 1), file_size=size)
