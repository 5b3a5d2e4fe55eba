"""Progress reporting of the API: plain events to a callback, nothing printed.

The API never draws anything; a caller that wants a bar (the CLI draws rich bars on stderr) passes `progress=`
and renders the events itself. Tasks run one after another, so a new `task` name means the previous one ended.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class ProgressEvent:
    """How far one task is.

    Attributes:
        task: what is running, e.g. "merging", "converting a.safetensors", "hashing a.safetensors".
        done: units done so far (cumulative).
        total: units in all (0 when unknown).
        unit: "bytes" or "keys".
        nbytes: for "keys" tasks, bytes read plus written so far.
    """

    task: str
    done: int
    total: int
    unit: str = "bytes"
    nbytes: int = 0


ProgressFn = Callable[[ProgressEvent], None]


def byte_counter(progress: ProgressFn | None, task: str, total: int) -> Callable[[int], None]:
    """An `advance(n_bytes)` callback (what the lower layers call) that reports cumulative events to `progress`."""
    if progress is None:
        return lambda n: None
    done = 0
    progress(ProgressEvent(task, 0, total))

    def advance(n: int) -> None:
        nonlocal done
        done += n
        progress(ProgressEvent(task, done, total))
    return advance


def byte_tasks(progress: ProgressFn | None) -> Callable[[str, int], contextlib.AbstractContextManager[
        Callable[[int], None]]]:
    """A `(label, total) -> context manager yielding advance(n)` factory (analysis.report's form) over `progress`."""
    @contextlib.contextmanager
    def factory(label: str, total: int) -> Iterator[Callable[[int], None]]:
        yield byte_counter(progress, label, total)
    return factory
