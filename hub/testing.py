"""Pytest plugin: a local Hugging Face Hub for tests of code using ``huggingface_hub``/``transformers``.

Enable it in a ``conftest.py``::

    pytest_plugins = ["llmpress.hub.testing"]

then use the fixtures::

    def test_push(local_hub):
        HfApi().create_repo("local-user/tiny")          # talks to the local server
        model.push_to_hub("local-user/tiny")
        AutoModelForCausalLM.from_pretrained("local-user/tiny")

    @pytest.mark.local_hub(tokens={"secret": "alice"})  # require authentication
    def test_auth(local_hub):
        HfApi(token="secret").create_repo("alice/private", private=True)

    def test_two_users(local_hub_factory):
        hub = local_hub_factory(tokens={"t1": "alice"}, token="t1")  # also exports HF_TOKEN=t1

Fixtures:

* ``local_hub`` -> a started :class:`~llmpress.hub.local_server.LocalHubServer` on a temporary
  directory; the ``huggingface_hub`` client of the test process is pointed at it (see
  :func:`configure_hf_client`). ``@pytest.mark.local_hub(**kwargs)`` forwards ``kwargs`` to
  ``local_hub_factory``.
* ``local_hub_factory`` -> ``make(tokens=None, *, token=None, root=None, configure_client=True)``
  starting more servers (all stopped at teardown).

Everything is undone at teardown (environment variables and patched module attributes are
restored through ``monkeypatch``).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from .local_server import LocalHubServer

__all__ = ["configure_hf_client", "local_hub", "local_hub_factory", "pointing_hf_client_to"]


def _close_hf_session() -> None:
    """Drop ``huggingface_hub``'s shared HTTP client (pooled connections, proxy settings read from env)."""
    from huggingface_hub.utils import close_session

    close_session()


