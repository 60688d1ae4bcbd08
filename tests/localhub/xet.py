"""Xet storage for the local Hub: the token endpoints and the CAS upload API that ``hf_xet`` uses.

With ``hf_xet`` installed (and ``HF_HUB_DISABLE_XET`` unset), ``huggingface_hub`` uploads every
LFS file through Xet: it asks the Hub for a write token (``GET /api/models/<id>/xet-write-token/
<rev>``, answered with ``{accessToken, exp, casUrl}``), then talks to the CAS server at ``casUrl``:

* ``GET  /v1/chunks/default-merkledb/<hash>``: global deduplication; always 404 (nothing known);
* ``POST /v1/xorbs/default/<hash>``: a serialized xorb (chunk headers + LZ4/BG4 chunk data);
* ``POST /v1/shards``: a shard listing each file as ranges of xorb chunks, with its sha256.

Newer ``hf_xet`` versions first try ``/v1/xorb-grants/...`` and ``/v2/shards``; a 404 makes them
use the endpoints above.

On a shard upload the server rebuilds each file from the stored xorbs, checks its sha256 and
stores it as an ordinary blob, so that the commit that follows (``lfsFile`` by sha256) and
downloads (plain ``resolve``) work as for Git LFS uploads. The CAS lives on the same server under
``/xet-cas/<storage id>``: ``hf_xet`` caches what it uploaded per CAS URL and deduplicates later
uploads against it, so each storage (a fresh one per test) gets its own URL and the client never
skips a xorb that this storage lacks. Formats: ``spec/xorb.md``, ``spec/shard.md`` and ``spec/api.md`` of xet-core.
Hashes are not recomputed (the client is trusted on xorb hashes); file contents are checked by
sha256.
"""

from __future__ import annotations

import hashlib
import secrets
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .objects import HubError

CAS_PREFIX = "/xet-cas"
TOKEN_TTL_S = 3600

_LZ4_FRAME_MAGIC = b"\x04\x22\x4d\x18"
_BOOKEND = b"\xff" * 32
_ENTRY = 48  # every shard structure is 48 bytes
_FLAG_VERIFICATION = 1 << 31
_FLAG_METADATA_EXT = 1 << 30
_HASH_HEX = 64


def hash_to_hex(raw: bytes) -> str:
    """A 32-byte Xet hash as the API writes it: each 8-byte part as a little-endian u64, in hex."""
    return "".join(f"{v:016x}" for v in struct.unpack("<4Q", raw))


# ------------------------------------------------------------------------ chunk decoding


def lz4_decompress(data: bytes, raw_size: int) -> bytes:
    """Decompress an LZ4 frame (``04 22 4D 18`` ...) or a raw block of ``raw_size`` bytes."""
    import lz4.block
    import lz4.frame

    try:
        if data.startswith(_LZ4_FRAME_MAGIC):
            return bytes(lz4.frame.decompress(data))
        return bytes(lz4.block.decompress(data, uncompressed_size=raw_size))
    except (RuntimeError, ValueError) as e:
        raise HubError(400, f"Invalid LZ4 data in xorb chunk ({e})") from None


def _ungroup4(data: bytes) -> bytes:
    """Undo byte grouping: groups of bytes 0, 1, 2, 3 of every 4 back to interleaved order."""
    n = len(data)
    out = bytearray(n)
    pos = 0
    for g in range(4):
        size = n // 4 + (1 if g < n % 4 else 0)
        out[g::4] = data[pos : pos + size]
        pos += size
    return bytes(out)


def xorb_chunks(data: bytes) -> list[bytes]:
    """The decompressed chunks of a serialized xorb (chunk headers and data; the footer, if any,
    starts with a byte other than the chunk header version 0)."""
    chunks, i = [], 0
    while i + 8 <= len(data) and data[i] == 0:
        size = int.from_bytes(data[i + 1 : i + 4], "little")
        scheme = data[i + 4]
        raw_size = int.from_bytes(data[i + 5 : i + 8], "little")
        body = data[i + 8 : i + 8 + size]
        i += 8 + size
        if len(body) != size:
            raise HubError(400, "Truncated xorb")
        if scheme == 0:
            chunk = body
        elif scheme == 1:
            chunk = lz4_decompress(body, raw_size)
        elif scheme == 2:
            chunk = _ungroup4(lz4_decompress(body, raw_size))
        else:
            raise HubError(400, f"Unknown xorb chunk compression scheme {scheme}")
        if len(chunk) != raw_size:
            raise HubError(400, f"Xorb chunk decodes to {len(chunk)} bytes, its header says {raw_size}")
        chunks.append(chunk)
    return chunks


# ------------------------------------------------------------------------------- shards


@dataclass(frozen=True)
class ShardFile:
    """One file of an uploaded shard: its Xet hash, sha256 (if given) and xorb chunk ranges."""

    file_hash: str
    sha256: str | None
    segments: tuple[tuple[str, int, int, int], ...]  # (xorb hash, first chunk, end chunk, bytes)


