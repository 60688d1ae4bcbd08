"""The Hub HTTP API subset that publishing and pulling use, as werkzeug routes over a :class:`LocalStore`.

Creating repos and branches, ``preupload``, ndjson commits with LFS (batch, upload, verify) or
Xet (token, xorbs, shards: :mod:`localhub.xet`), listing (repo info, tree, paths-info, commits),
``resolve`` downloads (with ``Range``), ``whoami`` and card metadata validation. Anything else is
a 404 in the Hub's error shape.
"""

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

import yaml
from werkzeug.routing import Map, Rule
from werkzeug.utils import send_file
from werkzeug.wrappers import Request, Response

from .objects import (
    DEFAULT_BRANCH,
    REPO_TYPES,
    AddFile,
    Commit,
    CommitOp,
    DeleteFile,
    FileEntry,
    HubError,
    RepoMeta,
    RepoRef,
    normalize_repo_path,
    validate_repo_part,
)
from .store import LocalStore, is_sha256
from .xet import CAS_PREFIX, XetStorage, parse_shard_files

logger = logging.getLogger(__name__)

LFS_JSON = "application/vnd.git-lfs+json"
_API = "/api/<any(models, datasets):kind>/<namespace>/<name>"
_FRONT_MATTER = re.compile(r"^---\r?\n(.*?)\r?\n---", re.DOTALL)

URLS = Map(
    [
        Rule("/api/repos/create", methods=["POST"], endpoint="create_repo"),
        Rule("/api/whoami-v2", methods=["GET"], endpoint="whoami"),
        Rule("/api/validate-yaml", methods=["POST"], endpoint="validate_yaml"),
        Rule(_API, methods=["GET"], endpoint="repo_info", defaults={"revision": DEFAULT_BRANCH}),
        Rule(f"{_API}/revision/<path:revision>", methods=["GET"], endpoint="repo_info"),
        Rule(f"{_API}/preupload/<path:revision>", methods=["POST"], endpoint="preupload"),
        Rule(f"{_API}/commit/<path:revision>", methods=["POST"], endpoint="commit"),
        Rule(f"{_API}/tree/<revision>", methods=["GET"], endpoint="tree", defaults={"folder": ""}),
        Rule(f"{_API}/tree/<revision>/<path:folder>", methods=["GET"], endpoint="tree"),
        Rule(f"{_API}/paths-info/<path:revision>", methods=["POST"], endpoint="paths_info"),
        Rule(f"{_API}/commits/<path:revision>", methods=["GET"], endpoint="list_commits"),
        Rule(f"{_API}/branch/<path:branch>", methods=["POST"], endpoint="create_branch"),
        Rule("/<namespace>/<name>.git/info/lfs/objects/batch", methods=["POST"], endpoint="lfs_batch"),
        Rule("/__lfs__/upload/<ticket>", methods=["PUT"], endpoint="lfs_upload"),
        Rule("/__lfs__/verify", methods=["POST"], endpoint="lfs_verify"),
        Rule("/<namespace>/<name>/resolve/<revision>/<path:filename>", methods=["GET"], endpoint="resolve"),
        Rule(
            f"{_API}/xet-write-token/<path:revision>",
            methods=["GET"],
            endpoint="xet_token",
            defaults={"write": True},
        ),
        Rule(
            f"{_API}/xet-read-token/<path:revision>",
            methods=["GET"],
            endpoint="xet_token",
            defaults={"write": False},
        ),
        Rule(f"{CAS_PREFIX}/<cas_id>/v1/chunks/<prefix>/<chunk>", methods=["GET"], endpoint="xet_chunk"),
        Rule(f"{CAS_PREFIX}/<cas_id>/v1/xorbs/<prefix>/<xorb>", methods=["POST"], endpoint="xet_xorb"),
        Rule(f"{CAS_PREFIX}/<cas_id>/v1/shards", methods=["POST"], endpoint="xet_shard"),
        # newer hf_xet tries these first and falls back on a 404; its telemetry goes to the Hub
        Rule(f"{CAS_PREFIX}/<cas_id>/v1/xorb-grants/<path:rest>", methods=["POST"], endpoint="not_offered"),
        Rule(f"{CAS_PREFIX}/<cas_id>/v2/shards", methods=["POST"], endpoint="not_offered"),
        Rule("/v1/telemetry", methods=["POST"], endpoint="not_offered"),
    ],
    strict_slashes=False,
    merge_slashes=False,
    redirect_defaults=False,
)


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """A JSON response (``Content-Type`` from ``headers`` if given)."""
    headers = dict(headers or {})
    mimetype = headers.pop("Content-Type", "application/json")
    return Response(json.dumps(data), status, headers, mimetype=mimetype)


