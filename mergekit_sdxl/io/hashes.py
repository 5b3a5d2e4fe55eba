"""The hashes A1111, Civitai and kohya show for a model file, computed in one streaming pass.

- legacy (A1111 "Model hash", Civitai AutoV1): sha256 of the 64 KiB at offset 1 MiB, first 8 hex. Like A1111,
  a file shorter than that hashes whatever bytes are there (possibly none: sha256 of b"" for files < 1 MiB).
- AutoV2: sha256 of the whole file, first 10 hex (the full digest is kept in `sha256`).
- AutoV3 (kohya `sshs_model_hash`): sha256 of a safetensors file's data after the 8-byte length and the JSON
  header, so it survives metadata edits; shown as 12 hex. None for files that are not safetensors.

Results are cached on disk (`cache_file`), keyed by real path and checked against size, mtime and inode, so a
file is hashed once across runs. Memory is constant (two 8 MiB buffers); the whole-file and AutoV3 digests run in
two threads (hashlib releases the GIL), overlapped with reading the next chunk.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from mergekit_sdxl.errors import CheckpointError
from mergekit_sdxl.io import jsonio

LEGACY_OFFSET, LEGACY_SIZE = 0x100000, 0x10000
CHUNK = 8 << 20
MAX_CACHE_BYTES = 64 << 20
MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class FileHashes:
    """All hashes of one file (full hex digests, lower case)."""

    legacy: str  # A1111 / Civitai AutoV1, 8 hex
    sha256: str  # whole file; AutoV2 is its first 10 hex
    autov3: str | None  # sha256 of the safetensors data region (full 64 hex); None for other formats

    @property
    def autov2(self) -> str:
        """Civitai AutoV2: the first 10 hex of the file's sha256."""
        return self.sha256[:10]

    @property
    def autov3_full(self) -> str | None:
        """The full AutoV3 digest (same as `autov3`)."""
        return self.autov3

    @property
    def autov3_short(self) -> str | None:
        """AutoV3 as usually quoted: its first 12 hex."""
        return self.autov3[:12] if self.autov3 else None

    def as_dict(self) -> dict[str, str | None]:
        """JSON-ready form: legacy, autov2, autov3 (12 hex), autov3_full, sha256."""
        return {"legacy": self.legacy, "autov2": self.autov2, "autov3": self.autov3_short,
                "autov3_full": self.autov3, "sha256": self.sha256}


def safetensors_data_offset(head: bytes, size: int) -> int | None:
    """8 + header length when the first bytes look like a safetensors file of `size` bytes, else None."""
    if len(head) < 9 or head[8:9] != b"{":
        return None
    (n,) = struct.unpack("<Q", head[:8])
    return 8 + n if n <= MAX_HEADER and 8 + n <= size else None


def hash_file(path: str | os.PathLike[str], progress: Callable[[int], None] | None = None,
              chunk_size: int = CHUNK) -> FileHashes:
    """Hash `path` in one streaming pass.

    Args:
        path: the file.
        progress: called with the number of bytes just read, after each chunk.
        chunk_size: read size (memory use is two buffers of this size).

    Raises:
        CheckpointError: the file cannot be read.
    """
    p = Path(path)
    try:
        with open(p, "rb", buffering=0) as f, ThreadPoolExecutor(2, thread_name_prefix="mergekit-hash") as pool:
            return _hash_stream(f, os.fstat(f.fileno()).st_size, pool, progress, chunk_size)
    except OSError as exc:
        raise CheckpointError(f"{p}: cannot read: {exc.strerror or exc}") from exc


def _hash_stream(f, size: int, pool: ThreadPoolExecutor,  # noqa: ANN001 - a raw binary file
                 progress: Callable[[int], None] | None, chunk_size: int) -> FileHashes:
    full, legacy, data = hashlib.sha256(), hashlib.sha256(), hashlib.sha256()
    buffers = [bytearray(chunk_size), bytearray(chunk_size)]
    data_offset: int | None = None
    pos, index = 0, 0
    pending: list[Future[None]] = []
    while True:
        buf = memoryview(buffers[index % 2])
        n = f.readinto(buf)
        for future in pending:  # the previous chunk's digests must finish before the next update
            future.result()
        if not n:
            break
        view = buf[:n]
        if pos == 0:
            data_offset = safetensors_data_offset(bytes(view[:9]), size)
        _feed_range(legacy, view, pos, LEGACY_OFFSET, LEGACY_OFFSET + LEGACY_SIZE)
        pending = [pool.submit(full.update, view)]
        if data_offset is not None and pos + n > data_offset:
            pending.append(pool.submit(data.update, view[max(0, data_offset - pos):]))
        pos += n
        index += 1
        if progress is not None:
            progress(n)
    if data_offset is not None and pos < data_offset:
        data_offset = None
    return FileHashes(legacy.hexdigest()[:8], full.hexdigest(), data.hexdigest() if data_offset is not None else None)


def _feed_range(h: hashlib._Hash, view: memoryview, pos: int, lo: int, hi: int) -> None:
    """Update `h` with the part of `view` (which starts at file offset `pos`) inside [lo, hi)."""
    start, stop = max(lo, pos), min(hi, pos + len(view))
    if start < stop:
        h.update(view[start - pos : stop - pos])


def legacy_hash(path: str | os.PathLike[str]) -> str:
    """The A1111 legacy hash alone (reads 64 KiB)."""
    try:
        with open(path, "rb") as f:
            f.seek(LEGACY_OFFSET)
            return hashlib.sha256(f.read(LEGACY_SIZE)).hexdigest()[:8]
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read: {exc.strerror or exc}") from exc


def cache_file() -> Path:
    """The persistent hash cache: $MERGEKIT_SDXL_CACHE_DIR, else $XDG_CACHE_HOME or ~/.cache, /mergekit-sdxl."""
    folder = os.environ.get("MERGEKIT_SDXL_CACHE_DIR")
    if not folder:
        folder = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "mergekit-sdxl")
    return Path(folder) / "hashes.json"


def _identity(path: str | os.PathLike[str]) -> tuple[str, list[int]] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return os.path.realpath(path), [st.st_size, st.st_mtime_ns, st.st_ino]


def _load_cache() -> dict[str, dict]:
    try:  # a corrupt or hostile cache is ignored (and rewritten), never a crash
        data = jsonio.load_file(cache_file(), max_bytes=MAX_CACHE_BYTES)
    except CheckpointError:
        return {}
    return data if isinstance(data, dict) else {}


def cached_hashes(path: str | os.PathLike[str]) -> FileHashes | None:
    """The hashes the cache holds for `path`, if its size, mtime and inode are unchanged; else None."""
    ident = _identity(path)
    if ident is None:
        return None
    entry = _load_cache().get(ident[0])
    if not isinstance(entry, dict) or entry.get("stat") != ident[1]:
        return None
    try:
        return FileHashes(str(entry["legacy"]), str(entry["sha256"]), entry.get("autov3"))
    except KeyError:
        return None


def store_cached_hashes(path: str | os.PathLike[str], hashes: FileHashes) -> None:
    """Remember `hashes` for `path` (best effort: an unwritable cache is ignored)."""
    ident = _identity(path)
    if ident is None:
        return
    target = cache_file()
    data = _load_cache()
    data[ident[0]] = {"stat": ident[1], "legacy": hashes.legacy, "sha256": hashes.sha256, "autov3": hashes.autov3}
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True), encoding="utf-8")
        os.replace(tmp, target)
    except OSError:
        tmp.unlink(missing_ok=True)


def hashes_for(path: str | os.PathLike[str], progress: Callable[[int], None] | None = None) -> FileHashes:
    """From the cache when it knows the file, else computed (one streaming pass) and stored."""
    found = cached_hashes(path)
    if found is not None:
        if progress is not None:
            progress(os.path.getsize(path))
        return found
    found = hash_file(path, progress)
    store_cached_hashes(path, found)
    return found


file_hashes = hash_file  # the name in the team notes
