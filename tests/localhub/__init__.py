"""A local Hugging Face Hub-compatible server for the tests (test infrastructure, not shipped).

* :mod:`localhub.server`: :class:`LocalHubServer` (werkzeug) and its injected failures;
* :mod:`localhub.routes`: the Hub API subset that publishing and pulling use;
* :mod:`localhub.xet`: Xet storage (tokens, xorbs, shards), which ``hf_xet`` uploads through;
* :mod:`localhub.store`, :mod:`localhub.objects`: repos, commits and blobs on disk;
* :mod:`localhub.plugin`: the pytest plugin (``local_hub`` fixture, ``HF_ENDPOINT``);
* ``python -m localhub --root DIR``: serve one from the command line.
"""

from .objects import HubError
from .server import DEFAULT_USER, LocalHubServer, RequestRecord

__all__ = ["DEFAULT_USER", "HubError", "LocalHubServer", "RequestRecord"]
