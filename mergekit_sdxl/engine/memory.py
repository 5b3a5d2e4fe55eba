"""Keep the process's resident memory close to what is alive.

glibc's malloc raises its mmap threshold dynamically after large frees, after which tensors of tens of MB come
from per-thread heap arenas and are not returned to the OS when freed: a streaming merge's RSS then creeps up to
several times its live data. Fixing the threshold (4 MiB) makes every tensor-sized block an mmap that is unmapped
on free, and capping the arenas limits fragmentation across the reader/compute/writer threads.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8


@functools.cache
def tame_malloc() -> bool:
    """Apply the settings once per process (glibc only); returns whether they were applied."""
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    ok = mallopt(_M_MMAP_THRESHOLD, 4 << 20) == 1
    ok &= mallopt(_M_TRIM_THRESHOLD, 8 << 20) == 1
    ok &= mallopt(_M_ARENA_MAX, 4) == 1
    return bool(ok)
