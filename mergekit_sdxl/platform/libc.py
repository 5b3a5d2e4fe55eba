"""glibc's malloc tuning and Linux's madvise, used only where they exist (never required).

`mallopt` exists only in glibc (musl has a stub that refuses everything; macOS and Windows have none), and
`MADV_HUGEPAGE` only on Linux. Every function here answers False when the call is unavailable or refused, so
callers treat it as the optimisation it is. Symbols are looked up in the running process (`dlopen(NULL)`), which
avoids `ctypes.util.find_library`'s helper processes.
"""

from __future__ import annotations

import ctypes
import functools
import sys
from typing import Any

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8
MADV_HUGEPAGE = 14  # Linux's value; other systems use 14 for something else or nothing


@functools.cache
def _process_symbols() -> ctypes.CDLL | None:
    if sys.platform == "win32":
        return None
    try:
        return ctypes.CDLL(None)
    except OSError:
        return None


def _symbol(name: str) -> Any:  # noqa: ANN401 - a ctypes function pointer
    lib = _process_symbols()
    if lib is None:
        return None
    try:
        return getattr(lib, name)
    except AttributeError:
        return None


def is_glibc() -> bool:
    """True when this process runs on glibc (the only libc whose `mallopt` settings are known to help)."""
    return sys.platform.startswith("linux") and _symbol("gnu_get_libc_version") is not None


def mallopt(param: int, value: int) -> bool:
    """glibc's `mallopt(param, value)`; False where glibc is absent or the setting is refused."""
    if not is_glibc():
        return False
    fn = _symbol("mallopt")
    return fn is not None and fn(param, value) == 1


@functools.cache
def _madvise() -> Any:  # noqa: ANN401 - a ctypes function pointer
    if not sys.platform.startswith("linux"):
        return None
    fn = _symbol("madvise")
    if fn is not None:
        fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return fn


def can_advise_hugepages() -> bool:
    """Whether `advise_hugepages` can do anything here (Linux with `madvise`)."""
    return _madvise() is not None


def advise_hugepages(address: int, length: int) -> bool:
    """Ask Linux to back [address, address + length) with transparent huge pages (page-aligned range)."""
    fn = _madvise()
    return fn is not None and fn(address, length, MADV_HUGEPAGE) == 0


@functools.cache
def renameat2() -> Any:  # noqa: ANN401 - a ctypes function pointer
    """Linux's `renameat2(olddirfd, oldpath, newdirfd, newpath, flags)` (glibc >= 2.28), or None: io/commit.py's
    atomic no-clobber rename (RENAME_NOREPLACE) and folder swap (RENAME_EXCHANGE). Looked up in a handle that keeps
    errno (`ctypes.get_errno()` after a call)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn
