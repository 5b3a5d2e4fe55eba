"""Per-block difference between two checkpoints: relative change ||B - A|| / ||A|| and cosine similarity.

Groups are the MBW blocks of `arch.blocks.block_of` (BASE, IN00.., M00, OUT00..; "keep A" for keys no merge
touches), one summary per component, and the parts of each component (`arch.parts`: UNet blocks, CLIP layers, VAE
stages) that the heatmap draws as rows.

Streaming at disk speed (benchmarks/RESULTS.md, "Diff"): one thread reads the next piece of both files (PART
values of a tensor, positional reads into a few small reused buffers) while the caller's thread reduces the
current one, so each value is converted while it is still in the CPU cache; memory is a few MB whatever the model
size. Each piece costs one float32 conversion of each side, one subtraction and three sums of squares
(||A||², ||B||², ||B - A||²: float32 norms of ROW-value rows, squared and summed in float64), in CHUNK-value
steps that fit the L2 cache, on one torch thread. <A, B> follows from them. The difference is computed, not
derived from ||A||² + ||B||² - 2<A, B>: for nearly equal models that identity cancels away the float32 sums'
rounding (1e-7 of ||A||²) and with it the digits the report is about.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mergekit_sdxl.arch.blocks import DEFAULT_CONVENTION, block_names, block_of
from mergekit_sdxl.arch.detect import component_of, detect_arch
from mergekit_sdxl.arch.parts import part_of
from mergekit_sdxl.dtypes import is_float, itemsize
from mergekit_sdxl.errors import ArchError
from mergekit_sdxl.io.dtypes import is_marker, scale_key, scaled_key_of
from mergekit_sdxl.io.reader import open_checkpoint

KEEP_A_LABEL = "keep A"
ROW = 1024  # values per float32 norm (the squared norms are summed in float64): relative error ~5e-8
SMALL = 1 << 14  # pieces up to this many values are summed in float64 directly (cheaper than the row set-up)
CHUNK = 1 << 17  # values converted to float32 at a time: 2 x 512 KB, in the L2 cache with the piece they come from
PART = 1 << 19  # values read per tensor piece (1 MB of fp16 per file): still in the cache when reduced
SLOTS = 3  # buffer pairs: the reader fills some while the caller reduces another


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


class Scratch:
    """Buffers `accumulate` reuses across calls (fresh ones would page-fault on every piece): both sides of CHUNK
    values in float32, and the row norms of one chunk."""

    def __init__(self) -> None:
        self.step = max(ROW, CHUNK // ROW * ROW)  # whole rows per chunk
        self.xy = torch.empty(2, self.step)
        self.norms = torch.empty(3, self.step // ROW)


def reduce_pair(a: torch.Tensor, b: torch.Tensor, scratch: Scratch | None = None) -> Sums:
    """||A||², ||B||², ||B - A||² of one pair of tensors (any float dtypes, same number of values)."""
    sums = Sums(1)
    accumulate(sums, a, b, scratch or Scratch())
    return sums


def accumulate(sums: Sums, a: torch.Tensor, b: torch.Tensor, scratch: Scratch) -> None:
    """Add the values of `a` and `b` (a piece of one tensor pair) to `sums`: numel, ||A||², ||B||², ||B - A||².

    Per CHUNK values: both sides converted to float32 side by side, one norm call for the ROW-value rows of both,
    an in-place subtraction and the rows' norms of the difference; the squared norms are summed in float64
    (relative error ~5e-8; one float32 sum over a chunk would lose ~1e-6, float64 arithmetic costs 10x). Few,
    large torch calls: each call's dispatch costs about as much as converting 10,000 values."""
    a, b = a.reshape(-1), b.reshape(-1)
    total = a.numel()
    sums.numel += total
    body = 0 if total <= SMALL else total // ROW * ROW
    acc = torch.zeros(3, dtype=torch.float64)
    for start in range(0, body, scratch.step):
        n = min(scratch.step, body - start)
        xy, norms = scratch.xy[:, :n], scratch.norms[:, :n // ROW]
        xy[0].copy_(a[start:start + n])
        xy[1].copy_(b[start:start + n])
        torch.linalg.vector_norm(xy.view(2, -1, ROW), dim=2, out=norms[:2])
        torch.linalg.vector_norm(xy[1].sub_(xy[0]).view(-1, ROW), dim=1, out=norms[2])
        acc += norms.double().square_().sum(dim=1)
    if body < total:  # the last values (fewer than a row), or a small piece: float64 throughout
        x, y = a[body:].double(), b[body:].double()
        acc += torch.stack([x @ x, y @ y, (y - x) @ (y - x)])
    aa, bb, dd = acc.tolist()
    sums.aa += aa
    sums.bb += bb
    sums.dd += dd


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
    cpu_seconds: float = 0.0  # this process's CPU time (all threads) during the comparison
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
    start, cpu = time.perf_counter(), time.process_time()
    with open_checkpoint(path_a) as a, open_checkpoint(path_b) as b:
        arch = detect_arch(a.keys(), str(path_a))
        arch_b = detect_arch(b.keys(), str(path_b))
        if arch != arch_b:
            raise ArchError(f"{path_a} is {arch} but {path_b} is {arch_b}: nothing to compare")
        order = [*block_names(arch, convention), KEEP_A_LABEL]
        result = DiffResult(arch, {name: Sums() for name in order}, {}, path_a=str(path_a), path_b=str(path_b),
                            convention=convention)
        keys_a, keys_b = _weights(a), _weights(b)  # scaled fp8: its scales and marker are not weights
        result.only_in_b = sorted(set(keys_b) - set(keys_a))
        result.only_in_a = [k for k in keys_a if k not in keys_b]
        pairs = _comparable(a, b, [k for k in keys_a if k in keys_b], result.shape_mismatch)
        with _one_thread():
            _reduce_all(result, _read_ahead(a, b, pairs), len(pairs), progress)
    result.seconds, result.cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    return result


def _weights(reader: Any) -> list[str]:
    """The reader's keys less scaled-fp8 bookkeeping: markers, and `<x>.scale_weight` beside an `<x>.weight`."""
    keys = reader.keys()
    present = set(keys)
    return [k for k in keys if not is_marker(k) and scaled_key_of(k) not in present]


def _scale(reader: Any, present: set[str], key: str) -> float | None:
    """The per-tensor scale of a scaled-fp8 weight (the value is stored / scale), else None."""
    if not key.endswith(".weight") or scale_key(key) not in present:
        return None
    return float(reader.read(scale_key(key)).float().reshape(-1)[0])


def _comparable(a: Any, b: Any, keys: list[str], shape_mismatch: list[str]) -> list[Pair]:
    """The keys in both files with the same shape, some values and float dtypes on both sides, as read jobs;
    keys whose shapes differ go to `shape_mismatch`."""
    pairs = []
    present_a, present_b = set(a.keys()), set(b.keys())
    for key in keys:
        ia, ib = a.info(key), b.info(key)
        if tuple(ia.shape) != tuple(ib.shape):
            shape_mismatch.append(key)
        elif math.prod(ia.shape) and is_float(ia.dtype) and is_float(ib.dtype):
            pairs.append(Pair(key, math.prod(ia.shape), ia.nbytes + ib.nbytes, _scale(a, present_a, key),
                              _scale(b, present_b, key)))
    return pairs


def _reduce_all(result: DiffResult, pieces: Iterator[Piece], total: int,
                progress: Callable[[int, int], None] | None) -> None:
    """Sum the pieces key by key; each key's sums go to its block, component and part once its last piece is in."""
    scratch = Scratch()
    sums, done = Sums(1), 0
    for pair, ta, tb, last in pieces:
        accumulate(sums, ta, tb, scratch)
        if last:
            _add(result, pair.key, sums)
            result.bytes_read += pair.nbytes
            sums, done = Sums(1), done + 1
            if progress is not None:
                progress(done, total)


@contextmanager
def _one_thread() -> Iterator[None]:
    """Reduce on one torch thread: the pieces are cache-sized, so a parallel region would cost more in thread
    hand-offs than it saves (on a loaded 2-core machine two threads made a full SD1.5 diff 4x the CPU time and
    3x the wall time), and the other core serves the reader's copies from the page cache."""
    before = torch.get_num_threads()
    if before != 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if before != 1:
            torch.set_num_threads(before)


def _add(result: DiffResult, key: str, sums: Sums) -> None:
    arch, convention = result.arch, result.convention
    result.blocks.setdefault(block_of(key, arch, convention) or KEEP_A_LABEL, Sums()).merge(sums)
    result.components.setdefault(component_of(key, arch), Sums()).merge(sums)
    result.parts.setdefault(part_of(key, arch, convention), Sums()).merge(sums)


@dataclass(frozen=True)
class Pair:
    """One key to compare: its number of values and the bytes it takes in both files."""

    key: str
    numel: int
    nbytes: int
    scale_a: float | None = None  # scaled fp8: the stored values times this are the weights
    scale_b: float | None = None


Piece = tuple[Pair, torch.Tensor, torch.Tensor, bool]


def _read_ahead(a: Any, b: Any, pairs: list[Pair]) -> Iterator[Piece]:
    """Yield (pair, piece of A, piece of B, last piece of this key?) in order while a thread reads the next
    pieces into the other buffer pairs. The pieces yielded are valid until the next one is asked for."""
    items: queue.Queue = queue.Queue()
    free: queue.Queue = queue.Queue()
    for _ in range(SLOTS):
        free.put(_slot(a, b, pairs))
    stop = threading.Event()

    def take() -> Any:
        slot = free.get()
        if slot is _STOP or stop.is_set():
            raise _Stopped
        return slot

    def reader() -> None:
        try:
            for pair in pairs:
                for piece in _pieces(a, b, pair, take):
                    items.put(piece)
            items.put(None)
        except _Stopped:
            return
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
            pair, ta, tb, last, slot = item
            yield pair, ta, tb, last
            del ta, tb, item
            free.put(slot)
    finally:
        stop.set()
        for _ in range(SLOTS):
            free.put(_STOP)
        thread.join(timeout=30)


def _slot(a: Any, b: Any, pairs: list[Pair]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """One reusable buffer pair for PART values of either file (None where a reader reads whole tensors only)."""
    if not (hasattr(a, "read_part_into") and hasattr(b, "read_part_into")) or not pairs:
        return None
    size_a = max(itemsize(a.info(p.key).dtype) for p in pairs)
    size_b = max(itemsize(b.info(p.key).dtype) for p in pairs)
    return torch.empty(PART * size_a, dtype=torch.uint8), torch.empty(PART * size_b, dtype=torch.uint8)


def _pieces(a: Any, b: Any, pair: Pair, take: Callable[[], Any]) -> Iterator[tuple[Any, ...]]:
    """The pieces of one key: PART values at a time into free buffer pairs (`take` waits for one), or the whole
    tensors where a reader has no partial reads (.ckpt, diffusers folders). Each item carries its slot, which the
    consumer hands back."""
    slot = take()
    if slot is None:
        yield pair, _scaled(a.read(pair.key), pair.scale_a), _scaled(b.read(pair.key), pair.scale_b), True, None
        return
    for first in range(0, pair.numel, PART):
        if first:
            slot = take()
        count = min(PART, pair.numel - first)
        ta = _scaled(a.read_part_into(pair.key, first, count, slot[0]), pair.scale_a)
        tb = _scaled(b.read_part_into(pair.key, first, count, slot[1]), pair.scale_b)
        yield pair, ta, tb, first + count == pair.numel, slot


def _scaled(piece: torch.Tensor, scale: float | None) -> torch.Tensor:
    """A piece of a scaled-fp8 weight dequantized (a float32 copy, as every reader here dequantizes it)."""
    return piece if scale is None else piece.float().mul_(scale)


class _Stopped(Exception):
    """The consumer stopped early: the reader thread ends."""


_STOP = object()