def configure_hf_client(monkeypatch: pytest.MonkeyPatch, endpoint: str, home: Path) -> None:
    """Point the in-process ``huggingface_hub`` (and ``transformers``) client at ``endpoint``.

    ``huggingface_hub`` reads its environment variables once, at import time, into
    ``huggingface_hub.constants`` and a few module-level copies. Setting ``HF_ENDPOINT`` is thus not
    enough once it is imported; this function sets the environment variables (for subprocesses and
    late imports) *and* patches the cached values:

    * ``constants.ENDPOINT``, ``HUGGINGFACE_CO_URL_TEMPLATE`` (used by ``hf_hub_url``), ``HF_URL_HOSTS``
      and ``utils._http._HUB_ORIGINS`` (hosts whose redirects/auth are trusted);
    * the module-level ``huggingface_hub.hf_api.api`` instance behind ``create_repo``, ``upload_file``...
      whose ``endpoint`` was frozen at import;
    * ``HF_HUB_DISABLE_XET=True`` (otherwise uploads go to the Xet CAS whenever ``hf_xet`` is installed),
      ``HF_HUB_OFFLINE=False``, ``HF_HUB_DISABLE_TELEMETRY=True``;
    * cache and token locations (``HF_HOME``, ``HF_HUB_CACHE``, ``HF_XET_CACHE``, ``HF_TOKEN_PATH``...)
      under ``home``, so no real cache or token is used (``HF_TOKEN`` is unset);
    * ``transformers.utils.hub._hf_api`` (a lazily created, cached ``HfApi``) is reset.

    Args:
        monkeypatch: used to set and later restore everything.
        endpoint: the server URL, e.g. ``LocalHubServer.url``.
        home: directory for ``HF_HOME`` (created if needed).
    """
    import huggingface_hub.constants as constants
    import huggingface_hub.hf_api as hf_api
    from huggingface_hub.utils import _http

    endpoint = endpoint.rstrip("/")
    home = Path(home)
    hub_cache = home / "hub"
    hub_cache.mkdir(parents=True, exist_ok=True)
    split = urlsplit(endpoint)
    host = (split.hostname or "").lower()

    env = {
        "HF_ENDPOINT": endpoint,
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_OFFLINE": "0",
        "TRANSFORMERS_OFFLINE": "0",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(hub_cache),
        "HF_ASSETS_CACHE": str(home / "assets"),
        "HF_XET_CACHE": str(home / "xet"),
        "HF_TOKEN_PATH": str(home / "token"),
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    for key in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACE_HUB_CACHE", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(key, raising=False)
    # Never send requests for the local server through a proxy.
    for key in ("NO_PROXY", "no_proxy"):
        current = os.environ.get(key, "")
        monkeypatch.setenv(key, ",".join(filter(None, [current, host, "127.0.0.1", "localhost"])))

    patched_constants: dict[str, object] = {
        "ENDPOINT": endpoint,
        "HUGGINGFACE_CO_URL_TEMPLATE": endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_XET": True,
        "HF_HUB_DISABLE_TELEMETRY": True,
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(hub_cache),
        "HUGGINGFACE_HUB_CACHE": str(hub_cache),
        "HF_ASSETS_CACHE": str(home / "assets"),
        "HUGGINGFACE_ASSETS_CACHE": str(home / "assets"),
        "HF_XET_CACHE": str(home / "xet"),
        "HF_TOKEN_PATH": str(home / "token"),
        "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
        "CHECK_FOR_UPDATE_DONE_PATH": str(home / ".check_for_update_done"),
    }
    if hasattr(constants, "HF_URL_HOSTS"):
        patched_constants["HF_URL_HOSTS"] = frozenset(constants.HF_URL_HOSTS | {host})
    for name, patched in patched_constants.items():
        if hasattr(constants, name):
            monkeypatch.setattr(constants, name, patched)

    # Module-level copies made at import time.
    if hasattr(_http, "_HUB_ORIGINS") and hasattr(_http, "_url_origin"):
        monkeypatch.setattr(
            _http, "_HUB_ORIGINS", frozenset(_http._HUB_ORIGINS | {_http._url_origin(endpoint)})
        )
    for module_name, attr, path_value in (
        ("huggingface_hub.utils._cache_manager", "HF_HUB_CACHE", str(hub_cache)),
        ("huggingface_hub.utils._cache_assets", "HF_ASSETS_CACHE", str(home / "assets")),
    ):
        module = sys.modules.get(module_name)
        if module is not None and hasattr(module, attr):
            monkeypatch.setattr(module, attr, path_value)
    monkeypatch.setattr(hf_api.api, "endpoint", endpoint)

    transformers_hub = sys.modules.get("transformers.utils.hub")
    if transformers_hub is not None and hasattr(transformers_hub, "_hf_api"):
        monkeypatch.setattr(transformers_hub, "_hf_api", None)

    _close_hf_session()


def _reset_transformers_hf_api() -> None:
    """Forget ``transformers``' cached ``HfApi`` (it may have been created while pointing at a test server)."""
    transformers_hub = sys.modules.get("transformers.utils.hub")
    if transformers_hub is not None and hasattr(transformers_hub, "_hf_api"):
        setattr(transformers_hub, "_hf_api", None)  # noqa: B010 - module attribute unknown to type checkers


@contextmanager
def pointing_hf_client_to(endpoint: str, home: Path) -> Iterator[None]:
    """Context manager version of :func:`configure_hf_client` (usable outside of pytest fixtures)."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        try:
            configure_hf_client(monkeypatch, endpoint, home)
            yield
        finally:
            _close_hf_session()
    _reset_transformers_hf_api()


def pytest_configure(config: pytest.Config) -> None:
    """Register the ``local_hub`` marker."""
    config.addinivalue_line(
        "markers",
        "local_hub(tokens=None, token=None): options of the local_hub fixture (see llmpress.hub.testing)",
    )


@pytest.fixture
def local_hub_factory(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[..., LocalHubServer]]:
    """Factory starting :class:`LocalHubServer` instances, stopped at teardown.

    ``make(tokens=None, *, token=None, root=None, configure_client=True)``:

    * ``tokens``: ``token -> username`` map of the server (``None`` = no authentication);
    * ``token``: exported as ``HF_TOKEN`` so that clients authenticate implicitly;
    * ``root``: storage directory (default: a new temporary directory);
    * ``configure_client``: point ``huggingface_hub`` at this server (the last configured one wins).
    """
    servers: list[LocalHubServer] = []

    def make(
        tokens: dict[str, str] | None = None,
        *,
        token: str | None = None,
        root: Path | None = None,
        configure_client: bool = True,
    ) -> LocalHubServer:
        base = tmp_path_factory.mktemp("local_hub")
        server = LocalHubServer(Path(root) if root is not None else base / "storage", tokens=tokens).start()
        servers.append(server)
        if configure_client:
            configure_hf_client(monkeypatch, server.url, base / "hf_home")
            if token is not None:
                monkeypatch.setenv("HF_TOKEN", token)
        return server

    yield make
    for server in servers:
        server.stop()
    _close_hf_session()
    # transformers may have been imported (and its HfApi cached) after the client was configured
    _reset_transformers_hf_api()


@pytest.fixture
def local_hub(
    request: pytest.FixtureRequest, local_hub_factory: Callable[..., LocalHubServer]
) -> LocalHubServer:
    """A running :class:`LocalHubServer` that ``huggingface_hub`` in this process talks to.

    Options can be given with ``@pytest.mark.local_hub(tokens={...}, token=...)``.
    """
    marker = request.node.get_closest_marker("local_hub")
    kwargs = dict(marker.kwargs) if marker is not None else {}
    return local_hub_factory(**kwargs)
