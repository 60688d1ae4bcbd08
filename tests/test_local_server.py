"""Tests of the local Hub server (``tests/localhub``), driven by the real ``huggingface_hub`` client."""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import huggingface_hub.constants as hf_constants
import pytest
from huggingface_hub import (
    CommitOperationAdd,
    HfApi,
    ModelCard,
    ModelCardData,
    get_hf_file_metadata,
    hf_hub_download,
    hf_hub_url,
    snapshot_download,
)
from huggingface_hub.errors import (
    BadRequestError,
    EntryNotFoundError,
    HfHubHTTPError,
    HFValidationError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import get_session, hf_raise_for_status
from localhub import DEFAULT_USER, LocalHubServer
from localhub.objects import RepoRef

# local_hub and local_hub_factory come from localhub.plugin, enabled in conftest.py
pytest_plugins = ["pytester"]

LFS_THRESHOLD = 10 * 1024 * 1024


def _commit_posts(server: LocalHubServer) -> int:
    return sum(1 for r in server.request_log if r.method == "POST" and "/commit/" in r.path)


def _lfs_puts(server: LocalHubServer) -> int:
    return sum(1 for r in server.request_log if r.method == "PUT" and r.path.startswith("/__lfs__/upload/"))


def _raw_request(
    server: LocalHubServer,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection(server.host, server.port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


@pytest.fixture
def model_folder(tmp_path: Path) -> Path:
    """A folder with regular files, a .safetensors file and a >10 MiB text file (both LFS)."""
    folder = tmp_path / "model"
    (folder / "nested").mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"hidden_size": 32}))
    (folder / "nested" / "notes.txt").write_text("some notes\n")
    (folder / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      " + os.urandom(4096))
    (folder / "big.txt").write_bytes(b"a" * (LFS_THRESHOLD + 1024))
    return folder


# --------------------------------------------------------------------------------------------- repos
def test_create_repo_exist_ok_and_namespace(local_hub: LocalHubServer) -> None:
    api = HfApi()
    url = api.create_repo("alice/tiny")
    assert url.repo_id == "alice/tiny"
    assert url.startswith(local_hub.url)
    assert (local_hub.root / "models" / "alice" / "tiny" / "repo.json").is_file()

    with pytest.raises(HfHubHTTPError) as excinfo:
        api.create_repo("alice/tiny")
    assert excinfo.value.response.status_code == 409
    assert api.create_repo("alice/tiny", exist_ok=True).repo_id == "alice/tiny"

    # No namespace => the user's namespace (like the Hub); the repo starts with .gitattributes
    assert api.create_repo("no-namespace").repo_id == f"{DEFAULT_USER}/no-namespace"
    assert api.list_repo_files(f"{DEFAULT_USER}/no-namespace") == [".gitattributes"]
    assert api.create_repo("alice/data", repo_type="dataset").repo_id == "alice/data"
    assert api.repo_info("alice/data", repo_type="dataset").id == "alice/data"
    assert api.repo_exists("alice/tiny") and not api.repo_exists("alice/missing")


def test_invalid_repo_name(local_hub: LocalHubServer) -> None:
    # huggingface_hub validates repo ids itself before sending anything...
    api = HfApi()
    for bad in ("alice/bad--name", "alice/modèle", "alice/-dash"):
        with pytest.raises(HFValidationError):
            api.create_repo(bad)
    assert local_hub.request_log == []
    # ...and the server applies the same rules, answering the Hub's 400 that the client maps to BadRequestError
    response = get_session().post(
        f"{local_hub.url}/api/repos/create",
        json={"name": "bad name!", "organization": "alice", "type": "model"},
    )
    with pytest.raises(BadRequestError) as excinfo:
        hf_raise_for_status(response)
    err = excinfo.value
    assert isinstance(err, HfHubHTTPError) and isinstance(err, ValueError)
    assert err.response.status_code == 400
    assert "Invalid repo name" in str(err)
    assert err.response.json()["error"] == err.response.headers["X-Error-Message"]
    assert not (local_hub.root / "models" / "alice").exists()


def test_unknown_repo_and_entry_errors(local_hub: LocalHubServer) -> None:
    api = HfApi()
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("nobody/nothing")
    api.create_repo("alice/tiny")
    with pytest.raises(EntryNotFoundError):
        hf_hub_download("alice/tiny", "missing.json")
    with pytest.raises(RevisionNotFoundError):
        api.model_info("alice/tiny", revision="no-such-branch")

    status, headers, body = _raw_request(local_hub, "GET", "/api/models/nobody/nothing")
    assert status == 404 and headers["x-error-code"] == "RepoNotFound"
    assert json.loads(body) == {"error": headers["x-error-message"]}
    status, headers, _ = _raw_request(local_hub, "HEAD", "/alice/tiny/resolve/main/missing.json")
    assert status == 404 and headers["x-error-code"] == "EntryNotFound"
    assert len(headers["x-repo-commit"]) == 40


# -------------------------------------------------------------------------------------------- upload
def test_upload_folder_one_commit_with_lfs(local_hub: LocalHubServer, model_folder: Path) -> None:
    api = HfApi()
    api.create_repo("alice/tiny")
    before = len(api.list_repo_commits("alice/tiny"))
    info = api.upload_folder(repo_id="alice/tiny", folder_path=model_folder, commit_message="Add model")

    commits = api.list_repo_commits("alice/tiny")
    assert len(commits) == before + 1
    assert commits[0].commit_id == info.oid and commits[0].title == "Add model"
    assert _commit_posts(local_hub) == 1
    assert _lfs_puts(local_hub) == 2  # model.safetensors (pattern) + big.txt (size)

    assert sorted(api.list_repo_files("alice/tiny")) == [
        ".gitattributes",
        "big.txt",
        "config.json",
        "model.safetensors",
        "nested/notes.txt",
    ]
    siblings = {s.rfilename: s for s in api.model_info("alice/tiny", files_metadata=True).siblings or []}
    assert siblings["config.json"].lfs is None
    assert siblings["model.safetensors"].lfs is not None
    assert siblings["big.txt"].lfs is not None and siblings["big.txt"].lfs.size == LFS_THRESHOLD + 1024
    info2 = api.repo_info("alice/tiny")
    assert info2.sha == info.oid

    tree = {entry.path: entry for entry in api.list_repo_tree("alice/tiny", recursive=True)}
    assert "nested" in tree and "nested/notes.txt" in tree
    assert [e.path for e in api.list_repo_tree("alice/tiny", path_in_repo="nested")] == ["nested/notes.txt"]


def test_second_upload_creates_exactly_one_commit(local_hub: LocalHubServer, tmp_path: Path) -> None:
    api = HfApi()
    api.create_repo("alice/tiny")
    api.upload_file(path_or_fileobj=b"v1", path_in_repo="a.txt", repo_id="alice/tiny")
    n = len(api.list_repo_commits("alice/tiny"))
    api.create_commit(
        "alice/tiny",
        operations=[
            CommitOperationAdd("a.txt", b"v2"),
            CommitOperationAdd("b.txt", b"new"),
            CommitOperationAdd("weights/w.safetensors", os.urandom(2048)),
        ],
        commit_message="Second upload",
    )
    commits = api.list_repo_commits("alice/tiny")
    assert len(commits) == n + 1
    assert commits[0].title == "Second upload"
    # Unchanged content => the client skips the commit entirely
    api.upload_file(path_or_fileobj=b"v2", path_in_repo="a.txt", repo_id="alice/tiny")
    assert len(api.list_repo_commits("alice/tiny")) == n + 1
    # Old revisions stay resolvable by commit id
    old = hf_hub_download("alice/tiny", "a.txt", revision=commits[1].commit_id)
    assert Path(old).read_bytes() == b"v1"
    assert Path(hf_hub_download("alice/tiny", "a.txt")).read_bytes() == b"v2"


def test_fail_next_then_rerun_succeeds(local_hub: LocalHubServer, model_folder: Path) -> None:
    api = HfApi()
    api.create_repo("alice/tiny")
    n = len(api.list_repo_commits("alice/tiny"))

    local_hub.fail_next(1, status=500, paths_containing="/commit/")
    with pytest.raises(HfHubHTTPError) as excinfo:
        api.upload_folder(repo_id="alice/tiny", folder_path=model_folder)
    assert excinfo.value.response.status_code == 500
    assert "Simulated failure" in str(excinfo.value)
    assert len(api.list_repo_commits("alice/tiny")) == n  # nothing committed
    assert _lfs_puts(local_hub) == 2

    api.upload_folder(repo_id="alice/tiny", folder_path=model_folder)  # re-run
    assert len(api.list_repo_commits("alice/tiny")) == n + 1
    assert _lfs_puts(local_hub) == 2  # LFS objects already on the server: not uploaded again
    assert "model.safetensors" in api.list_repo_files("alice/tiny")


def test_fail_next_on_download_and_method_filter(local_hub: LocalHubServer) -> None:
    api = HfApi()
    api.create_repo("alice/tiny")
    api.upload_file(path_or_fileobj=b"x", path_in_repo="a.txt", repo_id="alice/tiny")
    local_hub.fail_next(1, status=503, paths_containing="/api/models/alice/tiny", method="GET")
    with pytest.raises(HfHubHTTPError) as excinfo:
        api.model_info("alice/tiny")
    assert excinfo.value.response.status_code == 503
    assert excinfo.value.response.headers["X-Error-Message"].startswith("Simulated failure")
    assert api.model_info("alice/tiny").sha is not None


def test_concurrent_commits(local_hub: LocalHubServer) -> None:
    api = HfApi()
    api.create_repo("alice/tiny")
    errors: list[BaseException] = []

    def upload(i: int) -> None:
        try:
            api.upload_file(
                path_or_fileobj=f"content {i}".encode(), path_in_repo=f"f{i}.txt", repo_id="alice/tiny"
            )
        except BaseException as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=upload, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(api.list_repo_commits("alice/tiny")) == 9
    assert {f"f{i}.txt" for i in range(8)} <= set(api.list_repo_files("alice/tiny"))


def test_branches_and_file_deletion(local_hub: LocalHubServer) -> None:
    api = HfApi()
    api.create_repo("alice/tiny")
    api.upload_folder(
        repo_id="alice/tiny", folder_path=_folder_with({"d/a.txt": b"a", "d/b.txt": b"b"}, local_hub)
    )
    api.create_branch("alice/tiny", branch="dev")
    api.create_branch("alice/tiny", branch="dev", exist_ok=True)
    api.upload_file(path_or_fileobj=b"c", path_in_repo="c.txt", repo_id="alice/tiny", revision="dev")
    assert "c.txt" in api.list_repo_files("alice/tiny", revision="dev")
    assert "c.txt" not in api.list_repo_files("alice/tiny")
    assert set(local_hub.store.refs(_ref("alice/tiny"))["branches"]) == {"main", "dev"}

    api.delete_file("d/a.txt", "alice/tiny")
    assert api.list_repo_files("alice/tiny") == [".gitattributes", "d/b.txt"]
    with pytest.raises(EntryNotFoundError):
        api.delete_file("d/a.txt", "alice/tiny")


def _ref(repo_id: str) -> RepoRef:
    namespace, name = repo_id.split("/")
    return RepoRef("model", namespace, name)


def _folder_with(files: dict[str, bytes], server: LocalHubServer) -> Path:
    folder = server.root.parent / "folder"
    for name, content in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(content)
    return folder


# ------------------------------------------------------------------------------------------ download
def test_download_and_snapshot(local_hub: LocalHubServer, model_folder: Path, tmp_path: Path) -> None:
    api = HfApi()
    api.create_repo("alice/tiny")
    commit = api.upload_folder(repo_id="alice/tiny", folder_path=model_folder)

    config = hf_hub_download("alice/tiny", "config.json")
    assert Path(config).read_bytes() == (model_folder / "config.json").read_bytes()
    weights = hf_hub_download("alice/tiny", "model.safetensors")
    assert Path(weights).read_bytes() == (model_folder / "model.safetensors").read_bytes()
    assert commit.oid in weights  # snapshots/<commit>/...

    meta = get_hf_file_metadata(hf_hub_url("alice/tiny", "model.safetensors"))
    assert meta.commit_hash == commit.oid
    assert meta.size == (model_folder / "model.safetensors").stat().st_size
    assert len(meta.etag) == 64  # LFS => sha256 as etag

    snapshot = Path(snapshot_download("alice/tiny", local_dir=tmp_path / "snap"))
    for path in model_folder.rglob("*"):
        if path.is_file():
            assert (snapshot / path.relative_to(model_folder)).read_bytes() == path.read_bytes()
    cached = Path(snapshot_download("alice/tiny", allow_patterns=["nested/*"]))
    assert (cached / "nested" / "notes.txt").read_text() == "some notes\n"


def test_range_head_and_chunked_upload(local_hub: LocalHubServer) -> None:
    api = HfApi()
    api.create_repo("alice/tiny")
    api.upload_file(path_or_fileobj=b"0123456789", path_in_repo="digits.txt", repo_id="alice/tiny")

    status, headers, body = _raw_request(
        local_hub, "GET", "/alice/tiny/resolve/main/digits.txt", headers={"Range": "bytes=2-4"}
    )
    assert (status, body, headers["content-range"]) == (206, b"234", "bytes 2-4/10")
    status, _, body = _raw_request(
        local_hub, "GET", "/alice/tiny/resolve/main/digits.txt", headers={"Range": "bytes=-3"}
    )
    assert (status, body) == (206, b"789")
    status, _, _ = _raw_request(
        local_hub, "GET", "/alice/tiny/resolve/main/digits.txt", headers={"Range": "bytes=20-"}
    )
    assert status == 416
    status, headers, body = _raw_request(local_hub, "HEAD", "/alice/tiny/resolve/main/digits.txt")
    assert status == 200 and body == b"" and headers["content-length"] == "10" and "x-repo-commit" in headers

    # LFS batch + chunked PUT, as a git-lfs client would do it
    import hashlib

    data = os.urandom(300_000)
    oid = hashlib.sha256(data).hexdigest()
    batch = {"operation": "upload", "transfers": ["basic"], "objects": [{"oid": oid, "size": len(data)}]}
    status, _, body = _raw_request(
        local_hub, "POST", "/alice/tiny.git/info/lfs/objects/batch", json.dumps(batch).encode()
    )
    answer = json.loads(body)
    assert status == 200 and answer["transfer"] == "basic"
    href = answer["objects"][0]["actions"]["upload"]["href"]
    conn = http.client.HTTPConnection(local_hub.host, local_hub.port, timeout=10)
    conn.request(
        "PUT", href.removeprefix(local_hub.url), body=iter([data[:1000], data[1000:]]), encode_chunked=True
    )
    assert conn.getresponse().status == 200
    conn.close()
    assert local_hub.store.blobs.has(oid, len(data))
    status, _, body = _raw_request(
        local_hub, "POST", "/alice/tiny.git/info/lfs/objects/batch", json.dumps(batch).encode()
    )
    assert "actions" not in json.loads(body)["objects"][0]  # already uploaded


def test_paths_are_sanitized(local_hub: LocalHubServer, tmp_path: Path) -> None:
    api = HfApi()
    api.create_repo("alice/tiny")
    for path in (
        "/api/models/..%2F..%2Fetc/passwd",
        "/api/models/../../x",
        "/..%2F..%2Fetc/x/resolve/main/passwd",
    ):
        status, headers, _ = _raw_request(local_hub, "GET", path)
        assert status == 404, path
    payload = b"\n".join(
        json.dumps(line).encode()
        for line in (
            {"key": "header", "value": {"summary": "evil"}},
            {"key": "file", "value": {"path": "../../evil.txt", "content": "eA==", "encoding": "base64"}},
        )
    )
    status, headers, _ = _raw_request(local_hub, "POST", "/api/models/alice/tiny/commit/main", payload)
    assert status == 400
    for name, namespace in (("..", "alice"), ("x", ".."), ("x", "a/b"), ("..%2F..", "alice")):
        body = json.dumps({"name": name, "organization": namespace}).encode()
        status, _, _ = _raw_request(local_hub, "POST", "/api/repos/create", body)
        assert status == 400, (name, namespace)
    assert not (tmp_path / "evil.txt").exists()
    assert sorted(p.name for p in local_hub.root.iterdir()) == ["blobs", "models"]


# ------------------------------------------------------------------------------------------------ auth
def test_tokens_private_repos_and_401(local_hub_factory, tmp_path: Path) -> None:
    hub = local_hub_factory(tokens={"alice-token": "alice", "bob-token": "bob"})
    alice, bob, anonymous = HfApi(token="alice-token"), HfApi(token="bob-token"), HfApi(token=False)

    with pytest.raises(HfHubHTTPError) as excinfo:
        HfApi(token="wrong-token").create_repo("alice/tiny")
    assert excinfo.value.response.status_code == 401
    assert excinfo.value.response.headers["X-Error-Message"] == "Invalid credentials in Authorization header"
    with pytest.raises(HfHubHTTPError) as excinfo:
        anonymous.create_repo("alice/tiny")
    assert excinfo.value.response.status_code == 401
    with pytest.raises(HfHubHTTPError) as excinfo:
        alice.create_repo("bob/tiny")
    assert excinfo.value.response.status_code == 403
    assert alice.whoami()["name"] == "alice"

    alice.create_repo("alice/secret", private=True)
    alice.upload_file(path_or_fileobj=b"top secret", path_in_repo="s.txt", repo_id="alice/secret")
    assert alice.model_info("alice/secret").private is True
    assert Path(hf_hub_download("alice/secret", "s.txt", token="alice-token")).read_bytes() == b"top secret"

    with pytest.raises(RepositoryNotFoundError) as excinfo:
        anonymous.model_info("alice/secret")
    assert excinfo.value.response.status_code == 401
    with pytest.raises(RepositoryNotFoundError) as excinfo:
        bob.model_info("alice/secret")
    assert excinfo.value.response.status_code == 404
    with pytest.raises(HfHubHTTPError) as excinfo:
        hf_hub_download("alice/secret", "s.txt", token="wrong-token", cache_dir=tmp_path / "other-cache")
    assert excinfo.value.response.status_code == 401

    alice.create_repo("alice/public")
    assert bob.list_repo_files("alice/public") == [".gitattributes"]
    with pytest.raises(HfHubHTTPError) as excinfo:
        bob.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="alice/public")
    assert excinfo.value.response.status_code == 403
    assert hub.request_log


def test_factory_exports_implicit_token(local_hub_factory) -> None:
    local_hub_factory(tokens={"t1": "carol"}, token="t1")
    assert HfApi().create_repo("carol/implicit").repo_id == "carol/implicit"
    assert HfApi().whoami()["name"] == "carol"


# ----------------------------------------------------------------------------------- cards / models
def test_model_card_push_and_load(local_hub: LocalHubServer) -> None:
    HfApi().create_repo("alice/carded")
    card = ModelCard.from_template(
        ModelCardData(language="en", license="mit", tags=["llmpress", "quantized"]),
        model_description="A tiny test model.",
    )
    card.push_to_hub("alice/carded")
    loaded = ModelCard.load("alice/carded")
    assert loaded.data.license == "mit"
    assert loaded.data.tags == ["llmpress", "quantized"]
    assert "A tiny test model." in loaded.text
    card_data = HfApi().model_info("alice/carded").card_data
    assert card_data is not None and card_data.license == "mit"


def test_transformers_push_to_hub_and_from_pretrained(local_hub: LocalHubServer) -> None:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
    )
    model = transformers.LlamaForCausalLM(config)
    model.push_to_hub("alice/tiny-llama")

    files = HfApi().list_repo_files("alice/tiny-llama")
    assert {"config.json", "model.safetensors", "README.md"} <= set(files)
    loaded = transformers.AutoModelForCausalLM.from_pretrained("alice/tiny-llama")
    reference = model.state_dict()
    loaded_state = loaded.state_dict()
    assert reference.keys() == loaded_state.keys()
    for name, tensor in reference.items():
        assert torch.equal(tensor, loaded_state[name]), name


# ----------------------------------------------------------------------------------- server lifecycle
def test_restart_keeps_port_and_data(tmp_path: Path) -> None:
    server = LocalHubServer(tmp_path / "hub")
    with server:
        url = server.url
        HfApi(endpoint=url, token=False).create_repo("alice/persisted")
    assert not server.running
    with pytest.raises(RuntimeError):
        _ = server.url
    with server:
        assert server.url == url
        assert HfApi(endpoint=url, token=False).repo_exists("alice/persisted")
    with LocalHubServer(tmp_path / "hub") as other:  # same root, new server
        assert HfApi(endpoint=other.url, token=False).list_repo_files("alice/persisted") == [".gitattributes"]


def test_client_points_at_the_server_through_hf_endpoint(local_hub: LocalHubServer) -> None:
    # set by localhub.plugin before huggingface_hub was imported: nothing is patched
    assert hf_constants.ENDPOINT == os.environ["HF_ENDPOINT"] == local_hub.url
    assert hf_constants.HF_HUB_DISABLE_XET is True
    HfApi().create_repo("alice/ctx")
    HfApi().upload_file(path_or_fileobj=b"ctx", path_in_repo="f.txt", repo_id="alice/ctx")
    downloaded = Path(hf_hub_download("alice/ctx", "f.txt"))
    assert downloaded.read_bytes() == b"ctx" and Path(os.environ["HF_HOME"]) in downloaded.parents