def json_body(request: Request, default: dict[str, Any] | None = None) -> dict[str, Any]:
    """The JSON object in the body of ``request`` (400 if invalid; ``default`` if empty and given)."""
    raw = request.get_data()
    if not raw.strip() and default is not None:
        return default
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise HubError(400, f"Invalid JSON body: {err}") from None
    if not isinstance(data, dict):
        raise HubError(400, "Expected a JSON object")
    return data


def _front_matter(text: str) -> dict[str, Any] | None:
    """The YAML metadata block of a model card, or None (400 if it is not valid YAML)."""
    match = _FRONT_MATTER.match(text)
    if match is None:
        return None
    try:
        data = yaml.safe_load(match.group(1))
    except yaml.YAMLError as err:
        raise HubError(400, f"Invalid YAML metadata: {err}") from None
    return data if isinstance(data, dict) else None


def _tree_item(commit: Commit, path: str, entry: FileEntry | None) -> dict[str, Any]:
    if entry is None:
        return {"type": "directory", "oid": commit.tree_oid(path), "size": 0, "path": path}
    item: dict[str, Any] = {"type": "file", "oid": entry.oid, "size": entry.size, "path": path}
    if entry.lfs:
        item["lfs"] = {"oid": entry.sha256, "size": entry.size, "pointerSize": entry.pointer_size}
    return item


def _sibling(path: str, entry: FileEntry, blobs: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"rfilename": path}
    if blobs:
        out.update(size=entry.size, blobId=entry.oid)
        if entry.lfs:
            out["lfs"] = {"size": entry.size, "sha256": entry.sha256, "pointerSize": entry.pointer_size}
    return out


