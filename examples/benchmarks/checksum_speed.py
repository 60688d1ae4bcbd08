"""Checksum speed on a 7B-sized checkpoint: is verifying every tensor at load affordable?

    python examples/benchmarks/checksum_speed.py                  # ~13 GiB fp16 in ~5 GiB shards
    python examples/benchmarks/checksum_speed.py --size-gib 4     # smaller, same shapes
    python examples/benchmarks/checksum_speed.py --dir /mnt/nvme  # where the temp folder goes

Builds a synthetic checkpoint of Llama-7B-shaped fp16 tensors (4096x4096 attention and
4096x11008 MLP matrices, random bytes) in a temp folder (deleted afterwards, unless
``--keep``), then times, over every tensor of every shard:

* ``read``: ``safe_open(...).get_tensor(...).clone()`` of every tensor (``get_tensor`` maps the
  file lazily; the copy reads it), what a load does at the least;
* ``<algo>``: one digest per tensor (dtype, shape, bytes) over the mmapped file, as
  :func:`llmpress.checkpoint.file_checksums` computes them, for each algorithm of
  :data:`llmpress.checkpoint.CHECKSUM_ALGORITHMS` (``sha256`` is what checkpoints recorded
  before ``checksum_algorithm`` existed);
* ``read+<algo>``: the one-pass variant, each tensor hashed right after it is read;
* ``sha256-copy``: the pre-2.x code path (``get_tensor`` then ``numpy().tobytes()``, two copies).

Each is timed with the files in the page cache (``warm``) and, where the OS allows dropping a
file's pages (``posix_fadvise(DONTNEED)``, Linux), read from the disk (``cold``). A verified load
reads the bytes twice (the checksum pass, then transformers), but the second read comes from
the page cache: its cost is ``<algo> cold + read warm`` against ``read cold``. The ``added``
column is that overhead as a share of ``read`` of the same state: an upper bound of what
verification adds to a real ``from_pretrained``, which also builds the model and copies weights.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from _common import print_table
from safetensors import safe_open

from llmpress.checkpoint import CHECKSUM_ALGORITHMS, file_checksums

GIB = 1 << 30
#: one Llama-7B decoder layer's matrices (q, k, v, o, gate, up, down)
LAYER = [(4096, 4096)] * 4 + [(11008, 4096), (11008, 4096), (4096, 11008)]


def write_checkpoint(folder: Path, size_gib: float, shard_gib: float, seed: int = 0) -> list[Path]:
    """Shards of fp16 tensors of :data:`LAYER` shapes, about ``size_gib`` in all; written one
    tensor at a time (memory stays at one tensor)."""
    g = torch.Generator().manual_seed(seed)
    base = {s: torch.randint(-(2**15), 2**15, s, generator=g, dtype=torch.int16) for s in set(LAYER)}
    names: list[tuple[str, tuple[int, int]]] = []
    total, layer = 0, 0
    while total < size_gib * GIB:
        for j, shape in enumerate(LAYER):
            names.append((f"model.layers.{layer}.m{j}.weight", shape))
            total += 2 * shape[0] * shape[1]
        layer += 1
    shards: list[list[tuple[str, tuple[int, int]]]] = [[]]
    size = 0
    for n, s in names:
        nbytes = 2 * s[0] * s[1]
        if shards[-1] and size + nbytes > shard_gib * GIB:
            shards.append([])
            size = 0
        shards[-1].append((n, s))
        size += nbytes
    files = []
    for i, shard in enumerate(shards):
        header, offset = {}, 0
        for n, s in shard:
            header[n] = {"dtype": "F16", "shape": list(s), "data_offsets": [offset, offset + 2 * s[0] * s[1]]}
            offset += 2 * s[0] * s[1]
        h = json.dumps(header).encode()
        h += b" " * (-len(h) % 8)
        f = folder / f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        with open(f, "wb") as out:
            out.write(struct.pack("<Q", len(h)) + h)
            for k, (_, s) in enumerate(shard):
                t = base[s] ^ (i * 1000 + k)  # distinct bytes per tensor, cheap
                out.write(t.numpy().tobytes())
        files.append(f)
    return files


def drop_cache(files: list[Path]) -> bool:
    """Evict the files' pages from the page cache; False where the OS cannot."""
    if not hasattr(os, "posix_fadvise"):
        return False
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return True


def read_all(files: list[Path]) -> int:
    """Every tensor copied out of its (lazily mapped) file, as a load copies it into the model."""
    n = 0
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():  # noqa: SIM118
                n += st.get_tensor(k).clone().numel()
    return n


