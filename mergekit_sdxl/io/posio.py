"""Positional reads and writes on every OS: the one home of `os.pread`/`os.preadv`/`os.pwrite`.

`PositionalFile` owns a file descriptor and reads into a caller's buffer at an offset, or writes a buffer at an
offset, from any number of threads, with the file's own position never used by anyone else. How:

- `pread` (Linux, macOS, BSD): `os.preadv` into the caller's buffer (no copy; `os.pread` + one copy where
  `preadv` is missing, e.g. macOS before 11), `os.pwrite` for writes. The file position is never touched.
- `locked` (Windows, or wherever those calls are missing): one unbuffered handle on the same descriptor and a
  lock around `seek` + `readinto` / `write`. Chosen over per-thread handles and over `mmap` by
  `benchmarks/bench_posio.py` (RESULTS.md, "Positional I/O"): as fast as `pread` for the engine's single reader
  thread, where per-thread handles would have to reopen the file by name (a window in which it can be replaced)
  and `mmap` adds a page fault per 4 KiB and turns an input truncated under us into a SIGBUS on POSIX.
- `handles` and `mmap` remain selectable (`strategy=`) for that benchmark, and are tested like the others.

Every strategy returns the same bytes (tests/test_io_posio.py runs all of them against each other), and reads
or writes loop until the whole buffer is done: short transfers (over 2 GiB on Linux, signals) are continued,
end of file is reported as `EOFError` with the offset.
"""

from __future__ import annotations

import io
import mmap
import os
import threading
from typing import TYPE_CHECKING, Literal, cast

if TYPE_CHECKING:
    import torch
    from typing_extensions import Buffer

Strategy = Literal["pread", "locked", "handles", "mmap"]
STRATEGIES: tuple[Strategy, ...] = ("pread", "locked", "handles", "mmap")

# Looked up once: a test mode (tests/portable/) deletes these from `os` before the package is imported.
_PREADV = getattr(os, "preadv", None)
_PREAD = getattr(os, "pread", None)
_PWRITE = getattr(os, "pwrite", None)
NATIVE = _PWRITE is not None and (_PREADV is not None or _PREAD is not None)
DEFAULT: Strategy = "pread" if NATIVE else "locked"


def tensor_memory(tensor: torch.Tensor) -> memoryview:
    """A CPU tensor's own memory as a memoryview, no copy: what reads fill, writes send and hashes digest.

    The cast only informs the type checker: NumPy declares its arrays buffers (`__buffer__`) for Python 3.12+.
    """
    return memoryview(cast("Buffer", tensor.numpy()))


def native_calls() -> dict[str, bool]:
    """Which positional system calls this Python offers (for `inspect --system` and the tests)."""
    return {"preadv": _PREADV is not None, "pread": _PREAD is not None, "pwrite": _PWRITE is not None}


