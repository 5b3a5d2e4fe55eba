"""The hashes A1111, Civitai and kohya show for a model file, computed in one streaming pass.

- legacy (A1111 "Model hash", Civitai AutoV1): sha256 of the 64 KiB at offset 1 MiB, first 8 hex. Like A1111,
  a file shorter than that hashes whatever bytes are there (possibly none: sha256 of b"" for files < 1 MiB).
- AutoV2: sha256 of the whole file, first 10 hex (the full digest is kept in `sha256`).
- AutoV3 (kohya `sshs_model_hash`): sha256 of a safetensors file's data after the 8-byte length and the JSON
  header, so it survives metadata edits; shown as 12 hex. None for files that are not safetensors.

Memory is constant (two 8 MiB buffers); the whole-file and AutoV3 digests run in two threads (hashlib releases
the GIL), overlapped with reading the next chunk.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from mergekit_sdxl.errors import CheckpointError

LEGACY_OFFSET, LEGACY_SIZE = 0x100000, 0x10000
CHUNK = 8 << 20
MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class FileHashes:
    """All hashes of one file (hex digests, lower case)."""

    path: str
    size: int
    sha256: str
    legacy: str
    autov3_full: str | None

    @property
    def autov2(self) -> str:
        """Civitai AutoV2: the first 10 hex of the file's sha256."""
        return self.sha256[:10]

    @property
    def autov3(self) -> str | None:
        """AutoV3 as usually quoted: the first 12 hex of the tensor-data sha256."""
        return self.autov3_full[:12] if self.autov3_full else None

    def as_dict(self) -> dict[str, object]:
        """JSON-ready form (used by `mergekit-sdxl hash --json` and merge metadata)."""
        return {"path": self.path, "size": self.size, "legacy": self.legacy, "autov2": self.autov2,
                "autov3": self.autov3, "autov3_full": self.autov3_full, "sha256": self.sha256}


def safetensors_data_offset(head: bytes, size: int) -> int | None:
    """8 + header length when the first bytes look like a safetensors file of `size` bytes, else None."""
    if len(head) < 9 or head[8:9] != b"{":
        return None
    (n,) = struct.unpack("<Q", head[:8])
    return 8 + n if n <= MAX_HEADER and 8 + n <= size else None


def file_hashes(path: str | os.PathLike[str], progress: Callable[[int], None] | None = None,
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
            return _hash_stream(p, f, os.fstat(f.fileno()).st_size, pool, progress, chunk_size)
    except OSError as exc:
        raise CheckpointError(f"{p}: cannot read: {exc.strerror or exc}") from None


def _hash_stream(p: Path, f, size: int, pool: ThreadPoolExecutor,  # noqa: ANN001 - a raw binary file
                 progress: Callable[[int], None] | None, chunk_size: int) -> FileHashes:
    full, legacy, data = hashlib.sha256(), hashlib.sha256(), hashlib.sha256()
    buffers = [bytearray(chunk_size), bytearray(chunk_size)]
    data_offset: int | None = None
    pos, pending, index = 0, [], 0
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
    return FileHashes(str(p), pos, full.hexdigest(), legacy.hexdigest()[:8],
                      data.hexdigest() if data_offset is not None else None)


def _feed_range(h: hashlib._Hash, view: memoryview, pos: int, lo: int, hi: int) -> None:
    """Update `h` with the part of `view` (which starts at file offset `pos`) inside [lo, hi)."""
    start, stop = max(lo, pos), min(hi, pos + len(view))
    if start < stop:
        h.update(view[start - pos : stop - pos])


_CACHE: dict[tuple[str, int, int, int], FileHashes] = {}


def cached_hashes(path: str | os.PathLike[str], progress: Callable[[int], None] | None = None) -> FileHashes:
    """`file_hashes`, remembered for this process per (real path, inode, size, mtime): a file used several
    times in one run (merge inputs, metadata, `hash`) is read once."""
    p = Path(path)
    try:
        st = p.stat()
    except OSError as exc:
        raise CheckpointError(f"{p}: cannot read: {exc.strerror}") from None
    key = (os.path.realpath(p), st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _CACHE:
        _CACHE[key] = file_hashes(p, progress)
    elif progress is not None:
        progress(st.st_size)
    return _CACHE[key]
