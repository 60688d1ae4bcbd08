"""Checksum speed on a 7B-sized checkpoint: is verifying every tensor at load affordable?

    python examples/benchmarks/checksum_speed.py                  # ~13 GiB fp16 in ~5 GiB shards
    python examples/benchmarks/checksum_speed.py --size-gib 4     # smaller, same shapes
    python examples/benchmarks/checksum_speed.py --dir /mnt/nvme  # where the temp folder goes
    python examples/benchmarks/checksum_speed.py --load --size-gib 3  # from_pretrained, verified or not

Builds a synthetic checkpoint of Llama-7B-shaped fp16 tensors (4096x4096 attention and
4096x11008 MLP matrices, random bytes) in a temp folder (deleted afterwards, unless
``--keep``), then times, over every tensor of every shard:

* ``read``: ``safe_open(...).get_tensor(...).clone()`` of every tensor (``get_tensor`` maps the
  file lazily; the copy reads it), what a load does at the least;
* ``<algo>``: one digest per tensor (dtype, shape, bytes) over the mmapped file, as
  :func:`llmpress.format.checkpoint.file_checksums` computes them, for each algorithm of
  :data:`llmpress.format.checkpoint.CHECKSUM_ALGORITHMS` (``sha256`` is what checkpoints recorded
  before ``checksum_algorithm`` existed);
* ``read+<algo>``: the one-pass variant, each tensor hashed right after it is read;
* ``sha256-copy`` (``--old``): how llmpress hashed before ``checksum_algorithm`` (``get_tensor``,
  then ``numpy().tobytes()``: two copies of every tensor).

Each is timed with the files in the page cache (``warm``) and, where the OS allows dropping a
file's pages (``posix_fadvise(DONTNEED)``, Linux), read from the disk (``cold``). A verified load
reads the bytes twice (the checksum pass, then transformers), but the second read comes from
the page cache: its cost is ``<algo> cold + read warm`` against ``read cold``. The ``added``
column is that overhead as a share of ``read`` of the same state: an upper bound of what
verification adds to a real ``from_pretrained``, which also builds the model and copies weights.
On a virtual machine whose disk the host caches, ``cold`` reads come from the host's memory at
a speed that varies from run to run: trust the ``warm`` rows there.

``--load`` times that instead: a Llama-7B-shaped llmpress ``fp8`` checkpoint (random codes,
unit scales; ``--size-gib`` of fp8 weights, as many layers as fit), loaded with
``from_pretrained`` without checksums and with each algorithm's checksums verified (the files
in the page cache, the fastest of ``--repeat`` loads).
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

from llmpress.format.checkpoint import CHECKSUM_ALGORITHMS, VERIFY_ENV, config_checksum, file_checksums

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


def write_fp8_checkpoint(folder: Path, size_gib: float, shard_gib: float) -> Path:
    """An llmpress checkpoint of a Llama-7B-shaped model whose block linears are ``fp8`` (random
    codes, unit scales), with as many layers as ``size_gib`` of fp8 weights hold; its checksums
    are recorded per algorithm in ``checksums-<algorithm>.json`` (see :func:`use_checksums`)."""
    from transformers import LlamaConfig

    from llmpress.format.formats import ModuleFormat

    per_layer = sum(o * i for o, i in LAYER)
    layers = max(1, int(size_gib * GIB // per_layer))
    cfg = LlamaConfig(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
        dtype="bfloat16",
        architectures=["LlamaForCausalLM"],
    )
    names = [
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    ]  # the order of LAYER
    g = torch.Generator().manual_seed(0)
    codes = {s: torch.randint(0, 0x7E, s, generator=g, dtype=torch.uint8) for s in set(LAYER)}
    tensors: list[tuple[str, Callable[[], torch.Tensor]]] = [
        ("model.embed_tokens.weight", lambda: torch.randn(32000, 4096, generator=g).bfloat16()),
        ("model.norm.weight", lambda: torch.ones(4096, dtype=torch.bfloat16)),
        ("lm_head.weight", lambda: torch.randn(32000, 4096, generator=g).bfloat16()),
    ]
    modules = {}
    for layer in range(layers):
        p = f"model.layers.{layer}"
        for norm in ("input_layernorm", "post_attention_layernorm"):
            tensors.append((f"{p}.{norm}.weight", lambda: torch.ones(4096, dtype=torch.bfloat16)))
        for j, (n, (o, i)) in enumerate(zip(names, LAYER)):
            modules[f"{p}.{n}"] = ModuleFormat("fp8", i, o, dtype="bfloat16").to_dict()
            c = codes[(o, i)]
            tensors.append(
                (f"{p}.{n}.weight", lambda c=c, k=layer * 7 + j: (c ^ (k % 64)).view(torch.float8_e4m3fn))
            )
            tensors.append((f"{p}.{n}.weight_scale", lambda o=o: torch.ones(o, 1)))
    files, shard, size, index = [], {}, 0, {}

    def flush() -> None:
        from safetensors.torch import save_file

        f = folder / f"model-{len(files) + 1:05d}.safetensors"
        save_file(shard, str(f), metadata={"format": "pt"})
        index.update({k: f.name for k in shard})
        files.append(f)

    for name, make in tensors:
        t = make()
        if shard and size + t.nbytes > shard_gib * GIB:
            flush()
            shard, size = {}, 0
        shard[name] = t
        size += t.nbytes
    flush()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    config = cfg.to_dict()
    config["quantization_config"] = {"quant_method": "llmpress", "format_version": 3, "modules": modules}
    config["quantization_config"]["config_checksum"] = config_checksum(config)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def use_checksums(folder: Path, algorithm: str | None) -> None:
    """Record ``algorithm``'s checksums in the checkpoint's config (``None``: none)."""
    cfg_file = folder / "config.json"
    config = json.loads(cfg_file.read_text())
    q = config["quantization_config"]
    q.pop("checksums", None)
    q.pop("checksum_algorithm", None)
    if algorithm is not None:
        q["checksum_algorithm"] = algorithm
        q["checksums"] = file_checksums(sorted(folder.glob("*.safetensors")), algorithm)
    cfg_file.write_text(json.dumps(config))


def time_loads(folder: Path, algos: list[str], repeat: int) -> list[dict]:
    """``from_pretrained`` without checksums and verifying each algorithm's, interleaved (each
    round loads every variant once; the fastest round of each counts), and each algorithm's
    checksum pass alone: on a busy machine the pass is the steadier measure of the added cost."""
    import gc

    from transformers import AutoModelForCausalLM

    import llmpress  # noqa: F401 - registers the quantizer

    files = sorted(folder.glob("*.safetensors"))
    gib = sum(f.stat().st_size for f in files) / GIB
    variants: list[str | None] = [None, *algos]
    configs = {}
    for algo in variants:
        use_checksums(folder, algo)
        configs[algo] = (folder / "config.json").read_text()
    AutoModelForCausalLM.from_pretrained(folder)  # warm-up: imports, first-call costs, page cache
    load = dict.fromkeys(variants, float("inf"))
    for _ in range(repeat):
        for algo in variants:
            (folder / "config.json").write_text(configs[algo])
            os.environ[VERIFY_ENV] = "0" if algo is None else "1"
            gc.collect()
            load[algo] = min(
                load[algo], timed(lambda: AutoModelForCausalLM.from_pretrained(folder), lambda: None, 1)
            )
    os.environ.pop(VERIFY_ENV, None)
    base = load[None]
    rows = [{"what": "from_pretrained, no checksums", "state": "warm", "s": base, "gbs": gib / base}]
    for algo in algos:
        s = load[algo]
        rows.append(
            {
                "what": f"from_pretrained, {algo} verified",
                "state": "warm",
                "s": s,
                "gbs": gib / s,
                "added": 100 * (s - base) / base,
            }
        )
        p = timed(lambda algo=algo: file_checksums(files, algo), lambda: None, repeat)
        rows.append(
            {
                "what": "  its checksum pass alone",
                "state": "warm",
                "s": p,
                "gbs": gib / p,
                "added": 100 * p / base,
            }
        )
    return rows


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
    from llmpress.format.checkpoint import tensor_checksum

    n = 0
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():  # noqa: SIM118
                t = st.get_tensor(k).clone()
                tensor_checksum(t, algorithm)
                n += t.numel()
    return n


def old_sha256(files: list[Path]) -> None:
    """How llmpress hashed before ``checksum_algorithm``: get_tensor, then numpy().tobytes()."""
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
    ap.add_argument("--old", action="store_true", help="also time the previous sha256 code path")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint folder")
    ap.add_argument("--load", action="store_true", help="time from_pretrained of an fp8 llmpress checkpoint")
    a = ap.parse_args()
    algos = [x for x in a.algorithms.split(",") if x]
    folder = Path(tempfile.mkdtemp(prefix="llmpress-cksum-", dir=a.dir))
    columns = [
        ("what", "what", ""),
        ("state", "page cache", ""),
        ("s", "seconds", ".2f"),
        ("gbs", "GiB/s", ".2f"),
        ("added", "added (%)", ".0f"),
    ]
    try:
        if a.load:
            t0 = time.perf_counter()
            write_fp8_checkpoint(folder, a.size_gib, a.shard_gib)
            gib = sum(f.stat().st_size for f in folder.glob("*.safetensors")) / GIB
            print(
                f"llmpress fp8 checkpoint, {gib:.2f} GiB in {folder} (written in {time.perf_counter() - t0:.0f} s); "
                f"cpus {os.cpu_count()}, load average {os.getloadavg()[0]:.1f}; fastest of {a.repeat} loads"
            )
            print_table(time_loads(folder, algos, a.repeat), columns)
            return
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
        print_table(rows, columns)
    finally:
        if a.keep:
            print(f"kept {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