def test_crash_drops_the_connection_and_restart_keeps_the_data(local_hub: LocalHubServer) -> None:
    api = HfApi()
    api.create_repo("alice/tiny")
    local_hub.fail_next(paths_containing="/commit/", crash=True)
    with pytest.raises(Exception) as excinfo:  # noqa: B017 - the HTTP client's own transport error
        api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="alice/tiny")
    assert type(excinfo.value).__name__ == "RemoteProtocolError"  # no HTTP answer at all
    assert not local_hub.running
    local_hub.start()
    assert api.list_repo_files("alice/tiny") == [".gitattributes"]
    api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="alice/tiny")
    assert "x.txt" in api.list_repo_files("alice/tiny")


def test_cli_prints_url_and_serves(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    cmd = [sys.executable, "-m", "localhub", "--port", "0", "--root", str(tmp_path)]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True) as proc:
        try:
            assert proc.stdout is not None
            url = proc.stdout.readline().strip()
            assert url.startswith("http://127.0.0.1:")
            assert HfApi(endpoint=url, token=False).create_repo("alice/cli").repo_id == "alice/cli"
            assert (tmp_path / "models" / "alice" / "cli" / "repo.json").is_file()
        finally:
            proc.terminate()
            proc.wait(timeout=10)


def test_plugin_via_pytest_plugins(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    # a new process: the plugin must set HF_ENDPOINT before huggingface_hub is imported
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in sys.path if p))
    pytester.makeconftest('pytest_plugins = ["localhub.plugin"]\n')
    pytester.makepyfile(
        """
        import pytest
        from huggingface_hub import HfApi, hf_hub_download
        from huggingface_hub.errors import HfHubHTTPError

        def test_default(local_hub):
            api = HfApi()
            api.create_repo("someone/repo")
            api.upload_file(path_or_fileobj=b"hi", path_in_repo="x.txt", repo_id="someone/repo")
            assert open(hf_hub_download("someone/repo", "x.txt"), "rb").read() == b"hi"

        @pytest.mark.local_hub(tokens={"tok": "dave"})
        def test_marker(local_hub):
            assert local_hub.tokens == {"tok": "dave"}
            with pytest.raises(HfHubHTTPError):
                HfApi(token=False).create_repo("dave/repo")
            HfApi(token="tok").create_repo("dave/repo")
        """
    )
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "-W", "error::pytest.PytestUnknownMarkWarning", timeout=120
    )
    result.assert_outcomes(passed=2)
