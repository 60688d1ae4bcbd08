"""What the local Hub stores: repo ids, commits and file entries, plus the Hub's naming rules."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import PurePosixPath
from typing import Any

REPO_TYPES: dict[str, str] = {"models": "model", "datasets": "dataset"}
"""URL plural -> repo type."""

DEFAULT_BRANCH = "main"

_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,95}")
_BRANCH_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._/-]{0,199}")


class HubError(Exception):
    """An error answered to the client in the Hub's shape.

    Args:
        status: HTTP status code.
        message: human readable message (``{"error": message}`` body and ``X-Error-Message``).
        code: optional ``X-Error-Code`` (``RepoNotFound``, ``EntryNotFound``, ``RevisionNotFound``).
        headers: extra response headers (``X-Repo-Commit`` on ``EntryNotFound``).
        extra: extra fields of the JSON body (``url`` on a 409 from ``create_repo``).
    """

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = dict(headers or {})
        self.extra = dict(extra or {})


def now_iso() -> str:
    """Current UTC time in the Hub's ``%Y-%m-%dT%H:%M:%S.%fZ`` format (milliseconds)."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def git_blob_sha1(data: bytes) -> str:
    """Git object id of a blob (``git hash-object``)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    """Content of the git-lfs pointer file standing for an LFS object."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def validate_repo_part(value: str, what: str = "repo name") -> str:
    """Validate a namespace or repo name like the Hub does (400 otherwise)."""
    if (
        not _NAME_RE.fullmatch(value)
        or value.endswith(("-", "."))
        or "--" in value
        or ".." in value
        or value.endswith(".git")
    ):
        raise HubError(
            400,
            f"Invalid {what} '{value}': only ASCII letters, digits, '-', '_' and '.' are allowed; it cannot"
            " start or end with '-' or '.', contain '--' or '..', end with '.git' or be longer than 96"
            " characters.",
        )
    return value


def validate_branch_name(branch: str) -> str:
    """Validate a branch name (400 otherwise)."""
    if (
        not _BRANCH_RE.fullmatch(branch)
        or ".." in branch
        or "//" in branch
        or branch.endswith(("/", ".lock"))
    ):
        raise HubError(400, f"Invalid branch name '{branch}'.")
    return branch


def normalize_repo_path(path: str) -> str:
    """Validate a file path inside a repo: relative, '/'-separated, no ``.``/``..``/empty segments."""
    parts = path.split("/")
    if (
        not path
        or path.startswith("/")
        or "\\" in path
        or "\0" in path
        or any(part in ("", ".", "..") for part in parts)
        or parts[0] == ".git"
    ):
        raise HubError(400, f"Invalid path in repo: '{path}'.")
    return path


@dataclass(frozen=True)
class RepoRef:
    """Identifies a repo: ``(type, namespace, name)``."""

    type: str
    namespace: str
    name: str

    @property
    def repo_id(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def url_prefix(self) -> str:
        """Prefix of the repo's web URLs (``''`` for models, ``'datasets/'``)."""
        return "" if self.type == "model" else f"{self.type}s/"


@dataclass(frozen=True)
class RepoMeta:
    """Repo metadata stored in ``repo.json``."""

    ref: RepoRef
    private: bool
    created_at: str


@dataclass(frozen=True)
class FileEntry:
    """One file of a commit snapshot."""

    sha256: str
    size: int
    lfs: bool
    oid: str
    """Git object id: sha1 of the content for regular files, of the LFS pointer for LFS files."""

    @property
    def pointer_size(self) -> int:
        """Size of the LFS pointer file (only meaningful for LFS files)."""
        return len(lfs_pointer(self.sha256, self.size))

    @property
    def etag(self) -> str:
        """What the Hub uses as ETag: sha256 for LFS files, git sha1 for regular files."""
        return self.sha256 if self.lfs else self.oid

    def to_json(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "size": self.size, "lfs": self.lfs, "oid": self.oid}


@dataclass(frozen=True)
class Commit:
    """A commit: metadata plus the full snapshot of the tree (``path -> FileEntry``)."""

    id: str
    parents: list[str]
    title: str
    message: str
    author: str
    date: str
    files: dict[str, FileEntry] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        data = {k: getattr(self, k) for k in ("id", "parents", "title", "message", "author", "date")}
        data["files"] = {path: entry.to_json() for path, entry in sorted(self.files.items())}
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Commit:
        files = {path: FileEntry(**entry) for path, entry in data["files"].items()}
        return cls(
            data["id"], data["parents"], data["title"], data["message"], data["author"], data["date"], files
        )

    def directories(self) -> set[str]:
        """All folders holding at least one file (the root excluded)."""
        dirs: set[str] = set()
        for path in self.files:
            dirs.update(str(parent) for parent in PurePosixPath(path).parents if str(parent) != ".")
        return dirs

    def tree_oid(self, folder: str) -> str:
        """Deterministic pseudo git tree id of a folder."""
        prefix = folder + "/"
        listing = sorted((p, e.oid) for p, e in self.files.items() if p.startswith(prefix))
        return hashlib.sha1(json.dumps(listing).encode()).hexdigest()

    def tree(self, folder: str, recursive: bool) -> list[tuple[str, FileEntry | None]]:
        """Entries under ``folder`` (``''``: the root) as ``(path, entry)``; ``entry`` is None for folders."""
        prefix = folder.rstrip("/") + "/" if folder else ""
        dirs = sorted(d for d in self.directories() if d.startswith(prefix))
        files = sorted(p for p in self.files if p.startswith(prefix))
        if not recursive:
            dirs = [d for d in dirs if "/" not in d[len(prefix) :]]
            files = [p for p in files if "/" not in p[len(prefix) :]]
        return [(d, None) for d in dirs] + [(p, self.files[p]) for p in files]


@dataclass(frozen=True)
class AddFile:
    """Commit operation: add or replace ``path`` with the stored blob ``sha256``."""

    path: str
    sha256: str
    lfs: bool


@dataclass(frozen=True)
class DeleteFile:
    """Commit operation: delete the file ``path``."""

    path: str


CommitOp = AddFile | DeleteFile
