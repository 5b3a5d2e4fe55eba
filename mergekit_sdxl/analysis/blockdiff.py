"""Per-block difference between two checkpoints: relative change ||B - A|| / ||A|| and cosine similarity.

Groups are the MBW blocks of `arch.blocks.block_of` (BASE, IN00.., M00, OUT00..; "keep A" for keys no merge
touches), one summary per component, and the parts of each component (`arch.parts`: UNet blocks, CLIP layers, VAE
stages) that the heatmap draws as rows.

Streaming at disk speed: one thread reads the next pair of tensors (A's file order, positional reads, into two
reused buffer pairs) while the caller's thread reduces the current pair; memory is two pairs of the largest
tensors plus two float32 scratch chunks, whatever the model size. Each pair costs one
fp32 conversion of each side and three dot products (||A||², ||B||², ||B-A||², accumulated in float64 per 4096
values), so the arithmetic keeps up with the disk; <A, B> follows from them.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mergekit_sdxl.arch.blocks import DEFAULT_CONVENTION, block_names, block_of
from mergekit_sdxl.arch.detect import component_of, detect_arch
from mergekit_sdxl.arch.parts import part_of
from mergekit_sdxl.errors import ArchError
from mergekit_sdxl.io.reader import open_checkpoint

KEEP_A_LABEL = "keep A"
ROW = 4096  # values per float32 partial dot product (the partials are summed in float64)
SMALL = 1 << 14  # tensors up to this many values are summed in float64 directly
CHUNK = 1 << 22  # values converted to float32 at a time (bounds the temporary memory to ~50 MB)
SLOTS = 2  # buffer pairs: one being reduced while the reader fills the other
PARALLEL = 1 << 20  # tensors from this many values on use every torch thread


@dataclass
class Sums:
    """Running float64 sums of one group of tensors."""

    keys: int = 0
    numel: int = 0
    aa: float = 0.0
    bb: float = 0.0
    dd: float = 0.0

    def add(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Accumulate one pair of tensors (any float dtype, same shape)."""
        self.merge(reduce_pair(a, b))

    def merge(self, other: Sums) -> None:
        self.keys += other.keys
        self.numel += other.numel
        self.aa += other.aa
        self.bb += other.bb
        self.dd += other.dd

    @property
    def ab(self) -> float:
        """<A, B> = (||A||² + ||B||² - ||B - A||²) / 2."""
        return (self.aa + self.bb - self.dd) / 2

    @property
    def relative_change(self) -> float:
        """||B - A|| / ||A|| (inf when A is all zero and B is not)."""
        if self.aa == 0:
            return 0.0 if self.dd == 0 else math.inf
        return math.sqrt(self.dd / self.aa)

    @property
    def cosine(self) -> float:
        """<A, B> / (||A|| ||B||) (1 when both are zero), clamped to [-1, 1].

        Computed as 1 - (||B-A||² - (||A|| - ||B||)²) / (2 ||A|| ||B||), the same value, which keeps 1 - cosine
        accurate for nearly equal models (the norms' rounding cancels in ||A|| - ||B||)."""
        if self.aa == 0 or self.bb == 0:
            return 1.0 if self.aa == self.bb else 0.0
        na, nb = math.sqrt(self.aa), math.sqrt(self.bb)
        return max(-1.0, min(1.0, 1.0 - (self.dd - (na - nb) ** 2) / (2 * na * nb)))


def reduce_pair(a: torch.Tensor, b: torch.Tensor, scratch: tuple[torch.Tensor, torch.Tensor] | None = None) -> Sums:
    """||A||², ||B||², ||B - A||² of one pair, in float32 rows of ROW values summed in float64.

    `scratch`: two float32 buffers of CHUNK values reused across calls (fresh ones would page-fault on every
    chunk: that, not the arithmetic, dominated a full-size run)."""
    a, b = a.reshape(-1), b.reshape(-1)
    xs, ys = scratch if scratch is not None else (torch.empty(CHUNK), torch.empty(CHUNK))
    sums = Sums(1, a.numel())
    for start in range(0, a.numel(), CHUNK):
        n = min(CHUNK, a.numel() - start)
        x, y = xs[:n].copy_(a[start:start + n]), ys[:n].copy_(b[start:start + n])
        sums.aa += _square_sum(x)
        sums.bb += _square_sum(y)
        sums.dd += _square_sum(y.sub_(x))
    return sums


def _square_sum(x: torch.Tensor) -> float:
    """Sum of squares: float32 norms of ROW-value rows, squared and summed in float64. No temporary, ~5 GB/s on one
    core (a float64 sum is 40x slower); relative error ~1e-7 (one float32 dot product over millions of values
    loses ~1e-5)."""
    if x.numel() <= SMALL:
        x64 = x.double()
        return float(torch.dot(x64, x64))
    rows = x.numel() // ROW * ROW
    norms = torch.linalg.vector_norm(x[:rows].view(-1, ROW), dim=1).double()
    total = float(torch.dot(norms, norms))
    if rows < x.numel():
        tail = x[rows:].double()
        total += float(torch.dot(tail, tail))
    return total