def parse_shard_files(data: bytes) -> list[ShardFile]:
    """The File Info section of a shard (header, then file blocks up to the bookend)."""
    if len(data) < _ENTRY:
        raise HubError(400, "Shard too short")
    (version,) = struct.unpack_from("<Q", data, 32)
    if version != 2:
        raise HubError(400, f"Unsupported shard header version {version}")
    files, i = [], _ENTRY
    while True:
        if i + _ENTRY > len(data):
            raise HubError(400, "Shard file info section has no bookend")
        file_hash = data[i : i + 32]
        if file_hash == _BOOKEND:
            return files
        flags, count = struct.unpack_from("<II", data, i + 32)
        i += _ENTRY
        segments = []
        for _ in range(count):
            xorb = hash_to_hex(data[i : i + 32])
            _, nbytes, start, end = struct.unpack_from("<IIII", data, i + 32)
            segments.append((xorb, start, end, nbytes))
            i += _ENTRY
        if flags & _FLAG_VERIFICATION:
            i += count * _ENTRY
        sha256 = None
        if flags & _FLAG_METADATA_EXT:
            sha256 = hash_to_hex(data[i : i + 32])  # stored like every Xet hash: four little-endian u64
            i += _ENTRY
        files.append(ShardFile(hash_to_hex(file_hash), sha256, tuple(segments)))


# -------------------------------------------------------------------------------- store


class XetStorage:
    """Xet tokens and xorbs of the local Hub; rebuilt files go to the Hub's blob store."""

    def __init__(self, root: Path):
        self.root = root / "xet"  # created on first use: <root>/xet/{id, xorbs/<hash>}
        self._id: str | None = None
        self._tokens: dict[str, tuple[str, bool, float]] = {}  # token -> (repo id, write, expiry)
        self._lock = threading.Lock()

    @property
    def id(self) -> str:
        """Part of the CAS URL, unique to this storage (kept in ``xet/id``)."""
        if self._id is None:
            id_file = self.root / "id"
            with self._lock:
                if not id_file.is_file():
                    self.root.mkdir(parents=True, exist_ok=True)
                    id_file.write_text(secrets.token_hex(8))
                self._id = id_file.read_text().strip()
        return self._id

    def issue_token(self, repo_id: str, write: bool, cas_url: str) -> dict[str, object]:
        """A fresh CAS token for ``repo_id``, as the Hub's ``xet-{read,write}-token`` answer."""
        token, exp = f"xet_local_{secrets.token_urlsafe(16)}", int(time.time()) + TOKEN_TTL_S
        with self._lock:
            self._tokens[token] = (repo_id, write, exp)
        return {"accessToken": token, "exp": exp, "casUrl": cas_url}

    def check_token(self, cas_id: str, authorization: str | None, write: bool) -> None:
        """404 for another storage's CAS URL; 401 without a known, unexpired CAS token; 403 when a
        write needs a write token."""
        if cas_id != self.id:
            raise HubError(404, f"No Xet storage '{cas_id}' here (the local Hub's storage was replaced)")
        scheme, _, token = (authorization or "").partition(" ")
        with self._lock:
            entry = self._tokens.get(token.strip()) if scheme.lower() == "bearer" else None
        if entry is None or entry[2] < time.time():
            raise HubError(401, "Invalid or expired Xet token")
        if write and not entry[1]:
            raise HubError(403, "A Xet write token is required")

    def _xorb_path(self, xorb_hash: str) -> Path:
        if len(xorb_hash) != _HASH_HEX or any(c not in "0123456789abcdef" for c in xorb_hash):
            raise HubError(400, f"Malformed xorb hash '{xorb_hash}'")
        return self.root / "xorbs" / xorb_hash

    def put_xorb(self, xorb_hash: str, data: bytes) -> bool:
        """Store a serialized xorb (its chunks must decode); False if it was there already."""
        path = self._xorb_path(xorb_hash)
        if path.is_file():
            return False
        if not xorb_chunks(data):
            raise HubError(400, f"Xorb {xorb_hash} holds no chunk")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{xorb_hash}.{secrets.token_hex(4)}")
        tmp.write_bytes(data)
        tmp.replace(path)
        return True

    def rebuild(self, file: ShardFile) -> bytes:
        """The content of ``file`` from the stored xorbs (400 if one is missing or too short)."""
        parts, cache = [], {}
        for xorb, start, end, nbytes in file.segments:
            if xorb not in cache:
                path = self._xorb_path(xorb)
                if not path.is_file():
                    raise HubError(400, f"Shard references xorb {xorb}, which was not uploaded")
                cache[xorb] = xorb_chunks(path.read_bytes())
            chunks = cache[xorb]
            if not 0 <= start < end <= len(chunks):
                raise HubError(
                    400, f"Shard references chunks [{start}, {end}) of xorb {xorb} ({len(chunks)})"
                )
            segment = b"".join(chunks[start:end])
            if len(segment) != nbytes:
                raise HubError(400, f"Shard segment of xorb {xorb} is {len(segment)} bytes, not {nbytes}")
            parts.append(segment)
        content = b"".join(parts)
        if file.sha256 is not None and hashlib.sha256(content).hexdigest() != file.sha256:
            raise HubError(400, f"File {file.file_hash} does not match its sha256 {file.sha256}")
        return content
