"""Streams a plan through three threads: read (prefetch) -> compute -> write.

Memory is bounded by a byte budget on tensors in flight (read but not yet written), independent of model size
and of the number of inputs: the reader blocks when the budget is used up. A single key larger than the budget
is still admitted alone, so the peak is max(budget, largest key's inputs + output).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from mergekit_sdxl.engine.evaluate import KeyEvaluator
from mergekit_sdxl.engine.memory import empty_bytes
from mergekit_sdxl.io.reader import Checkpoint
from mergekit_sdxl.io.signals import critical
from mergekit_sdxl.recipe.nodes import KeyPlan, loads_of

DEFAULT_BUDGET = 512 << 20
_DONE = object()


@dataclass
class Progress:
    """One progress event: keys and bytes done so far, and the totals."""

    keys_done: int
    keys_total: int
    bytes_read: int
    bytes_written: int
    key: str


@dataclass
class RunStats:
    """What a run did."""

    keys: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    clamped: int = 0


class ByteBudget:
    """A counting semaphore over bytes; an item larger than the budget is admitted when nothing else is held."""

    def __init__(self, limit: int) -> None:
        self.limit, self.held = limit, 0
        self._cond = threading.Condition()

    def acquire(self, n: int, stop: threading.Event) -> None:
        with self._cond:
            while self.held and self.held + n > self.limit and not stop.is_set():
                self._cond.wait(0.1)
            self.held += n

    def release(self, n: int) -> None:
        with self._cond:
            self.held -= n
            self._cond.notify_all()


Sink = Callable[[str, torch.Tensor], None]
ReadHook = Callable[[str, str, torch.Tensor], None]


def run_pipeline(keys: Sequence[KeyPlan], readers: Mapping[str, Checkpoint], sink: Sink,
                 make_evaluator: Callable[[], KeyEvaluator], *, workers: int = 1, budget: int = DEFAULT_BUDGET,
                 progress: Callable[[Progress], None] | None = None, on_read: ReadHook | None = None,
                 pin_memory: bool = False) -> RunStats:
    """Evaluate every KeyPlan and hand each output tensor to `sink(name, tensor)` (from the writer thread).

    `workers` compute threads each take whole keys; torch's own intra-op threads are pinned to 1 meanwhile, so
    every element is computed by the same code path whatever the worker count: outputs are bit-identical.
    """
    stats = RunStats(keys=len(keys))
    if progress is not None:  # the total before any work: a progress bar can show it from its first frame
        progress(Progress(0, len(keys), 0, 0, ""))
    stop, limiter = threading.Event(), ByteBudget(budget)
    to_compute: queue.Queue = queue.Queue(maxsize=64)
    to_write: queue.Queue = queue.Queue(maxsize=4)
    errors: list[BaseException] = []
    start = time.perf_counter()

    def reader() -> None:
        try:
            for kp in keys:
                if stop.is_set():
                    return
                leaves = loads_of(kp.node)
                need = sum(readers[leaf.alias].info(leaf.key).nbytes for leaf in leaves)
                limiter.acquire(need, stop)
                loaded = {}
                for leaf in leaves:
                    loaded[leaf] = _read(readers[leaf.alias], leaf.key, pin_memory)
                    if on_read is not None:
                        on_read(leaf.alias, leaf.key, loaded[leaf])
                stats.bytes_read += need
                _put(to_compute, (kp, loaded, need), stop)
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            errors.append(exc)
            stop.set()
        finally:
            _put(to_compute, _DONE, stop, force=True)

    def writer() -> None:
        done = 0
        try:
            while (item := to_write.get()) is not _DONE:
                kp, outputs, held = item
                for name, tensor in outputs.items():
                    sink(name, tensor)
                    stats.bytes_written += tensor.numel() * tensor.element_size()
                limiter.release(held)
                done += 1
                if progress is not None:
                    progress(Progress(done, len(keys), stats.bytes_read, stats.bytes_written, kp.key))
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
            stop.set()
            _drain(to_write)

    evaluators = [make_evaluator() for _ in range(max(1, workers))]
    computers = [threading.Thread(target=_compute_loop, args=(to_compute, to_write, ev, stop, errors),
                                  name=f"mergekit-compute-{i}", daemon=True) for i, ev in enumerate(evaluators)]
    io_threads = [threading.Thread(target=reader, name="mergekit-read", daemon=True),
                  threading.Thread(target=writer, name="mergekit-write", daemon=True)]
    intra_op = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for thread in io_threads + computers:
            thread.start()
        _join(computers)
    except BaseException:
        stop.set()
        raise
    finally:
        # every thread has ended before we return or raise (a stop signal included): a daemon thread still inside
        # torch while the interpreter shuts down can abort the process; each finishes at most its current key
        with critical():
            _put(to_write, _DONE, stop, force=True)
            _join(io_threads + computers)
        torch.set_num_threads(intra_op)
    if errors:
        raise errors[0]
    stats.clamped = sum(ev.clamped for ev in evaluators)
    stats.seconds = time.perf_counter() - start
    return stats


def _join(threads: list[threading.Thread]) -> None:
    """Join with a timeout loop so Ctrl-C reaches the main thread promptly."""
    for thread in threads:
        while thread.is_alive():
            thread.join(0.2)


def _read(reader: Checkpoint, key: str, pin_memory: bool) -> torch.Tensor:
    """A fresh tensor; for a CUDA run, in page-locked memory so the host-to-device copy is asynchronous (torch's
    caching host allocator reuses the pinned blocks once their copies have completed)."""
    if not hasattr(reader, "read_into"):
        return reader.read(key)
    nbytes = reader.info(key).nbytes
    if pin_memory:
        return reader.read_into(key, torch.empty(nbytes, dtype=torch.uint8, pin_memory=True))
    return reader.read_into(key, empty_bytes(nbytes))


def _compute_loop(to_compute: queue.Queue, to_write: queue.Queue, evaluator: KeyEvaluator,
                  stop: threading.Event, errors: list[BaseException]) -> None:
    while True:
        try:  # a timeout, not a blocking get: another worker's _drain may have eaten the _DONE sentinel
            item = to_compute.get(timeout=0.1)
        except queue.Empty:
            if stop.is_set():
                return
            continue
        if item is _DONE:
            to_compute.put(_DONE)  # let the other workers see the end too
            return
        if stop.is_set():
            _drain(to_compute)
            return
        kp, loaded, held = item
        try:
            outputs = evaluator.evaluate(kp, loaded)
        except BaseException as exc:
            errors.append(exc)
            stop.set()
            _drain(to_compute)
            return
        del loaded
        if not _put(to_write, (kp, outputs, held), stop):
            return


def _put(q: queue.Queue, item: object, stop: threading.Event, force: bool = False) -> bool:
    """Put without blocking forever: gives up when `stop` is set (a forced put drains the queue first)."""
    while True:
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            if stop.is_set():
                if not force:
                    return False
                _drain(q)


def _drain(q: queue.Queue) -> None:
    """Empty a queue so a blocked producer can see the stop flag and exit."""
    try:
        while q.get_nowait() is not _DONE:
            pass
    except queue.Empty:
        pass
