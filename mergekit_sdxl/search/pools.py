"""Where trials run: in this process (`LocalPool`), or on Ray actors, one per GPU or CPU process (`RayPool`).

Both offer the same three calls: `submit(slot, method, *args)` on worker `slot`, `wait()` for the next finished
call as (slot, result or the exception it raised), and `close()`. Only the process that drives the study talks to
the storage; workers evaluate and return data, so any number of GPUs (a Ray cluster, `--ray-address`) searches
one study, and a SQLite file is never written by two processes.
"""

from __future__ import annotations

import os
from collections import deque
from typing import Any

from mergekit_sdxl.errors import UsageError
from mergekit_sdxl.search.worker import TrialWorker, WorkerSetup

RAY_OBJECT_STORE = 128 << 20  # a local Ray moves PNG bytes only: keep its shared memory small


class LocalPool:
    """One worker in this process; calls run when submitted."""

    size = 1

    def __init__(self, setup: WorkerSetup) -> None:
        self.worker = TrialWorker(setup)
        self.workers = [self.worker.name]
        self._done: deque[tuple[int, Any]] = deque()

    def submit(self, slot: int, method: str, *args: Any) -> None:
        try:
            result: Any = getattr(self.worker, method)(*args)
        except Exception as exc:  # noqa: BLE001 - handed to the driver, which records the trial and re-raises
            result = exc
        self._done.append((slot, result))

    def wait(self) -> tuple[int, Any]:
        return self._done.popleft()

    def close(self) -> None:
        self.worker.close()


class RayPool:
    """`size` Ray actors, each a TrialWorker (inputs opened once per actor); Ray started locally when needed."""

    def __init__(self, setup: WorkerSetup, size: int, address: str | None = None) -> None:
        try:
            import ray
        except ImportError as exc:
            raise UsageError("--workers/--ray-address need Ray: pip install 'mergekit-sdxl[search]'") from exc
        self._ray = ray
        self._started = False
        if not ray.is_initialized():
            _start_ray(ray, size, address)
            self._started = address in (None, "local")
        gpus = int(ray.cluster_resources().get("GPU", 0))
        if gpus and gpus < size:
            raise UsageError(f"--workers {size}: the Ray cluster has {gpus} GPU(s); one trial runs per GPU")
        cpus = max(1, (os.cpu_count() or 1) // size) if not gpus else None
        if cpus is not None and setup.threads is None:
            from dataclasses import replace

            setup = replace(setup, threads=cpus)
        actor = ray.remote(num_gpus=1 if gpus else 0, num_cpus=1 if not gpus else 0)(_RayWorker)
        # Any: Ray's types do not model the `.remote` that an actor handle's methods gain at runtime
        self.actors: list[Any] = [actor.remote(setup) for _ in range(size)]
        self.size = size
        self._pending: dict[Any, int] = {}
        try:
            self.workers = ray.get([a.name.remote() for a in self.actors])
        except ray.exceptions.RayError as exc:  # a worker could not start (missing files, bad space ...)
            self.close()
            raise _cause(exc) from exc

    def submit(self, slot: int, method: str, *args: Any) -> None:
        self._pending[self.actors[slot].call.remote(method, *args)] = slot

    def wait(self) -> tuple[int, Any]:
        ray = self._ray
        ready, _ = ray.wait(list(self._pending), num_returns=1)
        slot = self._pending.pop(ready[0])
        try:
            return slot, ray.get(ready[0])
        except ray.exceptions.RayTaskError as exc:
            return slot, _cause(exc)
        except ray.exceptions.RayError as exc:  # a worker died (out of memory, node lost)
            return slot, RuntimeError(f"Ray worker {slot} failed: {exc}")

    def close(self) -> None:
        for actor in getattr(self, "actors", []):
            self._ray.kill(actor)
        if self._started:
            self._ray.shutdown()


class _RayWorker:
    """The actor: a TrialWorker built in the actor's process."""

    def __init__(self, setup: WorkerSetup) -> None:
        self.worker = TrialWorker(setup)

    def name(self) -> str:
        return self.worker.name

    def call(self, method: str, *args: Any) -> Any:
        return getattr(self.worker, method)(*args)


def _start_ray(ray: Any, size: int, address: str | None) -> None:
    if address and address != "local":
        ray.init(address=address, log_to_driver=False)
        return
    # a private local Ray: as many CPU slots as workers, no dashboard, a small object store, quiet logs
    ray.init(num_cpus=max(size, 1), num_gpus=_local_gpus(), include_dashboard=False,
             object_store_memory=RAY_OBJECT_STORE, log_to_driver=False, configure_logging=False)


def _local_gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - no CUDA runtime: no GPUs
        return 0


def _cause(exc: Any) -> BaseException:
    """The exception a worker raised (Ray wraps it), else a one-line RuntimeError naming what Ray said."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException):
        return cause
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return RuntimeError(f"Ray worker failed: {lines[-1] if lines else type(exc).__name__}")
