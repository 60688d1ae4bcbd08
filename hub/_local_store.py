"""On-disk storage backing :mod:`llmpress.hub.local_server`.

Layout under ``root``::

    blobs/<sha256[:2]>/<sha256>              content-addressed file contents (shared by all repos)
    <type>s/<namespace>/<name>/repo.json     repo metadata (id, type, private, createdAt)
    <type>s/<namespace>/<name>/refs.json     {"branches": {"main": <commit id>}, "tags": {}}
    <type>s/<namespace>/<name>/commits.jsonl one JSON commit per line, each a full snapshot of the tree

Every commit stores the complete ``path -> file entry`` mapping of the tree, so resolving a
revision never needs to replay history. File paths only live inside JSON documents: they never
become filesystem paths, and repo namespaces/names are validated against a strict pattern before
being used as directory names, so nothing can escape ``root``.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
import tempfile
import threading
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any

REPO_TYPES: dict[str, str] = {
    "models": "model",
    "datasets": "dataset",
    "spaces": "space",
    "kernels": "kernel",
}
"""URL plural -> repo type."""

DEFAULT_BRANCH = "main"
DEFAULT_LFS_THRESHOLD = 10 * 1024 * 1024
"""Files at least this large are uploaded through LFS (the Hub's limit for regular git files)."""

DEFAULT_GITATTRIBUTES = "".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text\n"
    for pattern in (
        "*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.ftz", "*.gz", "*.h5", "*.joblib",
        "*.lfs.*", "*.mlmodel", "*.model", "*.msgpack", "*.npy", "*.npz", "*.onnx", "*.ot",
        "*.parquet", "*.pb", "*.pickle", "*.pkl", "*.pt", "*.pth", "*.rar", "*.safetensors",
        "saved_model/**/*", "*.tar.*", "*.tar", "*.tflite", "*.tgz", "*.wasm", "*.xz", "*.zip",
        "*.zst", "*tfevents*", "*.gguf",
    )
)  # fmt: skip
"""Same LFS patterns as the ``.gitattributes`` the Hub puts in every new repo."""

_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,95}")
_HEX_RE = re.compile(r"[0-9a-f]{7,40}")
_BRANCH_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._/-]{0,199}")


