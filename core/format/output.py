"""Output folders: claimed for a whole run, written atomically, nothing half-written left behind.

:func:`claim_output` is held from the start of a run to its end: it validates the path,
takes an inter-process lock on it (so of two runs on the same folder exactly one proceeds,
the other fails at once), refuses an existing folder unless ``overwrite``, and removes the
temporary folders that killed runs left beside it. :func:`atomic_directory` writes into a
temporary sibling folder and renames it into place only when everything was written;
:func:`atomic_file` and :func:`atomic_write` do the same for one file. Every file they leave
has the user's umask (``0o666 & ~umask``), not the ``0600`` of temporary files.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
import threading
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


_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process's umask, read without changing it where the OS allows (Linux's
    ``/proc/self/status``); elsewhere set and restored at once under a lock."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        old = os.umask(0o077)  # restrictive while it is unknown, in case another thread creates a file
        os.umask(old)
    return old


def file_mode() -> int:
    """The mode of a new regular file under the user's umask (``0o644`` under ``022``)."""
    return 0o666 & ~current_umask()


def apply_umask(*paths: str | Path) -> None:
    """Give files the user's umask: the writers of temporary files (``mkstemp``, safetensors'
    ``save_file``) create them ``0600`` whatever the umask."""
    mode = file_mode()
    for p in paths:
        os.chmod(p, mode)


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; once the caller has written it, it gets the
    user's umask and replaces ``path`` in one rename. On any error it is removed and ``path``
    is left as it was."""
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        apply_umask(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: str | Path, data: str | bytes, encoding: str = "utf-8") -> Path:
    """Write ``data`` (text or bytes) to ``path`` atomically, with the user's umask; returns ``path``."""
    with atomic_file(path) as tmp:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data, encoding=encoding)
    return Path(path)


@contextlib.contextmanager
def atomic_directory(out_dir: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``out_dir``; on success it replaces ``out_dir``.

    On any error the temporary folder is removed and ``out_dir`` is left as it was. The folder
    and every file in it get the user's umask (not ``mkdtemp``'s 0700 or safetensors' 0600).
    """
    with claim_output(out_dir, overwrite) as out:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        os.chmod(tmp, 0o777 & ~current_umask())
        try:
            yield tmp
            # every file with the user's umask, whoever wrote it (safetensors writes 0600)
            apply_umask(*(p for p in tmp.rglob("*") if p.is_file() and not p.is_symlink()))
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
