"""HTTP routes of :mod:`llmpress.hub.local_server` (the Hub API subset, on top of the store)."""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
import secrets
import threading
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs

from ._local_http import LFS_JSON, Request, Response, file_response, header_safe, json_body, json_response
from ._local_store import (
    DEFAULT_BRANCH,
    REPO_TYPES,
    AddFile,
    Commit,
    CommitOp,
    DeletePath,
    FileEntry,
    HubError,
    LocalStore,
    RepoMeta,
    RepoRef,
    iter_tree,
    normalize_repo_path,
    validate_repo_part,
)

logger = logging.getLogger("llmpress.hub.local_server")


def _sibling(path: str, entry: FileEntry, blobs: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"rfilename": path}
    if blobs:
        out.update(size=entry.size, blobId=entry.oid)
        if entry.lfs:
            out["lfs"] = {"size": entry.size, "sha256": entry.sha256, "pointerSize": entry.pointer_size}
    return out


def _tree_item(commit: Commit, path: str, entry: FileEntry | None) -> dict[str, Any]:
    if entry is None:
        return {"type": "directory", "oid": commit.tree_oid(path), "size": 0, "path": path}
    item: dict[str, Any] = {"type": "file", "oid": entry.oid, "size": entry.size, "path": path}
    if entry.lfs:
        item["lfs"] = {"oid": entry.sha256, "size": entry.size, "pointerSize": entry.pointer_size}
    return item


