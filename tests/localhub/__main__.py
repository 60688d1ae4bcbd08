"""Serve a local Hub until interrupted; prints its URL (``--port 0`` picks a free port).

PYTHONPATH=tests python -m localhub --root /tmp/hub --port 8080
HF_ENDPOINT=http://127.0.0.1:8080 llmpress push out local-user/model

Clients reach it through ``HF_ENDPOINT`` (set before ``huggingface_hub`` is imported); anyone is
``local-user``. Uploads work through Xet (``hf_xet`` installed, the default) and through Git LFS
(``HF_HUB_DISABLE_XET=1``).
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from pathlib import Path
from types import FrameType

from .server import LocalHubServer


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> None:
    """Command line entry point."""
    parser = argparse.ArgumentParser(prog="python -m localhub", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--root", type=Path, required=True, help="storage directory")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    server = LocalHubServer(args.root, host=args.host, port=args.port).start()
    print(server.url, flush=True)
    logging.getLogger("localhub").info(
        "point clients at it with HF_ENDPOINT=%s; they write as 'local-user' (Xet or Git LFS uploads)",
        server.url,
    )
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


if __name__ == "__main__":
    main()
