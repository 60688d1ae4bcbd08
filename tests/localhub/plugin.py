"""Pytest plugin: one local Hub per test process, and ``huggingface_hub`` pointed at it.

``tests/conftest.py`` enables it (``pytest_plugins = ["localhub.plugin"]``). Its
``pytest_configure`` runs before any test module imports ``huggingface_hub``: it starts a
:class:`~localhub.server.LocalHubServer` and exports ``HF_ENDPOINT`` (its URL),
``HF_HUB_DISABLE_XET=1`` and ``HF_HOME`` (a temporary folder: no real cache or token is used).
The local Hub also speaks Xet (:mod:`localhub.xet`); the tests upload through Git LFS by
default because the failure-injection tests target its endpoints, and a test that sets
``huggingface_hub.constants.HF_HUB_DISABLE_XET = False`` uploads through Xet.
``huggingface_hub`` and ``transformers`` read them when imported; nothing is patched.
Subprocesses inherit them.

Fixtures::

    def test_push(local_hub):                           # fresh storage, anyone is "local-user"
        HfApi().create_repo("local-user/tiny")
        model.push_to_hub("local-user/tiny")

    @pytest.mark.local_hub(tokens={"secret": "alice"})  # authentication required
    def test_auth(local_hub):
        HfApi(token="secret").create_repo("alice/private", private=True)

    def test_user(local_hub_factory):
        hub = local_hub_factory(tokens={"t1": "alice"}, token="t1")  # also exports HF_TOKEN=t1
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from .server import LocalHubServer

_SERVER = pytest.StashKey[LocalHubServer]()
_SAVED_ENV = pytest.StashKey[dict[str, str | None]]()
_HOME = pytest.StashKey[Path]()

#: variables that would point the client at another cache, token or login
_UNSET = (
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "HF_TOKEN_PATH",
    "HF_HUB_CACHE",
    "HUGGINGFACE_HUB_CACHE",
    "HF_ASSETS_CACHE",
    "HF_XET_CACHE",
    "HF_OIDC_RESOURCE",
)


def pytest_configure(config: pytest.Config) -> None:
    """Start this process's local Hub and point ``huggingface_hub`` at it through the environment."""
    config.addinivalue_line(
        "markers",
        "local_hub(tokens=None, token=None): options of the local_hub fixture (see localhub.plugin)",
    )
    home = Path(tempfile.mkdtemp(prefix="localhub-"))
    server = LocalHubServer(home / "storage").start()
    env = {
        "HF_ENDPOINT": server.url,
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_OFFLINE": "0",
        "TRANSFORMERS_OFFLINE": "0",
        "HF_HOME": str(home / "hf_home"),
    }
    for key in ("NO_PROXY", "no_proxy"):  # never through a proxy
        env[key] = ",".join(filter(None, [os.environ.get(key), "127.0.0.1", "localhost"]))
    config.stash[_SAVED_ENV] = {k: os.environ.get(k) for k in (*env, *_UNSET)}
    config.stash[_SERVER], config.stash[_HOME] = server, home
    for key in _UNSET:
        os.environ.pop(key, None)
    os.environ.update(env)


def pytest_unconfigure(config: pytest.Config) -> None:
    """Stop the server, restore the environment and delete the temporary folder."""
    server = config.stash.get(_SERVER, None)
    if server is None:
        return
    server.stop()
    for key, value in config.stash[_SAVED_ENV].items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    shutil.rmtree(config.stash[_HOME], ignore_errors=True)


@pytest.fixture
def local_hub_factory(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[..., LocalHubServer]]:
    """``make(tokens=None, *, token=None)``: the process's server, running on fresh storage.

    * ``tokens``: ``token -> username`` map of the server (``None``: no authentication);
    * ``token``: exported as ``HF_TOKEN`` so that clients authenticate implicitly.
    """
    from huggingface_hub import constants

    server = request.config.stash[_SERVER].start()
    if server.url != constants.ENDPOINT:
        pytest.fail(
            f"huggingface_hub talks to {constants.ENDPOINT}, not to the local Hub {server.url}: it was imported"
            " before localhub.plugin set HF_ENDPOINT; enable the plugin in the root conftest.py"
        )
    monkeypatch.delenv("HF_TOKEN", raising=False)

    def make(tokens: dict[str, str] | None = None, *, token: str | None = None) -> LocalHubServer:
        server.reset(tmp_path_factory.mktemp("local_hub"), tokens).start()
        if token is not None:
            monkeypatch.setenv("HF_TOKEN", token)
        return server

    yield make
    server.clear_failures()
    server.start()  # a test may have stopped it


@pytest.fixture
def local_hub(
    request: pytest.FixtureRequest, local_hub_factory: Callable[..., LocalHubServer]
) -> LocalHubServer:
    """The running local Hub that ``huggingface_hub`` talks to, on fresh storage.

    Options: ``@pytest.mark.local_hub(tokens={...}, token=...)`` (see ``local_hub_factory``).
    """
    marker = request.node.get_closest_marker("local_hub")
    return local_hub_factory(**(marker.kwargs if marker is not None else {}))