class PositionalFile:
    """Positional access to one open file; safe to share between threads.

    Usage:
        f = PositionalFile(fd)                # takes ownership of fd; closes it in close()
        f.readinto(memoryview(buf), offset)   # fills the whole view or raises EOFError
        f.write(memoryview(data), offset)     # writes the whole view (fd must be open for writing)

    Args:
        fd: an open descriptor of a regular file.
        strategy: "pread", "locked", "handles" or "mmap"; None picks `DEFAULT` for this platform.
            "handles" reopens `path` once per thread (reads only) and checks it is still the same file;
            "mmap" maps the file read-only (reads only; the file must not be empty).
        path: the file's path (needed by "handles").
        writable: `fd` is open for writing and `write` will be used.
    """

    def __init__(self, fd: int, strategy: Strategy | None = None, path: str | os.PathLike[str] | None = None,
                 writable: bool = False) -> None:
        self.fd = fd
        self.strategy: Strategy = strategy or DEFAULT
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown positional I/O strategy {self.strategy!r}; use one of {STRATEGIES}")
        if self.strategy == "pread" and not NATIVE:
            raise ValueError("os.pread/os.pwrite are not available on this platform; use 'locked'")
        self._lock = threading.Lock()
        self._file = io.FileIO(fd, "r+" if writable else "r", closefd=False) if self.strategy == "locked" else None
        self._path = os.fspath(path) if path is not None else None
        self._local = threading.local()
        self._handles: list[io.FileIO] = []
        self._map: mmap.mmap | None = None
        if self.strategy == "handles" and self._path is None:
            raise ValueError("the 'handles' strategy needs the file's path")
        if self.strategy == "mmap":
            self._map = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)

    # reads -------------------------------------------------------------------------------------------------
    def readinto(self, view: memoryview, offset: int) -> None:
        """Fill all of `view` (a writable byte view) with the file's bytes from `offset` on.

        Raises:
            EOFError: the file ends before the view is full (message: the offset where it ended).
            OSError: the read failed.
        """
        done, total = 0, len(view)
        while done < total:
            n = self._read_some(view[done:], offset + done)
            if n <= 0:
                raise EOFError(f"unexpected end of file at byte {offset + done}")
            done += n

    def read(self, offset: int, size: int) -> bytes:
        """`size` bytes from `offset` (EOFError if the file is shorter)."""
        buf = bytearray(size)
        self.readinto(memoryview(buf), offset)
        return bytes(buf)

    def _read_some(self, view: memoryview, offset: int) -> int:
        if self.strategy == "pread":
            if _PREADV is not None:
                return _PREADV(self.fd, [view], offset)
            assert _PREAD is not None  # NATIVE, checked in __init__: preadv or pread exists
            data = _PREAD(self.fd, len(view), offset)
            view[: len(data)] = data
            return len(data)
        if self.strategy == "locked":
            assert self._file is not None
            with self._lock:
                self._file.seek(offset)
                return self._file.readinto(view) or 0
        if self.strategy == "handles":
            handle = self._thread_handle()
            handle.seek(offset)
            return handle.readinto(view) or 0
        assert self._map is not None
        n = max(0, min(len(view), len(self._map) - offset))
        with memoryview(self._map) as mapped:
            view[:n] = mapped[offset : offset + n]
        return n

    def _thread_handle(self) -> io.FileIO:
        handle = getattr(self._local, "handle", None)
        if handle is None:
            assert self._path is not None
            handle = io.FileIO(self._path, "r")
            mine, theirs = os.fstat(self.fd), os.fstat(handle.fileno())
            if (mine.st_dev, mine.st_ino) != (theirs.st_dev, theirs.st_ino):
                handle.close()
                raise OSError(f"{self._path} was replaced by another file while it was being read")
            with self._lock:
                self._handles.append(handle)
            self._local.handle = handle
        return handle

    # writes ------------------------------------------------------------------------------------------------
    def write(self, view: memoryview, offset: int) -> None:
        """Write all of `view` at `offset` (the descriptor must be open for writing).

        Raises:
            OSError: the write failed (errno ENOSPC for a full disk).
        """
        done, total = 0, len(view)
        while done < total:
            done += self._write_some(view[done:], offset + done)

    def _write_some(self, view: memoryview, offset: int) -> int:
        if self.strategy == "pread":
            assert _PWRITE is not None  # NATIVE, checked in __init__
            return _PWRITE(self.fd, view, offset)
        if self.strategy != "locked":
            raise ValueError(f"the {self.strategy!r} strategy is read-only")
        assert self._file is not None
        with self._lock:
            self._file.seek(offset)
            n = self._file.write(view)
        if not n:
            raise OSError(f"write at byte {offset} made no progress")
        return n

    # lifetime ----------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Release the helpers and close the descriptor (idempotent)."""
        with self._lock:
            handles, self._handles = self._handles, []
        for handle in handles:
            handle.close()
        if self._map is not None:
            self._map.close()
            self._map = None
        if self._file is not None:
            self._file.close()  # closefd=False: only the wrapper
            self._file = None
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)

    def __enter__(self) -> PositionalFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

