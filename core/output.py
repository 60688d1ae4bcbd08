"""Output folders: claimed for a whole run, written atomically, nothing half-written left behind.

:func:`claim_output` is held from the start of a run to its end: it validates the path,
takes an inter-process lock on it (so of two runs on the same folder exactly one proceeds,
the other fails at once), refuses an existing folder unless ``overwrite``, and removes the
temporary folders that killed runs left beside it. :func:`atomic_directory` writes into a
temporary sibling folder and renames it into place only when everything was written.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock, Timeout

from llmpress.errors import LlmpressError

log = logging.getLogger(__name__)


class OutputError(LlmpressError):
    """The output folder cannot be used (taken by another run, not writable)."""


class OutputExistsError(OutputError, FileExistsError):
    """The output folder exists and ``overwrite`` was not asked for."""


def _lock_for(out: Path) -> FileLock:
    """An inter-process lock on ``out``, kept in the temp dir so no lock file litters the output."""
    root = Path(tempfile.gettempdir()) / "llmpress-locks"
    root.mkdir(mode=0o777, parents=True, exist_ok=True)
    key = hashlib.sha256(str(out).encode()).hexdigest()[:32]
    return FileLock(str(root / f"{key}.lock"), timeout=0, is_singleton=True)


def check_output_path(out: Path, overwrite: bool) -> None:
    """Raise :class:`OutputError` unless ``out`` can be created (or, with ``overwrite``, replaced)."""
    if out.exists():
        if not overwrite:
            raise OutputExistsError(
                f"output directory {out} already exists; pass --overwrite (overwrite=True) or pick another"
            )
        if not out.is_dir():
            raise OutputError(f"output path {out} is a file, not a folder; remove it or pick another path")
    ancestor = out.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputError(f"cannot create {out}: {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputError(f"cannot create {out}: {ancestor} is not writable")


def _stale(out: Path) -> list[Path]:
    if not out.parent.is_dir():
        return []
    return sorted(out.parent.glob(f".{out.name}.tmp-*")) + sorted(out.parent.glob(f".{out.name}.old-*"))


@contextlib.contextmanager
def claim_output(out_dir: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Hold ``out_dir`` for a run (see the module docstring); yields its absolute path."""
    out = Path(out_dir).resolve()
    check_output_path(out, overwrite)
    lock = _lock_for(out)
    try:
        lock.acquire()
    except Timeout:
        raise OutputError(
            f"another llmpress run is writing {out}; wait for it to finish or pick another output folder"
        ) from None
    try:
        check_output_path(out, overwrite)  # again, now that no other run can create it
        for stale in _stale(out):
            log.warning("removing %s, left by an interrupted run", stale)
            shutil.rmtree(stale, ignore_errors=True)
        yield out
    finally:
        lock.release()


def _umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old


@contextlib.contextmanager
def atomic_directory(out_dir: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``out_dir``; on success it replaces ``out_dir``.

    On any error the temporary folder is removed and ``out_dir`` is left as it was. Folders
    get the user's umask (not ``mkdtemp``'s 0700).
    """
    with claim_output(out_dir, overwrite) as out:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        os.chmod(tmp, 0o777 & ~_umask())
        try:
            yield tmp
            if out.exists():
                old = out.with_name(f".{out.name}.old-{os.getpid()}")
                os.replace(out, old)
                os.replace(tmp, out)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary (hidden) path beside ``path``; on success it replaces ``path``, so
    readers see the old file or the whole new one, never a half-written one; on any error it
    is removed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