class HubRoutes:
    """Answers Hub API requests from a :class:`LocalStore`.

    Args:
        store: the storage.
        user_for: the user making a request (None if anonymous; raises a 401 on a bad token).
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
        self.xet = XetStorage(store.root)

    def dispatch(self, request: Request) -> Response:
        """Answer ``request``; raises :class:`HubError` or werkzeug's ``HTTPException`` for errors."""
        endpoint, matched = URLS.bind_to_environ(request.environ).match()
        args = dict(matched)
        if "kind" in args:
            kind = args.pop("kind")
            args["ref"] = RepoRef(REPO_TYPES[kind], args.pop("namespace"), args.pop("name"))
        elif "namespace" in args:
            args["ref"] = RepoRef("model", args.pop("namespace"), args.pop("name"))
        return getattr(self, endpoint)(request, **args)

    # ------------------------------------------------------------ permissions
    def _readable(self, request: Request, ref: RepoRef) -> RepoMeta:
        user = self.user_for(request)
        meta = self.store.get_repo(ref)
        if meta.private and self.enforce and user != ref.namespace:
            # Like the Hub: 401 for anonymous requests, 404 for other users; both "RepoNotFound".
            raise HubError(401 if user is None else 404, "Repository not found", code="RepoNotFound")
        return meta

    def _writer(self, request: Request, ref: RepoRef) -> str:
        user = self.user_for(request)
        if user is None:
            raise HubError(401, "Invalid username or password.")
        self._readable(request, ref)
        if self.enforce and user != ref.namespace:
            raise HubError(403, f"You don't have the rights to write to {ref.type} repo {ref.repo_id}")
        return user

    # ------------------------------------------------------------- repos, user
    def create_repo(self, request: Request) -> Response:
        payload = json_body(request)
        user = self.user_for(request)
        if user is None:
            raise HubError(401, "Invalid username or password.")
        repo_type = payload.get("type") or "model"
        if repo_type not in REPO_TYPES.values():
            raise HubError(400, f"Invalid repo type '{repo_type}'")
        namespace = validate_repo_part(str(payload.get("organization") or user), "namespace")
        ref = RepoRef(repo_type, namespace, validate_repo_part(str(payload.get("name") or "")))
        if self.enforce and namespace != user:
            raise HubError(403, f"You don't have the rights to create a {repo_type} under {namespace}")
        private = payload.get("visibility") == "private" or payload.get("private") is True
        url = f"{request.host_url}{ref.url_prefix}{ref.repo_id}"
        try:
            self.store.create_repo(ref, private=private, author=user)
        except HubError as err:
            if err.status == 409:
                err.extra["url"] = url
            raise
        logger.info("created %s repo %s (private=%s)", repo_type, ref.repo_id, private)
        return json_response({"url": url, "name": ref.repo_id, "id": ref.repo_id})

    def repo_info(self, request: Request, ref: RepoRef, revision: str) -> Response:
        meta = self._readable(request, ref)
        commit = self.store.resolve(ref, revision)
        blobs = request.args.get("blobs", "").lower() in ("1", "true")
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
        card = commit.files.get("README.md")
        if card is not None and not card.lfs:
            try:
                card_data = _front_matter(self.store.blobs.read(card.sha256).decode("utf-8", "replace"))
            except HubError:
                card_data = None
            if card_data is not None:
                data["cardData"] = card_data
        return json_response(data)

    def whoami(self, request: Request) -> Response:
        user = self.user_for(request)
        if user is None:
            raise HubError(401, "Invalid username or password.")
        token = {"displayName": "local-hub", "role": "write"}
        return json_response(
            {
                "type": "user",
                "id": user,
                "name": user,
                "fullname": user,
                "email": None,
                "orgs": [],
                "auth": {"type": "access_token", "accessToken": token},
            }
        )

    def validate_yaml(self, request: Request) -> Response:
        try:
            _front_matter(str(json_body(request).get("content", "")))
        except HubError as err:
            return json_response(
                {"errors": [{"message": err.message}], "warnings": [], "error": err.message}, 400
            )
        return json_response({"errors": [], "warnings": []})

    # ------------------------------------------------------- history, branches
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

    def create_branch(self, request: Request, ref: RepoRef, branch: str) -> Response:
        payload = json_body(request, default={})
        self._writer(request, ref)
        self.store.create_branch(ref, branch, payload.get("startingPoint"))
        return json_response({})

    # ---------------------------------------------------------------- listing
    def tree(self, request: Request, ref: RepoRef, revision: str, folder: str) -> Response:
        self._readable(request, ref)
        commit = self.store.resolve(ref, revision)
        folder = folder.strip("/")
        if folder and folder not in commit.directories():
            raise HubError(404, f"Folder '{folder}' does not exist", code="EntryNotFound")
        recursive = request.args.get("recursive", "").lower() in ("1", "true")
        return json_response([_tree_item(commit, p, e) for p, e in commit.tree(folder, recursive)])

    def paths_info(self, request: Request, ref: RepoRef, revision: str) -> Response:
        paths = [p.strip("/") for p in request.form.getlist("paths")]
        self._readable(request, ref)
        commit = self.store.resolve(ref, revision)
        dirs = commit.directories()
        return json_response(
            [_tree_item(commit, p, commit.files.get(p)) for p in paths if p in commit.files or p in dirs]
        )

    # ----------------------------------------------------------------- upload
    def preupload(self, request: Request, ref: RepoRef, revision: str) -> Response:
        payload = json_body(request)
        self._writer(request, ref)
        commit = self.store.resolve(ref, revision)
        patterns = self.store.lfs_patterns(commit)
        files = []
        for item in payload.get("files", []):
            path = normalize_repo_path(str(item.get("path", "")))
            try:
                sample, size = base64.b64decode(item.get("sample") or ""), int(item.get("size", 0))
            except (binascii.Error, TypeError, ValueError):
                raise HubError(400, f"Invalid sample or size for '{path}'") from None
            existing = commit.files.get(path)
            oid = None if existing is None else (existing.sha256 if existing.lfs else existing.oid)
            mode = self.store.upload_mode(path, size, sample, patterns)
            files.append({"path": path, "uploadMode": mode, "shouldIgnore": False, "oid": oid})
        return json_response({"files": files, "commitOid": commit.id})

    def commit(self, request: Request, ref: RepoRef, revision: str) -> Response:
        raw = request.get_data()
        user = self._writer(request, ref)
        if request.args.get("create_pr", "").lower() in ("1", "true"):
            raise HubError(400, "Pull requests are not supported by the local Hub")
        header: dict[str, Any] = {}
        operations: list[CommitOp] = []
        for line in raw.splitlines():
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                key, value = item["key"], dict(item["value"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
                raise HubError(400, f"Malformed ndjson commit payload: {err!r}") from None
            if key == "header":
                header = value
            else:
                operations.append(self._operation(key, value))
        if not header.get("summary"):
            raise HubError(400, "Commit summary is required")
        commit = self.store.commit(
            ref,
            revision,
            operations,
            title=str(header["summary"]),
            message=str(header.get("description") or ""),
            author=user,
            parent_commit=header.get("parentCommit"),
        )
        logger.info("commit %s on %s@%s (%d ops)", commit.id[:8], ref.repo_id, revision, len(operations))
        url = f"{request.host_url}{ref.url_prefix}{ref.repo_id}/commit/{commit.id}"
        return json_response(
            {
                "success": True,
                "commitOid": commit.id,
                "commitUrl": url,
                "hookOutput": "",
                "pullRequestUrl": None,
            }
        )

    def _operation(self, key: str, value: dict[str, Any]) -> CommitOp:
        path = str(value.get("path", ""))
        if key == "file":
            content = str(value.get("content", ""))
            try:
                data = base64.b64decode(content) if value.get("encoding") == "base64" else content.encode()
            except (binascii.Error, ValueError):
                raise HubError(400, f"Invalid base64 content for '{path}'") from None
            return AddFile(path, self.store.blobs.put_bytes(data), lfs=False)
        if key == "lfsFile":
            oid, size = str(value.get("oid", "")), value.get("size")
            if not is_sha256(oid) or not self.store.blobs.has(oid, None if size is None else int(size)):
                raise HubError(400, f"LFS object {oid} ({path}) was not uploaded.")
            return AddFile(path, oid, lfs=True)
        if key == "deletedFile":
            return DeleteFile(path)
        raise HubError(400, f"Unsupported commit operation '{key}'")

    # -------------------------------------------------------------------- LFS
    def lfs_batch(self, request: Request, ref: RepoRef) -> Response:
        payload = json_body(request)
        if payload.get("operation") != "upload":
            raise HubError(422, f"Unsupported LFS operation '{payload.get('operation')}'")
        self._writer(request, ref)
        objects = []
        for obj in payload.get("objects", []):
            oid, size = obj.get("oid"), obj.get("size")
            if not is_sha256(oid) or not isinstance(size, int):
                error = {"code": 422, "message": "Invalid object"}
                objects.append({"oid": str(oid), "size": int(size or 0), "error": error})
            elif self.store.blobs.has(oid, size):
                objects.append({"oid": oid, "size": size})  # no actions: already uploaded
            else:
                ticket = secrets.token_urlsafe(16)
                with self._tickets_lock:
                    self._tickets[ticket] = (oid, size)
                actions = {
                    "upload": {"href": f"{request.host_url}__lfs__/upload/{ticket}", "expires_in": 3600},
                    "verify": {"href": f"{request.host_url}__lfs__/verify", "expires_in": 3600},
                }
                objects.append({"oid": oid, "size": size, "authenticated": True, "actions": actions})
        answer = {"transfer": "basic", "objects": objects, "hash_algo": "sha256"}
        return json_response(answer, headers={"Content-Type": LFS_JSON})

    def lfs_upload(self, request: Request, ticket: str) -> Response:
        with self._tickets_lock:
            target = self._tickets.get(ticket)
        if target is None:
            raise HubError(404, "Unknown or expired upload URL")
        oid, size = target
        chunks = iter(lambda: request.stream.read(1 << 20), b"")
        self.store.blobs.put_stream(chunks, expected_sha256=oid, expected_size=size)
        with self._tickets_lock:
            self._tickets.pop(ticket, None)
        return Response(status=200, headers={"ETag": f'"{oid}"'})

    def lfs_verify(self, request: Request) -> Response:
        payload = json_body(request)
        oid, size = payload.get("oid"), payload.get("size")
        if not is_sha256(oid) or not self.store.blobs.has(str(oid), size):
            raise HubError(404, f"LFS object {oid} not found")
        return json_response({"success": True}, headers={"Content-Type": LFS_JSON})

    # -------------------------------------------------------------------- Xet
    def xet_token(self, request: Request, ref: RepoRef, revision: str, write: bool) -> Response:
        """A CAS token (body, and the ``X-Xet-*`` headers of a ``resolve`` answer) for ``ref``."""
        if write:
            self._writer(request, ref)
        else:
            self._readable(request, ref)
        self.store.resolve(ref, revision)  # 404 for a revision that does not exist
        cas_url = f"{request.host_url.rstrip('/')}{CAS_PREFIX}/{self.xet.id}"
        answer = self.xet.issue_token(ref.repo_id, write, cas_url)
        headers = {
            "X-Xet-Cas-Url": str(answer["casUrl"]),
            "X-Xet-Access-Token": str(answer["accessToken"]),
            "X-Xet-Token-Expiration": str(answer["exp"]),
        }
        return json_response(answer, headers=headers)

    def xet_chunk(self, request: Request, cas_id: str, prefix: str, chunk: str) -> Response:
        self.xet.check_token(cas_id, request.headers.get("Authorization"), write=False)
        raise HubError(404, "Chunk not tracked by global deduplication")

    def xet_xorb(self, request: Request, cas_id: str, prefix: str, xorb: str) -> Response:
        self.xet.check_token(cas_id, request.headers.get("Authorization"), write=True)
        return json_response({"was_inserted": self.xet.put_xorb(xorb, request.get_data())})

    def not_offered(self, request: Request, **_: str) -> Response:
        raise HubError(404, f"{request.path} is not offered by the local Hub")

    def xet_shard(self, request: Request, cas_id: str) -> Response:
        """Rebuild each file of the shard from its xorbs into the blob store (checked by sha256)."""
        self.xet.check_token(cas_id, request.headers.get("Authorization"), write=True)
        files = parse_shard_files(request.get_data())
        for f in files:
            sha256 = self.store.blobs.put_bytes(self.xet.rebuild(f))
            logger.debug("xet file %s stored as blob %s", f.file_hash[:12], sha256[:12])
        return json_response({"result": 1})

    # --------------------------------------------------------------- download
    def resolve(self, request: Request, ref: RepoRef, revision: str, filename: str) -> Response:
        self._readable(request, ref)
        commit = self.store.resolve(ref, revision)
        entry = commit.files.get(filename)
        if entry is None:
            raise HubError(404, "Entry not found", code="EntryNotFound", headers={"X-Repo-Commit": commit.id})
        response = send_file(
            self.store.blobs.path(entry.sha256),
            request.environ,
            mimetype="application/octet-stream",
            download_name=filename.rsplit("/", 1)[-1],
            etag=entry.etag,
            max_age=None,
        )
        response.headers["X-Repo-Commit"] = commit.id
        if entry.lfs:
            response.headers["X-Linked-Etag"] = f'"{entry.sha256}"'
            response.headers["X-Linked-Size"] = str(entry.size)
        return response
