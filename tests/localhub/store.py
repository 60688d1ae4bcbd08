"""On-disk storage of the local Hub: content-addressed blobs, and repos made of commit snapshots.

Layout under ``root``::

    blobs/<sha256[:2]>/<sha256>              file contents (shared by all repos)
    <type>s/<namespace>/<name>/repo.json     repo metadata (id, type, private, createdAt)
    <type>s/<namespace>/<name>/refs.json     {"branches": {"main": <commit id>}, "tags": {}}
    <type>s/<namespace>/<name>/commits.jsonl one JSON commit per line, each a full snapshot of the tree
    xet/id, xet/xorbs/<hash>                 Xet storage (:mod:`localhub.xet`), once a client uses it

Every commit stores the complete ``path -> file entry`` mapping, so resolving a revision never
replays history. File paths only live inside JSON documents, and namespaces and names are
validated before they become directory names, so nothing escapes ``root``.
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
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .objects import (
    DEFAULT_BRANCH,
    REPO_TYPES,
    AddFile,
    Commit,
    CommitOp,
    FileEntry,
    HubError,
    RepoMeta,
    RepoRef,
    git_blob_sha1,
    lfs_pointer,
    normalize_repo_path,
    now_iso,
    validate_branch_name,
    validate_repo_part,
)

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

_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_HEX_RE = re.compile(r"[0-9a-f]{7,40}")


def is_sha256(oid: object) -> bool:
    """Whether ``oid`` is a lowercase hex sha256."""
    return isinstance(oid, str) and _SHA256_RE.fullmatch(oid) is not None


class BlobStore:
    """File contents keyed by their sha256."""

    def __init__(self, root: Path):
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        if not is_sha256(sha256):
            raise HubError(400, f"Invalid sha256 oid '{sha256}'.")
        return self.root / sha256[:2] / sha256

    def has(self, sha256: str, size: int | None = None) -> bool:
        path = self.path(sha256)
        return path.is_file() and (size is None or path.stat().st_size == size)

    def read(self, sha256: str) -> bytes:
        return self.path(sha256).read_bytes()

    def put_bytes(self, data: bytes) -> str:
        """Store ``data``; returns its sha256."""
        return self.put_stream([data])

    def put_stream(
        self, chunks: Iterable[bytes], expected_sha256: str | None = None, expected_size: int | None = None
    ) -> str:
        """Store a stream of chunks atomically, checking its sha256 and size when they are given."""
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
    """Repos, branches and commits persisted under ``root``; safe to share between server threads.

    Args:
        root: storage directory (created if needed).
        lfs_threshold: files at least this large are uploaded through LFS.
    """

    def __init__(self, root: Path, lfs_threshold: int = DEFAULT_LFS_THRESHOLD):
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.blobs = BlobStore(self.root / "blobs")
        self.lfs_threshold = lfs_threshold
        self._global_lock = threading.Lock()
        self._repo_locks: dict[RepoRef, threading.RLock] = {}

    def _lock(self, ref: RepoRef) -> threading.RLock:
        with self._global_lock:
            return self._repo_locks.setdefault(ref, threading.RLock())

    def repo_dir(self, ref: RepoRef) -> Path:
        """Directory of a repo (its type, namespace and name are validated first)."""
        if ref.type not in REPO_TYPES.values():
            raise HubError(400, f"Invalid repo type '{ref.type}'.")
        validate_repo_part(ref.namespace, "namespace")
        validate_repo_part(ref.name)
        return self.root / f"{ref.type}s" / ref.namespace / ref.name

    # ------------------------------------------------------------------- repos
    def get_repo(self, ref: RepoRef) -> RepoMeta:
        """Metadata of an existing repo (404 ``RepoNotFound`` otherwise, also for invalid names)."""
        try:
            meta_path = self.repo_dir(ref) / "repo.json"
        except HubError:
            meta_path = None
        if meta_path is None or not meta_path.is_file():
            raise HubError(404, "Repository not found", code="RepoNotFound")
        data = json.loads(meta_path.read_text())
        return RepoMeta(ref=ref, private=bool(data["private"]), created_at=data["createdAt"])

    def create_repo(self, ref: RepoRef, private: bool, author: str) -> RepoMeta:
        """Create a repo whose first commit holds the default ``.gitattributes`` (409 if it exists)."""
        repo_dir = self.repo_dir(ref)
        with self._lock(ref):
            if (repo_dir / "repo.json").is_file():
                raise HubError(409, f"You already created this {ref.type} repo")
            repo_dir.mkdir(parents=True, exist_ok=True)
            meta = RepoMeta(ref=ref, private=private, created_at=now_iso())
            entry = self._entry(self.blobs.put_bytes(DEFAULT_GITATTRIBUTES.encode()), lfs=False)
            commit = _new_commit([], "initial commit", "", author, {".gitattributes": entry})
            (repo_dir / "commits.jsonl").write_text(json.dumps(commit.to_json()) + "\n")
            _write_json_atomic(repo_dir / "refs.json", {"branches": {DEFAULT_BRANCH: commit.id}, "tags": {}})
            # repo.json last: its presence marks the repo as existing
            _write_json_atomic(
                repo_dir / "repo.json",
                {"id": ref.repo_id, "type": ref.type, "private": private, "createdAt": meta.created_at},
            )
            return meta

    # ------------------------------------------------------------ refs/commits
    def refs(self, ref: RepoRef) -> dict[str, dict[str, str]]:
        """``{"branches": {name: commit id}, "tags": {name: commit id}}``."""
        self.get_repo(ref)
        return json.loads((self.repo_dir(ref) / "refs.json").read_text())

    def commits(self, ref: RepoRef) -> dict[str, Commit]:
        """All commits of a repo by id, oldest first."""
        self.get_repo(ref)
        lines = (self.repo_dir(ref) / "commits.jsonl").read_text().splitlines()
        commits = (Commit.from_json(json.loads(line)) for line in lines if line.strip())
        return {c.id: c for c in commits}

    def resolve(self, ref: RepoRef, revision: str) -> Commit:
        """The commit a branch, tag, commit id or unique commit id prefix (>= 7 chars) names."""
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
        reachable: set[str] = set()
        stack = [head.id]
        while stack:
            cid = stack.pop()
            if cid not in reachable and cid in commits:
                reachable.add(cid)
                stack.extend(commits[cid].parents)
        return [c for c in reversed(commits.values()) if c.id in reachable]

    def create_branch(self, ref: RepoRef, branch: str, starting_point: str | None) -> None:
        """Create ``branch`` at ``starting_point`` (default: the head of ``main``); 409 if it exists."""
        validate_branch_name(branch)
        with self._lock(ref):
            refs = self.refs(ref)
            if branch in refs["branches"]:
                raise HubError(409, f"Reference already exists: refs/heads/{branch}")
            refs["branches"][branch] = self.resolve(ref, starting_point or DEFAULT_BRANCH).id
            _write_json_atomic(self.repo_dir(ref) / "refs.json", refs)

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

        The blobs of :class:`AddFile` operations must already be stored.
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
                path = normalize_repo_path(op.path)
                if isinstance(op, AddFile):
                    if not self.blobs.has(op.sha256):
                        raise HubError(400, f"LFS object {op.sha256} for '{path}' was never uploaded.")
                    files[path] = self._entry(op.sha256, op.lfs)
                elif files.pop(path, None) is None:
                    raise HubError(404, f"A file with this name doesn't exist: {path}", code="EntryNotFound")
            new = _new_commit([head.id], title, message, author, files)
            with (self.repo_dir(ref) / "commits.jsonl").open("a") as f:
                f.write(json.dumps(new.to_json()) + "\n")
            refs["branches"][branch] = new.id
            _write_json_atomic(self.repo_dir(ref) / "refs.json", refs)
            return new

    def _entry(self, sha256: str, lfs: bool) -> FileEntry:
        data = self.blobs.read(sha256)
        oid = git_blob_sha1(lfs_pointer(sha256, len(data)) if lfs else data)
        return FileEntry(sha256=sha256, size=len(data), lfs=lfs, oid=oid)

    # ------------------------------------------------------------- LFS policy
    def lfs_patterns(self, commit: Commit) -> list[str]:
        """Patterns that the ``.gitattributes`` of ``commit`` tracks with LFS."""
        entry = commit.files.get(".gitattributes")
        text = self.blobs.read(entry.sha256).decode(errors="replace") if entry else DEFAULT_GITATTRIBUTES
        return [line.split()[0] for line in text.splitlines() if "filter=lfs" in line]

    def upload_mode(self, path: str, size: int, sample: bytes, patterns: list[str]) -> str:
        """``"lfs"`` or ``"regular"``, as the Hub's ``preupload`` decides it."""
        if size >= self.lfs_threshold or b"\0" in sample:
            return "lfs"
        name = path.rsplit("/", 1)[-1]
        tracked = any(fnmatch.fnmatchcase(path if "/" in p else name, p) for p in patterns)
        return "lfs" if tracked else "regular"


def _new_commit(
    parents: list[str], title: str, message: str, author: str, files: dict[str, FileEntry]
) -> Commit:
    date = now_iso()
    seed = json.dumps([parents, title, message, author, date, sorted(files), uuid.uuid4().hex])
    return Commit(hashlib.sha1(seed.encode()).hexdigest(), parents, title, message, author, date, files)