class HubRoutes:
    """Maps Hub API requests to :class:`LocalStore` operations.

    Args:
        store: the storage.
        user_for: returns the user making a request (None if anonymous, raises 401 on a bad token).
        enforce_permissions: apply namespace ownership and private repo rules.
    """

    def __init__(
        self, store: LocalStore, user_for: Callable[[Request], str | None], enforce_permissions: bool = False
    ):
        self.store = store
        self.user_for = user_for
        self.enforce = enforce_permissions
        self._tickets: dict[str, tuple[str, int]] = {}
        self._tickets_lock = threading.Lock()

    # ------------------------------------------------------------ permissions
    def _readable(self, request: Request, ref: RepoRef) -> RepoMeta:
        user = self.user_for(request)
        meta = self.store.get_repo(ref)
        if meta.private and self.enforce and user != ref.namespace:
            # Like the Hub: 401 for anonymous requests, 404 for other users; both "RepoNotFound".
            raise HubError(401 if user is None else 404, "Repository not found", code="RepoNotFound")
        return meta

    def _writable(self, request: Request, ref: RepoRef) -> tuple[RepoMeta, str]:
        user = self.user_for(request)
        if user is None:
            raise HubError(401, "Invalid username or password.")
        meta = self._readable(request, ref)
        if self.enforce and user != ref.namespace:
            raise HubError(403, f"You don't have the rights to write to {ref.type} repo {ref.repo_id}")
        return meta, user

    # ----------------------------------------------------------------- router
    def dispatch(self, request: Request) -> Response:
        """Route ``request``; raises :class:`HubError` for error answers."""
        seg, method = request.segments, request.method
        if seg[:1] == ["api"]:
            return self._dispatch_api(request, seg[1:], method)
        if seg[:1] == ["__lfs__"]:
            return self._dispatch_lfs(request, seg[1:], method)
        repo_type = "model"
        if seg and seg[0] in REPO_TYPES:
            repo_type, seg = REPO_TYPES[seg[0]], seg[1:]
        if len(seg) >= 2 and seg[1].endswith(".git") and seg[2:] == ["info", "lfs", "objects", "batch"]:
            if method == "POST":
                return self.lfs_batch(request, RepoRef(repo_type, seg[0], seg[1][: -len(".git")]))
        elif len(seg) >= 5 and seg[2] == "resolve" and method in ("GET", "HEAD"):
            return self.resolve(request, RepoRef(repo_type, seg[0], seg[1]), seg[3], "/".join(seg[4:]))
        return self._unknown(request)

    def _unknown(self, request: Request) -> Response:
        logger.warning("Local Hub: unsupported endpoint %s %s", request.method, request.path)
        raise HubError(404, f"Not Found: {request.method} {request.path} is not implemented by the local Hub")

    def _dispatch_api(self, request: Request, seg: list[str], method: str) -> Response:
        if seg == ["repos", "create"] and method == "POST":
            return self.create_repo(request)
        if seg == ["repos", "delete"] and method == "DELETE":
            return self.delete_repo(request)
        if seg == ["validate-yaml"] and method == "POST":
            return self.validate_yaml(request)
        if seg == ["whoami-v2"] and method == "GET":
            return self.whoami(request)
        if seg[:1] == ["telemetry"]:
            return json_response({})
        if len(seg) < 3 or seg[0] not in REPO_TYPES:
            return self._unknown(request)
        ref = RepoRef(REPO_TYPES[seg[0]], seg[1], seg[2])
        rest = seg[3:]
        action = rest[0] if rest else None
        if method == "GET" and (not rest or (action == "revision" and len(rest) == 2)):
            return self.repo_info(request, ref, rest[1] if rest else DEFAULT_BRANCH)
        if method == "POST" and action == "preupload" and len(rest) == 2:
            return self.preupload(request, ref, rest[1])
        if method == "POST" and action == "commit" and len(rest) == 2:
            return self.commit(request, ref, rest[1])
        if method == "GET" and action == "tree" and len(rest) >= 2:
            return self.tree(request, ref, rest[1], "/".join(rest[2:]))
        if method == "POST" and action == "paths-info" and len(rest) == 2:
            return self.paths_info(request, ref, rest[1])
        if method == "GET" and action == "commits" and len(rest) == 2:
            return self.list_commits(request, ref, rest[1])
        if method == "GET" and rest == ["refs"]:
            return self.list_refs(request, ref)
        if action == "branch" and len(rest) >= 2 and method in ("POST", "DELETE"):
            return self.branch(request, ref, "/".join(rest[1:]))
        if method == "PUT" and rest == ["settings"]:
            return self.settings(request, ref)
        return self._unknown(request)

    def _dispatch_lfs(self, request: Request, seg: list[str], method: str) -> Response:
        if method == "PUT" and len(seg) == 2 and seg[0] == "upload":
            return self.lfs_upload(request, seg[1])
        if method == "POST" and seg[:1] == ["verify"]:
            return self.lfs_verify(request)
        if method in ("GET", "HEAD") and len(seg) == 2 and seg[0] == "objects":
            if not self.store.blobs.has(seg[1]):
                raise HubError(404, "Object not found")
            return file_response(request, self.store.blobs.path(seg[1]), {})
        return self._unknown(request)

    # ------------------------------------------------------------------ repos
    def create_repo(self, request: Request) -> Response:
        payload = json_body(request)
        user = self.user_for(request)
        if user is None:
            raise HubError(401, "Invalid username or password.")
        repo_type = payload.get("type") or "model"
        if repo_type not in REPO_TYPES.values():
            raise HubError(400, f"Invalid repo type '{repo_type}'")
        namespace = payload.get("organization") or user
        name = str(payload.get("name") or "")
        validate_repo_part(namespace, "namespace")
        validate_repo_part(name)
        if self.enforce and namespace != user:
            raise HubError(
                403, f"You don't have the rights to create a {repo_type} under the namespace {namespace}"
            )
        ref = RepoRef(repo_type, namespace, name)
        private = payload.get("visibility") == "private" or payload.get("private") is True
        url = f"{request.base_url}/{ref.url_prefix}{ref.repo_id}"
        try:
            self.store.create_repo(ref, private=private, author=user)
        except HubError as err:
            if err.status == 409:
                err.extra["url"] = url
            raise
        logger.info("Local Hub: created %s repo %s (private=%s)", repo_type, ref.repo_id, private)
        return json_response({"url": url, "name": ref.repo_id, "id": ref.repo_id})

    def delete_repo(self, request: Request) -> Response:
        payload = json_body(request)
        user = self.user_for(request)
        ref = RepoRef(
            payload.get("type") or "model", payload.get("organization") or user or "", payload.get("name", "")
        )
        self._writable(request, ref)
        self.store.delete_repo(ref)
        return json_response({})

    def settings(self, request: Request, ref: RepoRef) -> Response:
        payload = json_body(request)
        self._writable(request, ref)
        private = payload.get("private")
        if "visibility" in payload:
            private = payload["visibility"] == "private"
        if private is not None:
            self.store.set_private(ref, bool(private))
        return json_response({})

    def repo_info(self, request: Request, ref: RepoRef, revision: str) -> Response:
        meta = self._readable(request, ref)
        commit = self.store.resolve(ref, revision)
        blobs = request.flag("blobs")
        data: dict[str, Any] = {
            "_id": commit.tree_oid("")[:24],
            "id": ref.repo_id,
            "author": ref.namespace,
            "sha": commit.id,
            "lastModified": commit.date,
            "createdAt": meta.created_at,
            "private": meta.private,
            "disabled": False,
            "gated": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": [_sibling(p, e, blobs) for p, e in sorted(commit.files.items())],
            "usedStorage": sum(e.size for e in commit.files.values()),
        }
        if ref.type == "model":
            data["modelId"] = ref.repo_id
        card_data = self._card_data(commit)
        if card_data is not None:
            data["cardData"] = card_data
        return json_response(data)

    def _card_data(self, commit: Commit) -> dict[str, Any] | None:
        entry = commit.files.get("README.md")
        if entry is None or entry.lfs:
            return None
        text = self.store.blobs.read(entry.sha256).decode("utf-8", errors="replace")
        match = re.match(r"^---\r?\n(.*?)\r?\n---", text, re.DOTALL)
        if not match:
            return None
        try:
            import yaml

            data = yaml.safe_load(match.group(1))
        except Exception:
            return None
        return data if isinstance(data, dict) else None

    def whoami(self, request: Request) -> Response:
        user = self.user_for(request)
        if user is None:
            raise HubError(401, "Invalid username or password.")
        return json_response(
            {
                "type": "user",
                "id": user,
                "name": user,
                "fullname": user,
                "email": None,
                "orgs": [],
                "auth": {
                    "type": "access_token",
                    "accessToken": {"displayName": "local-hub", "role": "write"},
                },
            }
        )

    def validate_yaml(self, request: Request) -> Response:
        payload = json_body(request)
        content = str(payload.get("content", ""))
        match = re.match(r"^---\r?\n(.*?)\r?\n---", content, re.DOTALL)
        if match:
            try:
                import yaml

                yaml.safe_load(match.group(1))
            except ImportError:
                pass
            except Exception as err:
                message = f"Invalid YAML metadata: {err}"
                return json_response(
                    {"errors": [{"message": message}], "warnings": [], "error": message}, 400
                )
        return json_response({"errors": [], "warnings": []})

    # ------------------------------------------------------------ refs/history
    def list_commits(self, request: Request, ref: RepoRef, revision: str) -> Response:
        self._readable(request, ref)
        return json_response(
            [
                {
                    "id": c.id,
                    "title": c.title,
                    "message": c.message,
                    "date": c.date,
                    "authors": [{"user": c.author, "avatar": None}],
                }
                for c in self.store.history(ref, revision)
            ]
        )

    def list_refs(self, request: Request, ref: RepoRef) -> Response:
        self._readable(request, ref)
        refs = self.store.refs(ref)

        def items(kind: str, prefix: str) -> list[dict[str, str]]:
            return [
                {"name": n, "ref": f"{prefix}{n}", "targetCommit": c} for n, c in sorted(refs[kind].items())
            ]

        return json_response(
            {
                "branches": items("branches", "refs/heads/"),
                "tags": items("tags", "refs/tags/"),
                "converts": [],
            }
        )

    def branch(self, request: Request, ref: RepoRef, branch: str) -> Response:
        if request.method == "DELETE":
            self._writable(request, ref)
            self.store.delete_branch(ref, branch)
            return json_response({})
        payload = json_body(request, default={})
        self._writable(request, ref)
        self.store.create_branch(ref, branch, payload.get("startingPoint"))
        return json_response({})

    # ---------------------------------------------------------------- listing
    def tree(self, request: Request, ref: RepoRef, revision: str, folder: str) -> Response:
        self._readable(request, ref)
        commit = self.store.resolve(ref, revision)
        folder = folder.strip("/")
        if folder and folder not in commit.directories():
            raise HubError(404, f"Folder '{folder}' does not exist", code="EntryNotFound")
        items = [_tree_item(commit, p, e) for p, e in iter_tree(commit, folder, request.flag("recursive"))]
        return json_response(items)

    def paths_info(self, request: Request, ref: RepoRef, revision: str) -> Response:
        if "json" in request.headers.get("Content-Type", ""):
            paths = [str(p) for p in json_body(request, default={}).get("paths", [])]
        else:
            raw = request.body().decode("utf-8", errors="replace")
            paths = parse_qs(raw, keep_blank_values=True).get("paths", [])
        self._readable(request, ref)
        commit = self.store.resolve(ref, revision)
        dirs = commit.directories()
        out = []
        for path in paths:
            path = path.strip("/")
            if path in commit.files:
                out.append(_tree_item(commit, path, commit.files[path]))
            elif path in dirs:
                out.append(_tree_item(commit, path, None))
        return json_response(out)

    # ----------------------------------------------------------------- upload
    def preupload(self, request: Request, ref: RepoRef, revision: str) -> Response:
        payload = json_body(request)
        self._writable(request, ref)
        if request.flag("create_pr"):
            raise HubError(400, "Pull requests are not supported by the local Hub")
        commit = self.store.resolve(ref, revision)
        patterns = self.store.lfs_patterns(commit)
        files = []
        for item in payload.get("files", []):
            path = normalize_repo_path(str(item.get("path", "")))
            try:
                sample = base64.b64decode(item.get("sample") or "")
            except (binascii.Error, ValueError):
                raise HubError(400, f"Invalid base64 sample for '{path}'") from None
            try:
                size = int(item.get("size", 0))
            except (TypeError, ValueError):
                raise HubError(400, f"Invalid size for '{path}'") from None
            mode = self.store.upload_mode(path, size, sample, patterns)
            existing = commit.files.get(path)
            oid = None if existing is None else (existing.sha256 if existing.lfs else existing.oid)
            files.append({"path": path, "uploadMode": mode, "shouldIgnore": False, "oid": oid})
        return json_response({"files": files, "commitOid": commit.id})

    def commit(self, request: Request, ref: RepoRef, revision: str) -> Response:
        raw = request.body()
        _, user = self._writable(request, ref)
        if request.flag("create_pr"):
            raise HubError(400, "Pull requests are not supported by the local Hub")
        header: dict[str, Any] = {}
        operations: list[CommitOp] = []
        for line in raw.splitlines():
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                key, value = item["key"], dict(item["value"])
                if key == "header":
                    header = value
                else:
                    operations.append(self._commit_operation(key, value))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as err:
                raise HubError(400, f"Malformed ndjson commit payload: {err!r}") from None
        summary = str(header.get("summary") or "")
        if not summary:
            raise HubError(400, "Commit summary is required")
        commit = self.store.commit(
            ref,
            revision,
            operations,
            title=summary,
            message=str(header.get("description") or ""),
            author=user,
            parent_commit=header.get("parentCommit"),
        )
        logger.info(
            "Local Hub: commit %s on %s@%s (%d ops)", commit.id[:8], ref.repo_id, revision, len(operations)
        )
        return json_response(
            {
                "success": True,
                "commitOid": commit.id,
                "commitUrl": f"{request.base_url}/{ref.url_prefix}{ref.repo_id}/commit/{commit.id}",
                "hookOutput": "",
                "pullRequestUrl": None,
            }
        )

    def _commit_operation(self, key: str, value: dict[str, Any]) -> CommitOp:
        if key == "file":
            content = str(value.get("content", ""))
            try:
                data = base64.b64decode(content) if value.get("encoding") == "base64" else content.encode()
            except (binascii.Error, ValueError):
                raise HubError(400, f"Invalid base64 content for '{value.get('path')}'") from None
            return AddFile(str(value["path"]), self.store.blobs.put_bytes(data), lfs=False)
        if key == "lfsFile":
            oid = str(value.get("oid", ""))
            if value.get("size") is not None and not self.store.blobs.has(oid, int(value["size"])):
                raise HubError(400, f"LFS object {oid} ({value.get('path')}) was not uploaded.")
            return AddFile(str(value["path"]), oid, lfs=True)
        if key in ("deletedFile", "deletedFolder"):
            return DeletePath(str(value["path"]), folder=key == "deletedFolder")
        raise HubError(400, f"Unknown commit operation '{key}'")

    # -------------------------------------------------------------------- LFS
    def lfs_batch(self, request: Request, ref: RepoRef) -> Response:
        payload = json_body(request)
        operation = payload.get("operation")
        if operation == "upload":
            self._writable(request, ref)
        elif operation == "download":
            self._readable(request, ref)
        else:
            raise HubError(422, f"Unsupported LFS operation '{operation}'")
        base = request.base_url
        objects = []
        for obj in payload.get("objects", []):
            oid, size = obj.get("oid"), obj.get("size")
            if (
                not isinstance(oid, str)
                or not re.fullmatch(r"[0-9a-f]{64}", oid)
                or not isinstance(size, int)
            ):
                objects.append(
                    {
                        "oid": str(oid),
                        "size": int(size or 0),
                        "error": {"code": 422, "message": "Invalid object"},
                    }
                )
                continue
            present = self.store.blobs.has(oid, size)
            if operation == "download":
                if present:
                    href = f"{base}/__lfs__/objects/{oid}"
                    objects.append({"oid": oid, "size": size, "actions": {"download": {"href": href}}})
                else:
                    objects.append(
                        {"oid": oid, "size": size, "error": {"code": 404, "message": "Object not found"}}
                    )
            elif present:
                objects.append({"oid": oid, "size": size})  # no actions: already uploaded
            else:
                ticket = secrets.token_urlsafe(16)
                with self._tickets_lock:
                    self._tickets[ticket] = (oid, size)
                actions = {
                    "upload": {"href": f"{base}/__lfs__/upload/{ticket}", "expires_in": 3600},
                    "verify": {
                        "href": f"{base}/__lfs__/verify/{ref.url_prefix}{ref.repo_id}",
                        "expires_in": 3600,
                    },
                }
                objects.append({"oid": oid, "size": size, "authenticated": True, "actions": actions})
        return json_response({"transfer": "basic", "objects": objects, "hash_algo": "sha256"}, ctype=LFS_JSON)

    def lfs_upload(self, request: Request, ticket: str) -> Response:
        with self._tickets_lock:
            target = self._tickets.get(ticket)
        if target is None:
            raise HubError(404, "Unknown or expired upload URL")
        oid, size = target
        self.store.blobs.put_stream(request.iter_body(), expected_sha256=oid, expected_size=size)
        with self._tickets_lock:
            self._tickets.pop(ticket, None)
        return Response(200, {"ETag": f'"{oid}"'})

    def lfs_verify(self, request: Request) -> Response:
        payload = json_body(request)
        oid, size = str(payload.get("oid", "")), payload.get("size")
        if not re.fullmatch(r"[0-9a-f]{64}", oid) or not self.store.blobs.has(oid, size):
            raise HubError(404, f"LFS object {oid} not found")
        return json_response({"success": True}, ctype=LFS_JSON)

    # --------------------------------------------------------------- download
    def resolve(self, request: Request, ref: RepoRef, revision: str, path: str) -> Response:
        self._readable(request, ref)
        commit = self.store.resolve(ref, revision)
        entry = commit.files.get(path)
        if entry is None:
            raise HubError(404, "Entry not found", code="EntryNotFound", headers={"X-Repo-Commit": commit.id})
        headers = {
            "X-Repo-Commit": commit.id,
            "ETag": f'"{entry.etag}"',
            "Content-Type": "application/octet-stream",
            "Content-Disposition": f'inline; filename="{header_safe(path.rsplit("/", 1)[-1])}"',
        }
        if entry.lfs:
            headers["X-Linked-Etag"] = f'"{entry.sha256}"'
            headers["X-Linked-Size"] = str(entry.size)
        return file_response(request, self.store.blobs.path(entry.sha256), headers)
