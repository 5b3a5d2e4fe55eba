"""The one rich Console (stderr, markup off) and the progress helper every command uses."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

# markup=False: prompts like "[abstract]" and paths like "models/[v2]" must print verbatim; soft_wrap: a message
# stays one line (rich would break it at 80 columns on a pipe or file).
console = Console(stderr=True, markup=False, highlight=False, soft_wrap=True)
_state = {"quiet": False, "verbose": False, "debug": False}


def configure(quiet: bool = False, verbose: bool = False, debug: bool = False) -> None:
    """Set the global verbosity flags from the group options."""
    _state.update(quiet=quiet, verbose=verbose, debug=debug)


def is_debug() -> bool:
    """True when --debug (or MERGEKIT_DEBUG=1) asks for tracebacks."""
    return _state["debug"] or os.environ.get("MERGEKIT_DEBUG") == "1"


def info(message: str) -> None:
    """Print a status line on stderr unless --quiet."""
    if not _state["quiet"]:
        console.print(message)


def verbose(message: str) -> None:
    """Print only with --verbose."""
    if _state["verbose"] and not _state["quiet"]:
        console.print(message)


def _bar_shown() -> bool:
    """A live bar only on a terminal: on a pipe or file it is noise, and rich ends even a transient one with an empty
    line there."""
    return not _state["quiet"] and console.is_terminal


@contextlib.contextmanager
def byte_progress(description: str, total: int) -> Iterator[Callable[[int], None]]:
    """Yield `advance(n_bytes)`; shows a transient bar of `total` bytes on a terminal's stderr (nothing with --quiet,
    when stderr is not a terminal, or when there is no total)."""
    if not _bar_shown() or total <= 0:
        yield lambda n: None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
               TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task(description, total=total)
        yield lambda n: progress.advance(task, n)


@contextlib.contextmanager
def key_progress(description: str) -> Iterator[Callable[[int, int, int], None]]:
    """Yield `update(done, total, n_bytes)` driving a transient keys/bytes/throughput bar on a terminal's stderr.

    The bar appears with the first update, which carries the total (the engine sends `done = 0` once the plan is
    known), so it never shows an open-ended bar.
    """
    if not _bar_shown():
        yield lambda done, total, n: None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} keys"),
               TextColumn("{task.fields[gb]:.2f} GB"), TextColumn("{task.fields[rate]:.2f} GB/s"),
               TimeRemainingColumn())
    import time

    start = time.perf_counter()
    with Progress(*columns, console=console, transient=True) as progress:
        tasks: list[TaskID] = []

        def update(done: int, total: int, n_bytes: int) -> None:
            elapsed = max(time.perf_counter() - start, 1e-6)
            if not tasks:
                tasks.append(progress.add_task(description, total=total, gb=0.0, rate=0.0))
            progress.update(tasks[0], completed=done, gb=n_bytes / 1e9, rate=n_bytes / 1e9 / elapsed)
        yield update


@contextlib.contextmanager
def api_progress() -> Iterator[Callable[[Any], None]]:
    """Yield a `progress=` callback for mergekit_sdxl.api calls that draws their `ProgressEvent`s as the bars above.

    API tasks run one after another, so a new task name closes the previous task's bar (rich allows one live
    display at a time)."""
    with contextlib.ExitStack() as outer:
        state: dict[str, Any] = {"task": None, "done": 0, "bar": None, "stack": None}

        def on(event: Any) -> None:
            if event.task != state["task"]:
                if state["stack"] is not None:
                    state["stack"].close()
                state["stack"] = outer.enter_context(contextlib.ExitStack())
                bar = byte_progress(event.task, event.total) if event.unit == "bytes" else key_progress(event.task)
                state.update(task=event.task, done=0, bar=state["stack"].enter_context(bar))
            if event.unit == "bytes":
                state["bar"](event.done - state["done"])
                state["done"] = event.done
            else:
                state["bar"](event.done, event.total, event.nbytes)
        yield on