def read_and_hash(files: list[Path], algorithm: str) -> int:
    """One pass: each tensor hashed from its freshly read copy."""
    from llmpress.checkpoint import tensor_checksum

    n = 0
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():  # noqa: SIM118
                t = st.get_tensor(k).clone()
                tensor_checksum(t, algorithm)
                n += t.numel()
    return n


def old_sha256(files: list[Path]) -> None:
    """The pre-``checksum_algorithm`` code: get_tensor, then numpy().tobytes() (two copies)."""
    import hashlib

    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():  # noqa: SIM118
                t = st.get_tensor(k)
                h = hashlib.sha256(f"{str(t.dtype).removeprefix('torch.')}:{list(t.shape)}:".encode())
                h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def timed(fn: Callable[[], object], prepare: Callable[[], object], repeat: int) -> float:
    """The fastest of ``repeat`` runs of ``fn``, each after ``prepare`` (the least disturbed by
    other work on a shared machine)."""
    best = float("inf")
    for _ in range(repeat):
        prepare()
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size-gib", type=float, default=13.0, help="checkpoint size (7B fp16: ~13)")
    ap.add_argument("--shard-gib", type=float, default=5.0, help="shard size")
    ap.add_argument("--dir", default=None, help="where to make the temp folder (default: the system's)")
    ap.add_argument(
        "--algorithms", default="sha256,xxh3_128,blake3", help=f"comma-separated, of {CHECKSUM_ALGORITHMS}"
    )
    ap.add_argument("--repeat", type=int, default=3, help="runs of each measurement (the fastest counts)")
    ap.add_argument("--no-cold", action="store_true", help="skip the runs that drop the page cache")
    ap.add_argument("--old", action="store_true", help="also time the pre-2.x sha256 code path")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint folder")
    a = ap.parse_args()
    algos = [x for x in a.algorithms.split(",") if x]
    folder = Path(tempfile.mkdtemp(prefix="llmpress-cksum-", dir=a.dir))
    try:
        t0 = time.perf_counter()
        files = write_checkpoint(folder, a.size_gib, a.shard_gib)
        gib = sum(f.stat().st_size for f in files) / GIB
        print(
            f"{len(files)} shards, {gib:.2f} GiB in {folder} (written in {time.perf_counter() - t0:.0f} s); "
            f"cpus {os.cpu_count()}, load average {os.getloadavg()[0]:.1f}; fastest of {a.repeat} runs"
        )
        states = ["warm"] if a.no_cold or not drop_cache(files) else ["cold", "warm"]
        rows: list[dict] = []
        base: dict[str, float] = {}
        for state in states:
            def run(fn: Callable[[], object], state: str = state) -> float:
                prepare = (lambda: drop_cache(files)) if state == "cold" else (lambda: None)
                return timed(fn, prepare, a.repeat)

            if state == "warm":
                read_all(files)  # every page cached

            base[state] = run(lambda: read_all(files))
            rows.append({"what": "read", "state": state, "s": base[state], "gbs": gib / base[state]})
            jobs: list[tuple[str, Callable[[], object]]] = []
            for algo in algos:
                jobs.append((algo, lambda algo=algo: file_checksums(files, algo)))
                jobs.append((f"read+{algo}", lambda algo=algo: read_and_hash(files, algo)))
            if a.old:
                jobs.append(("sha256-copy", lambda: old_sha256(files)))
            for what, fn in jobs:
                s = run(fn)
                # one pass: the extra over reading alone; separate pass: all of it when cached
                # (cold: the hash pass reads the disk, the load then reads the cache; below)
                added: float | None = s - base[state] if what.startswith("read+") else s
                if state == "cold" and not what.startswith("read+"):
                    added = None
                rows.append(
                    {
                        "what": what,
                        "state": state,
                        "s": s,
                        "gbs": gib / s,
                        "added": None if added is None else 100 * added / base[state],
                    }
                )
        # a cold separate pass costs the hash from disk, then the load reads the page cache
        for r in rows:
            if r["state"] == "cold" and r["what"] != "read" and not r["what"].startswith("read+"):
                r["added"] = 100 * (r["s"] + base["warm"] - base["cold"]) / base["cold"]
        print_table(
            rows,
            [("what", "what", ""), ("state", "page cache", ""), ("s", "seconds", ".2f"),
             ("gbs", "GiB/s", ".2f"), ("added", "added to read (%)", ".0f")],
        )
    finally:
        if a.keep:
            print(f"kept {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