class HubError(Exception):
    """An error answered to the client with the Hub's error shape.

    Args:
        status: HTTP status code.
        message: human readable message (``{"error": message}`` body and ``X-Error-Message``).
        code: optional ``X-Error-Code`` (``RepoNotFound``, ``EntryNotFound``, ``RevisionNotFound``...).
        headers: extra response headers (e.g. ``X-Repo-Commit`` on ``EntryNotFound``).
        extra: extra fields of the JSON body (e.g. ``url`` on a 409 from ``create_repo``).
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
    """Validate a namespace or repo name like the Hub does; raise a 400 :class:`HubError` otherwise."""
    if (
        not _NAME_RE.fullmatch(value)
        or value.endswith(("-", "."))
        or "--" in value
        or ".." in value
        or value.endswith(".git")
    ):
        raise HubError(
            400,
            f"Invalid {what} '{value}': only ASCII letters, digits, '-', '_' and '.' are allowed; it cannot start or"
            " end with '-' or '.', contain '--' or '..', end with '.git' or be longer than 96 characters.",
        )
    return value


def validate_branch_name(branch: str) -> str:
    """Validate a branch name (400 otherwise)."""
    if (
        not _BRANCH_RE.fullmatch(branch)
        or ".." in branch
        or branch.endswith(("/", ".lock"))
        or "//" in branch
    ):
        raise HubError(400, f"Invalid branch name '{branch}'.")
    return branch


def normalize_repo_path(path: str) -> str:
    """Validate a file path inside a repo: relative, '/'-separated, no ``.``/``..``/empty segments."""
    if not path or path.startswith("/") or "\\" in path or "\0" in path:
        raise HubError(400, f"Invalid path in repo: '{path}'.")
    parts = path.split("/")
    if any(part in ("", ".", "..") for part in parts) or parts[0] == ".git":
        raise HubError(400, f"Invalid path in repo: '{path}'.")
    return path


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
    """A commit: metadata plus the full snapshot of the tree."""

    id: str
    parents: list[str]
    title: str
    message: str
    author: str
    date: str
    files: dict[str, FileEntry] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "parents": self.parents,
            "title": self.title,
            "message": self.message,
            "author": self.author,
            "date": self.date,
            "files": {path: entry.to_json() for path, entry in sorted(self.files.items())},
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Commit:
        files = {path: FileEntry(**entry) for path, entry in data["files"].items()}
        return cls(
            data["id"], data["parents"], data["title"], data["message"], data["author"], data["date"], files
        )

    def directories(self) -> set[str]:
        """All folders containing at least one file (excluding the root)."""
        dirs: set[str] = set()
        for path in self.files:
            dirs.update(str(parent) for parent in PurePosixPath(path).parents if str(parent) != ".")
        return dirs

    def tree_oid(self, folder: str) -> str:
        """Deterministic pseudo git tree id of a folder."""
        prefix = folder + "/"
        listing = sorted((p, e.oid) for p, e in self.files.items() if p.startswith(prefix))
        return hashlib.sha1(json.dumps(listing).encode()).hexdigest()


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
        """Prefix used in web URLs (``''`` for models, ``'datasets/'``...)."""
        return "" if self.type == "model" else f"{self.type}s/"


@dataclass
class RepoMeta:
    """Repo metadata stored in ``repo.json``."""

    ref: RepoRef
    private: bool
    created_at: str


@dataclass(frozen=True)
class AddFile:
    """Commit operation: add or replace ``path`` with the blob ``sha256``."""

    path: str
    sha256: str
    lfs: bool


@dataclass(frozen=True)
class DeletePath:
    """Commit operation: delete a file, or a whole folder when ``folder`` is true."""

    path: str
    folder: bool = False


CommitOp = AddFile | DeletePath


class BlobStore:
    """Content-addressed storage of file contents, keyed by sha256."""

    def __init__(self, root: Path):
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        if not re.fullmatch(r"[0-9a-f]{64}", sha256):
            raise HubError(400, f"Invalid sha256 oid '{sha256}'.")
        return self.root / sha256[:2] / sha256

    def has(self, sha256: str, size: int | None = None) -> bool:
        path = self.path(sha256)
        return path.is_file() and (size is None or path.stat().st_size == size)

    def size(self, sha256: str) -> int:
        return self.path(sha256).stat().st_size

    def read(self, sha256: str) -> bytes:
        return self.path(sha256).read_bytes()

    def put_bytes(self, data: bytes) -> str:
        """Store ``data`` and return its sha256."""
        return self.put_stream([data])

    def put_stream(
        self, chunks: Iterable[bytes], expected_sha256: str | None = None, expected_size: int | None = None
    ) -> str:
        """Store a stream of chunks atomically, checking its sha256/size if expected values are given."""
        hasher = hashlib.sha256()
        size = 0
        fd, tmp_name = tempfile.mkstemp(dir=self.root, prefix=".incoming-")
        try:
            with os.fdopen(fd, "wb") as tmp:
                for chunk in chunks:
                    hasher.update(chunk)
                    size += len(chunk)
                    tmp.write(chunk)
            sha256 = hasher.hexdigest()
            if expected_sha256 is not None and sha256 != expected_sha256:
                raise HubError(400, f"Uploaded content has sha256 {sha256}, expected {expected_sha256}.")
            if expected_size is not None and size != expected_size:
                raise HubError(400, f"Uploaded content has size {size}, expected {expected_size}.")
            target = self.path(sha256)
            target.parent.mkdir(exist_ok=True)
            os.replace(tmp_name, target)
            return sha256
        finally:
            if os.path.exists(tmp_name):
                os.unlink(tmp_name)


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


class LocalStore:
    """Repos, branches and commits of the local Hub, persisted under ``root``.

    All mutating methods are serialized per repo with a lock, so the store can be shared by the
    threads of a :class:`~http.server.ThreadingHTTPServer`.
    """

    def __init__(self, root: Path, lfs_threshold: int = DEFAULT_LFS_THRESHOLD):
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.blobs = BlobStore(self.root / "blobs")
        self.lfs_threshold = lfs_threshold
        self._global_lock = threading.Lock()
        self._repo_locks: dict[RepoRef, threading.RLock] = {}

    # ----------------------------------------------------------------- helpers
    def _lock(self, ref: RepoRef) -> threading.RLock:
        with self._global_lock:
            return self._repo_locks.setdefault(ref, threading.RLock())

    def repo_dir(self, ref: RepoRef) -> Path:
        """Directory of a repo (namespace and name are validated first)."""
        if ref.type not in REPO_TYPES.values():
            raise HubError(400, f"Invalid repo type '{ref.type}'.")
        validate_repo_part(ref.namespace, "namespace")
        validate_repo_part(ref.name)
        return self.root / f"{ref.type}s" / ref.namespace / ref.name

    def _not_found(self, ref: RepoRef) -> HubError:
        return HubError(404, "Repository not found", code="RepoNotFound")

    # ------------------------------------------------------------------- repos
    def get_repo(self, ref: RepoRef) -> RepoMeta:
        """Metadata of an existing repo (404 ``RepoNotFound`` otherwise, also for invalid names)."""
        try:
            meta_path = self.repo_dir(ref) / "repo.json"
        except HubError:
            raise self._not_found(ref) from None
        if not meta_path.is_file():
            raise self._not_found(ref)
        data = json.loads(meta_path.read_text())
        return RepoMeta(ref=ref, private=bool(data["private"]), created_at=data["createdAt"])

    def create_repo(self, ref: RepoRef, private: bool, author: str) -> RepoMeta:
        """Create a repo with an initial commit holding the default ``.gitattributes`` (409 if it exists)."""
        repo_dir = self.repo_dir(ref)
        with self._lock(ref):
            if (repo_dir / "repo.json").is_file():
                raise HubError(409, f"You already created this {ref.type} repo")
            repo_dir.mkdir(parents=True, exist_ok=True)
            meta = RepoMeta(ref=ref, private=private, created_at=now_iso())
            sha = self.blobs.put_bytes(DEFAULT_GITATTRIBUTES.encode())
            entry = self._entry(sha, lfs=False)
            commit = self._new_commit([], "initial commit", "", author, {".gitattributes": entry})
            (repo_dir / "commits.jsonl").write_text(json.dumps(commit.to_json()) + "\n")
            _write_json_atomic(repo_dir / "refs.json", {"branches": {DEFAULT_BRANCH: commit.id}, "tags": {}})
            # repo.json last: its presence marks the repo as existing
            _write_json_atomic(
                repo_dir / "repo.json",
                {"id": ref.repo_id, "type": ref.type, "private": private, "createdAt": meta.created_at},
            )
            return meta

    def delete_repo(self, ref: RepoRef) -> None:
        """Delete a repo (blobs are kept: they are shared and content-addressed)."""
        self.get_repo(ref)
        repo_dir = self.repo_dir(ref)
        with self._lock(ref):
            for child in repo_dir.iterdir():
                child.unlink()
            repo_dir.rmdir()

    def set_private(self, ref: RepoRef, private: bool) -> None:
        """Change the visibility of a repo."""
        meta = self.get_repo(ref)
        with self._lock(ref):
            _write_json_atomic(
                self.repo_dir(ref) / "repo.json",
                {"id": ref.repo_id, "type": ref.type, "private": private, "createdAt": meta.created_at},
            )

    # ------------------------------------------------------------ refs/commits
    def refs(self, ref: RepoRef) -> dict[str, dict[str, str]]:
        """``{"branches": {name: commit}, "tags": {name: commit}}``."""
        self.get_repo(ref)
        return json.loads((self.repo_dir(ref) / "refs.json").read_text())

    def commits(self, ref: RepoRef) -> dict[str, Commit]:
        """All commits of a repo, by id (insertion order = chronological)."""
        self.get_repo(ref)
        out: dict[str, Commit] = {}
        with (self.repo_dir(ref) / "commits.jsonl").open() as f:
            for line in f:
                if line.strip():
                    commit = Commit.from_json(json.loads(line))
                    out[commit.id] = commit
        return out

    def resolve(self, ref: RepoRef, revision: str) -> Commit:
        """Resolve a branch, tag, full commit id or unique commit id prefix (>= 7 chars)."""
        with self._lock(ref):
            refs = self.refs(ref)
            commits = self.commits(ref)
        commit_id = refs["branches"].get(revision) or refs["tags"].get(revision)
        if commit_id is None and _HEX_RE.fullmatch(revision):
            matches = [cid for cid in commits if cid.startswith(revision)]
            commit_id = matches[0] if len(matches) == 1 else None
        if commit_id is None or commit_id not in commits:
            raise HubError(404, f"Invalid rev id: {revision}", code="RevisionNotFound")
        return commits[commit_id]

    def history(self, ref: RepoRef, revision: str) -> list[Commit]:
        """Commits reachable from ``revision``, newest first."""
        head = self.resolve(ref, revision)
        commits = self.commits(ref)
        out: list[Commit] = []
        seen: set[str] = set()
        stack = [head.id]
        while stack:
            cid = stack.pop()
            if cid in seen or cid not in commits:
                continue
            seen.add(cid)
            out.append(commits[cid])
            stack.extend(reversed(commits[cid].parents))
        order = {cid: i for i, cid in enumerate(commits)}  # commits.jsonl is chronological
        out.sort(key=lambda c: order[c.id], reverse=True)
        return out

    def create_branch(self, ref: RepoRef, branch: str, starting_point: str | None) -> None:
        """Create ``branch`` at ``starting_point`` (default: head of ``main``); 409 if it exists."""
        validate_branch_name(branch)
        with self._lock(ref):
            refs = self.refs(ref)
            if branch in refs["branches"]:
                raise HubError(409, f"Reference already exists: refs/heads/{branch}")
            refs["branches"][branch] = self.resolve(ref, starting_point or DEFAULT_BRANCH).id
            _write_json_atomic(self.repo_dir(ref) / "refs.json", refs)

    def delete_branch(self, ref: RepoRef, branch: str) -> None:
        """Delete a branch (``main`` cannot be deleted)."""
        with self._lock(ref):
            refs = self.refs(ref)
            if branch not in refs["branches"]:
                raise HubError(404, f"Invalid rev id: {branch}", code="RevisionNotFound")
            if branch == DEFAULT_BRANCH:
                raise HubError(403, "Cannot delete the default branch")
            del refs["branches"][branch]
            _write_json_atomic(self.repo_dir(ref) / "refs.json", refs)

    def _entry(self, sha256: str, lfs: bool) -> FileEntry:
        size = self.blobs.size(sha256)
        data = lfs_pointer(sha256, size) if lfs else self.blobs.read(sha256)
        return FileEntry(sha256=sha256, size=size, lfs=lfs, oid=git_blob_sha1(data))

    @staticmethod
    def _new_commit(
        parents: list[str], title: str, message: str, author: str, files: dict[str, FileEntry]
    ) -> Commit:
        date = now_iso()
        seed = json.dumps([parents, title, message, author, date, sorted(files), uuid.uuid4().hex])
        commit_id = hashlib.sha1(seed.encode()).hexdigest()
        return Commit(commit_id, parents, title, message, author, date, files)

    def commit(
        self,
        ref: RepoRef,
        branch: str,
        operations: list[CommitOp],
        *,
        title: str,
        message: str,
        author: str,
        parent_commit: str | None = None,
    ) -> Commit:
        """Apply ``operations`` on top of ``branch`` and move the branch to the new commit.

        Blobs referenced by :class:`AddFile` operations must already be in :attr:`blobs`.
        """
        with self._lock(ref):
            refs = self.refs(ref)
            if branch not in refs["branches"]:
                raise HubError(404, f"Invalid rev id: {branch}", code="RevisionNotFound")
            head = self.resolve(ref, branch)
            if parent_commit is not None and not head.id.startswith(parent_commit):
                raise HubError(
                    412, f"A commit has happened since. Please refresh and try again (head is {head.id})."
                )
            files = dict(head.files)
            for op in operations:
                path = normalize_repo_path(op.path.rstrip("/") if isinstance(op, DeletePath) else op.path)
                if isinstance(op, AddFile):
                    if not self.blobs.has(op.sha256):
                        raise HubError(400, f"LFS object {op.sha256} for '{path}' was never uploaded.")
                    files[path] = self._entry(op.sha256, op.lfs)
                elif op.folder:
                    doomed = [p for p in files if p.startswith(path + "/")]
                    if not doomed:
                        raise HubError(404, f"Folder '{path}' does not exist.", code="EntryNotFound")
                    for p in doomed:
                        del files[p]
                else:
                    if path not in files:
                        raise HubError(
                            404, f"A file with this name doesn't exist: {path}", code="EntryNotFound"
                        )
                    del files[path]
            new = self._new_commit([head.id], title, message, author, files)
            with (self.repo_dir(ref) / "commits.jsonl").open("a") as f:
                f.write(json.dumps(new.to_json()) + "\n")
            refs["branches"][branch] = new.id
            _write_json_atomic(self.repo_dir(ref) / "refs.json", refs)
            return new

    # ------------------------------------------------------------- LFS policy
    def lfs_patterns(self, commit: Commit) -> list[str]:
        """Patterns tracked by LFS according to the ``.gitattributes`` of ``commit``."""
        entry = commit.files.get(".gitattributes")
        text = self.blobs.read(entry.sha256).decode(errors="replace") if entry else DEFAULT_GITATTRIBUTES
        return [line.split()[0] for line in text.splitlines() if "filter=lfs" in line and line.split()]

    def upload_mode(self, path: str, size: int, sample: bytes, patterns: list[str]) -> str:
        """``"lfs"`` or ``"regular"``, like the Hub's ``preupload`` endpoint decides."""
        if size >= self.lfs_threshold or b"\0" in sample:
            return "lfs"
        name = path.rsplit("/", 1)[-1]
        for pattern in patterns:
            target = path if "/" in pattern else name
            if fnmatch.fnmatchcase(target, pattern):
                return "lfs"
        return "regular"


def iter_tree(commit: Commit, folder: str, recursive: bool) -> Iterator[tuple[str, FileEntry | None]]:
    """Entries under ``folder`` (``''`` = root) as ``(path, entry)``; ``entry`` is None for folders."""
    prefix = folder.rstrip("/") + "/" if folder else ""
    dirs = sorted(d for d in commit.directories() if d.startswith(prefix))
    files = sorted(p for p in commit.files if p.startswith(prefix))
    if not recursive:
        dirs = [d for d in dirs if "/" not in d[len(prefix) :]]
        files = [p for p in files if "/" not in p[len(prefix) :]]
    for d in dirs:
        yield d, None
    for p in files:
        yield p, commit.files[p]