@dataclass
class DiffResult:
    """Sums per block, per component and per (component, part), and the keys that could not be compared."""

    arch: str
    blocks: dict[str, Sums]
    components: dict[str, Sums]
    parts: dict[tuple[str, str], Sums] = field(default_factory=dict)
    only_in_a: list[str] = field(default_factory=list)
    only_in_b: list[str] = field(default_factory=list)
    shape_mismatch: list[str] = field(default_factory=list)
    path_a: str = ""
    path_b: str = ""
    convention: str = DEFAULT_CONVENTION
    seconds: float = 0.0
    bytes_read: int = 0

    def rows(self) -> list[dict]:
        """JSON-ready rows: group, kind (block/component/part), keys, params, relative_change, cosine (parts also
        name their component)."""
        out = []
        for kind, groups in (("block", self.blocks), ("component", self.components)):
            for name, s in groups.items():
                if s.keys:
                    out.append(_row(name, kind, s))
        for (component, part), s in self.parts.items():
            if s.keys:
                out.append({**_row(part, "part", s), "component": component})
        return out


def _row(name: str, kind: str, s: Sums) -> dict:
    return {"group": name, "kind": kind, "keys": s.keys, "params": s.numel, "relative_change": s.relative_change,
            "cosine": s.cosine}


def diff_checkpoints(path_a: str | Path, path_b: str | Path, convention: str = DEFAULT_CONVENTION,
                     progress: Callable[[int, int], None] | None = None) -> DiffResult:
    """Compare B against A block by block, streaming both files (see the module docstring)."""
    start = time.perf_counter()
    with open_checkpoint(path_a) as a, open_checkpoint(path_b) as b:
        arch = detect_arch(a.keys(), str(path_a))
        arch_b = detect_arch(b.keys(), str(path_b))
        if arch != arch_b:
            raise ArchError(f"{path_a} is {arch} but {path_b} is {arch_b}: nothing to compare")
        order = [*block_names(arch, convention), KEEP_A_LABEL]
        result = DiffResult(arch, {name: Sums() for name in order}, {}, path_a=str(path_a), path_b=str(path_b),
                            convention=convention)
        keys_b = set(b.keys())
        result.only_in_b = sorted(keys_b - set(a.keys()))
        result.only_in_a = [k for k in a.keys() if k not in keys_b]
        pairs = []
        for key in (k for k in a.keys() if k in keys_b):
            ia, ib = a.info(key), b.info(key)
            if tuple(ia.shape) != tuple(ib.shape):
                result.shape_mismatch.append(key)
            elif math.prod(ia.shape) and _is_float(ia.dtype) and _is_float(ib.dtype):
                pairs.append((key, ia.nbytes + ib.nbytes))
        threads = _Threads()
        scratch = (torch.empty(CHUNK), torch.empty(CHUNK))
        try:
            for i, (key, ta, tb) in enumerate(_read_ahead(a, b, pairs)):
                threads.fit(ta.numel())
                _add(result, key, reduce_pair(ta, tb, scratch))
                result.bytes_read += ta.nbytes + tb.nbytes
                if progress is not None:
                    progress(i + 1, len(pairs))
        finally:
            threads.restore()
    result.seconds = time.perf_counter() - start
    return result


class _Threads:
    """One torch thread for small tensors, all of them for large ones: on small tensors a parallel region costs
    more in thread hand-offs than it saves (milliseconds each on a loaded machine: 2,500 small keys took 30 s)."""

    def __init__(self) -> None:
        self.full = self.now = torch.get_num_threads()

    def fit(self, numel: int) -> None:
        want = self.full if numel >= PARALLEL else 1
        if want != self.now:
            torch.set_num_threads(want)
            self.now = want

    def restore(self) -> None:
        if self.now != self.full:
            torch.set_num_threads(self.full)
            self.now = self.full


def _is_float(code: str) -> bool:
    from mergekit_sdxl.dtypes import is_float

    return is_float(code)


def _add(result: DiffResult, key: str, sums: Sums) -> None:
    arch, convention = result.arch, result.convention
    result.blocks.setdefault(block_of(key, arch, convention) or KEEP_A_LABEL, Sums()).merge(sums)
    result.components.setdefault(component_of(key, arch), Sums()).merge(sums)
    result.parts.setdefault(part_of(key, arch, convention), Sums()).merge(sums)


def _read_ahead(a: Any, b: Any, pairs: list[tuple[str, int]]) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
    """Yield (key, A tensor, B tensor) in order while a thread reads the next pair into the other of SLOTS
    reusable buffer pairs (sized to the largest tensors: allocated once, no page faults per tensor). The tensors
    yielded are valid until the next one is asked for."""
    items: queue.Queue = queue.Queue()
    free: queue.Queue = queue.Queue()
    reusable = hasattr(a, "read_into") and hasattr(b, "read_into")
    if reusable and pairs:
        size_a = max(a.info(key).nbytes for key, _ in pairs)
        size_b = max(b.info(key).nbytes for key, _ in pairs)
        for _ in range(SLOTS):
            free.put((torch.empty(size_a, dtype=torch.uint8), torch.empty(size_b, dtype=torch.uint8)))
    else:
        for _ in range(SLOTS):
            free.put(None)
    stop = threading.Event()

    def reader() -> None:
        try:
            for key, _ in pairs:
                slot = free.get()
                if stop.is_set():
                    return
                if slot is None:
                    items.put((key, a.read(key), b.read(key), slot))
                else:
                    items.put((key, a.read_into(key, slot[0]), b.read_into(key, slot[1]), slot))
            items.put(None)
        except BaseException as exc:  # handed to the consumer, which re-raises it
            items.put(exc)

    thread = threading.Thread(target=reader, name="blockdiff-reader", daemon=True)
    thread.start()
    try:
        while True:
            item = items.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            key, ta, tb, slot = item
            yield key, ta, tb
            del ta, tb, item
            free.put(slot)
    finally:
        stop.set()
        for _ in range(SLOTS):
            free.put(None)
        thread.join(timeout=30)
