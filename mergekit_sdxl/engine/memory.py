"""Keep the process's resident memory close to what is alive.

glibc's malloc raises its mmap threshold dynamically after large frees, after which tensors of tens of MB come
from per-thread heap arenas and are not returned to the OS when freed: a streaming merge's RSS then creeps up to
several times its live data. Fixing the threshold (4 MiB) makes every tensor-sized block an mmap that is unmapped
on free, and capping the arenas limits fragmentation across the reader/compute/writer threads.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from mergekit_sdxl.platform import libc

if TYPE_CHECKING:
    import torch

_HUGE_MIN = 4 << 20


@functools.cache
def tame_malloc() -> bool:
    """Apply the settings once per process (glibc only; elsewhere a no-op); returns whether they were applied."""
    ok = libc.mallopt(libc.M_MMAP_THRESHOLD, 4 << 20)
    ok &= libc.mallopt(libc.M_TRIM_THRESHOLD, 8 << 20)
    ok &= libc.mallopt(libc.M_ARENA_MAX, 4)
    return bool(ok)


def empty_bytes(nbytes: int) -> torch.Tensor:
    """An uninitialised uint8 CPU buffer; on Linux, large ones are marked for transparent huge pages before first
    touch.

    A merge fills ~35 GB of fresh buffers (every input tensor, every output): with 4 KiB pages that is ~9 M page
    faults, which measured 2-3x slower than reading into 2 MiB pages on the development machine.
    """
    import torch

    buffer = torch.empty(nbytes, dtype=torch.uint8)
    if nbytes >= _HUGE_MIN and libc.can_advise_hugepages():
        start = (buffer.data_ptr() + 4095) & ~4095
        stop = (buffer.data_ptr() + nbytes) & ~4095
        if stop > start:
            libc.advise_hugepages(start, stop - start)  # advisory: failure just means normal pages
    return buffer


def empty(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """`torch.empty(numel, dtype=dtype)` through `empty_bytes` (huge pages for large tensors)."""
    return empty_bytes(numel * dtype.itemsize).view(dtype)


def limit_arenas(count: int = 1) -> bool:
    """Cap glibc's malloc arenas for threads created from now on (best effort; glibc only).

    Per-thread arenas keep freed memory of thousands of small tensors apart, so a long job that allocates from
    several threads grows RSS well past its live data: a whole-SDXL LoRA extraction peaked at 2.15 GB with the
    default arenas and at 1.42 GB with one.
    """
    return libc.mallopt(libc.M_ARENA_MAX, count)
