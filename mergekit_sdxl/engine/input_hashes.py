"""Input hashes (AutoV2 = sha256 of the file, AutoV3 = sha256 of the tensor data) computed from the bytes the merge
reads anyway, so recording lineage does not cost a second pass over 28 GB of inputs.

A merge reads each input in key order; when that is the file's storage order (true for files written by the same
tool, and for the usual sorted layouts), the tensor bytes arrive front to back and feed both digests. If a file is
read out of order, its hasher gives up quietly and the hash is computed by a separate pass at the end. Results go to
the hash cache, so a second merge over the same inputs hashes nothing.
"""

from __future__ import annotations

import hashlib
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from mergekit_sdxl.engine.pipeline import ByteBudget
from mergekit_sdxl.io.hashes import FileHashes, cached_hashes, hash_file, legacy_hash, store_cached_hashes
from mergekit_sdxl.io.posio import tensor_memory

HASH_BUDGET = 256 << 20  # bytes queued for hashing at most: reading never runs far ahead of the digests


class _Digests:
    """sha256 of the whole file and of its data region, each updated on its own thread (hashlib releases the GIL),
    in submission order, so hashing overlaps reading and computing instead of stalling the reader thread."""

    def __init__(self) -> None:
        self.full, self.data = hashlib.sha256(), hashlib.sha256()
        self._threads = (ThreadPoolExecutor(1, thread_name_prefix="mergekit-hash"),
                         ThreadPoolExecutor(1, thread_name_prefix="mergekit-hash"))
        self._budget, self._never = ByteBudget(HASH_BUDGET), threading.Event()

    def update(self, view: memoryview, data: bool = True) -> None:
        """Queue `view` (kept alive until hashed) for the file digest and, with `data`, the data digest."""
        size = len(view)
        self._budget.acquire(size, self._never)
        futures = [self._threads[0].submit(self.full.update, view)]
        if data:
            futures.append(self._threads[1].submit(self.data.update, view))
        remaining = [len(futures)]
        lock = threading.Lock()

        def done(_: Future) -> None:
            with lock:
                remaining[0] -= 1
                if remaining[0] == 0:
                    self._budget.release(size)
        for future in futures:
            future.add_done_callback(done)

    def close(self) -> None:
        """Drop queued work (the run failed): the threads end once their current update returns."""
        for pool in self._threads:
            pool.shutdown(wait=False, cancel_futures=True)

    def hexdigests(self) -> tuple[str, str]:
        """Wait for the queued updates, stop the threads and return (file digest, data digest)."""
        for pool in self._threads:
            pool.shutdown(wait=True)
        return self.full.hexdigest(), self.data.hexdigest()


class StreamHasher:
    """Feeds sha256(file) and sha256(data) from tensor reads in storage order; finishes the tail itself."""

    def __init__(self, path: Path, data_start: int) -> None:
        self.path, self.size = path, os.path.getsize(path)
        self.expected, self.broken = data_start, False
        self._digests = _Digests()
        with open(path, "rb") as f:
            self._digests.update(memoryview(f.read(data_start)), data=False)
        self._lock = threading.Lock()

    def feed(self, start: int, tensor: torch.Tensor) -> None:
        """Hash this tensor's bytes if they come later in the file; bytes skipped in between (tensors the
        plan does not read, e.g. a non-float key taken from another input) are read and hashed first.
        A read that goes backwards stops the stream (the file is then hashed by a separate pass)."""
        with self._lock:
            if self.broken or start < self.expected:
                self.broken = True
                return
            if start > self.expected:
                self._hash_range(self.expected, start)
            raw = tensor_memory(tensor.reshape(-1).view(torch.uint8))
            self._digests.update(raw)
            self.expected += len(raw)

    def _hash_range(self, begin: int, end: int) -> None:
        with open(self.path, "rb") as f:
            f.seek(begin)
            while begin < end and (chunk := f.read(min(8 << 20, end - begin))):
                self._digests.update(memoryview(chunk))
                begin += len(chunk)
        self.expected = begin

    def close(self) -> None:
        """Stop hashing (the run failed)."""
        self._digests.close()

    def finish(self) -> FileHashes:
        """Hash whatever was not read (or everything, if the stream broke) and return the three hashes."""
        if self.broken:
            self._digests.hexdigests()
            return hash_file(self.path)
        self._hash_range(self.expected, self.size)
        full, data = self._digests.hexdigests()
        return FileHashes(legacy_hash(self.path), full, data)


class InputHashes:
    """Hashes for every input of a run: from the cache when possible, else streamed during the merge."""

    def __init__(self, paths: dict[str, Path], data_starts: dict[str, int], enabled: bool = True) -> None:
        self.enabled = enabled
        self.known: dict[str, FileHashes] = {}
        self.streams: dict[str, StreamHasher] = {}
        if not enabled:
            return
        for alias, path in paths.items():
            cached = cached_hashes(path)
            if cached is not None:
                self.known[alias] = cached
            elif alias in data_starts:
                self.streams[alias] = StreamHasher(path, data_starts[alias])

    def on_read(self, alias: str, start: int, tensor: torch.Tensor) -> None:
        """Reader hook: offer a tensor's bytes to its file's hasher."""
        hasher = self.streams.get(alias)
        if hasher is not None:
            hasher.feed(start, tensor)

    def close(self) -> None:
        """Stop every unfinished stream (a failed run); idempotent."""
        for hasher in self.streams.values():
            hasher.close()
        self.streams.clear()

    def finish(self) -> dict[str, FileHashes]:
        """All hashes (cached + streamed); streamed ones are stored in the cache."""
        for alias, hasher in self.streams.items():
            self.known[alias] = hasher.finish()
            store_cached_hashes(hasher.path, self.known[alias])
        self.streams.clear()
        return dict(self.known)
