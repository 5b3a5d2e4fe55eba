"""Stop signals: SIGINT (Ctrl-C), SIGTERM (service managers, containers, `kill`) and SIGHUP (a closed terminal) all
end a run the same way, and the moment an output is committed is atomic with respect to them.

- `handling()` (the CLI wraps every command in it) installs one handler for the three signals: it raises
  `Interrupted` (a KeyboardInterrupt, so every `except BaseException` cleanup path removes its temporary file) in
  the main thread. The CLI turns it into one line and exit code 128 + signal number (130, 143, 129).
- `critical()` marks a section that must not be cut in half (the rename that commits an output, the removal of a
  temporary file): a signal arriving inside is held and takes effect when the section ends. A section that
  committed an output calls `note_committed`; from then on the run counts as done, and a stop signal that arrives
  later is only recorded (`late_signal`): the command finishes its report and exits 0, so "interrupted" is never
  reported for an output that landed, and no KeyboardInterrupt can surface as an "Exception ignored" message.

Outside `handling()` (library use) nothing is installed and `critical()` still defers signals whose handler is
ours. Which signals exist is platform/signals.py's business (no SIGHUP on Windows; Ctrl-Break there is SIGBREAK,
handled like Ctrl-C).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

from mergekit_sdxl.platform.signals import console_interrupts, stop_signals

STOP_SIGNALS: list[int] = stop_signals()  # SIGINT (+ SIGBREAK on Windows), SIGTERM, SIGHUP where they exist
_CONSOLE = set(console_interrupts())


class Interrupted(KeyboardInterrupt):
    """A stop signal arrived; `exit_code` is 128 + the signal number."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.name = signal.Signals(signum).name
        super().__init__(self.name)

    @property
    def exit_code(self) -> int:
        """128 + the signal number; 130 for the console's interrupt keys (Ctrl-C, and Ctrl-Break on Windows)."""
        return 130 if self.signum in _CONSOLE else 128 + self.signum


class _State:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Back to the state of a process that has not entered handling() yet."""
        self.active = False  # inside handling()
        self.depth = 0  # nesting of critical sections
        self.pending: int | None = None  # a signal held by a critical section
        self.committed: list[Path] = []
        self.late: int | None = None  # a signal that arrived after an output was committed (or while closing)
        self.closing = False


_state = _State()


def _handler(signum: int, frame: FrameType | None) -> None:
    if _state.committed or _state.closing:
        _state.late = signum
        return
    if _state.depth:
        _state.pending = signum
        return
    raise Interrupted(signum)


@contextlib.contextmanager
def handling(restore: bool = True) -> Iterator[None]:
    """Route SIGINT/SIGTERM/SIGHUP to `Interrupted` for the duration (main thread only; a no-op elsewhere).

    Args:
        restore: put the previous handlers back at the end; False (a process about to exit) ignores the stop
            signals from then on, so nothing can interrupt the interpreter's shutdown: its result is decided and
            reported. (Not our recording handler: Python's finalization resets Python-level handlers to the
            default action, which killed a completed run with exit -15 and no message; ignored signals stay so.)
    """
    if threading.current_thread() is not threading.main_thread() or _state.active:
        yield
        return
    previous = {}
    _state.reset()
    _state.active = True
    try:
        for signum in STOP_SIGNALS:
            previous[signum] = signal.signal(signum, _handler)
        yield
    finally:
        _state.closing = True  # a signal arriving while the old handlers are put back is recorded, not raised
        if restore:
            for signum, old in previous.items():
                signal.signal(signum, old)
            _state.active = False
        else:
            for signum in previous:
                signal.signal(signum, signal.SIG_IGN)


@contextlib.contextmanager
def critical() -> Iterator[None]:
    """A section a stop signal must not cut: a signal arriving inside is raised when it ends (unless the section
    committed an output, or is itself ending with an exception)."""
    _state.depth += 1
    failed = False
    try:
        yield
    except BaseException:
        failed = True
        raise
    finally:
        _state.depth -= 1
        if _state.depth == 0 and _state.pending is not None:
            signum, _state.pending = _state.pending, None
            if _state.committed:
                _state.late = signum
            elif not failed:
                raise Interrupted(signum)


def note_committed(path: str | os.PathLike[str]) -> None:
    """Record that `path` landed: from now on stop signals no longer interrupt the run (see module docstring)."""
    if _state.active:
        _state.committed.append(Path(path))


def committed() -> list[Path]:
    """Outputs committed in this run (inside `handling()`)."""
    return list(_state.committed)


def late_signal() -> str | None:
    """The name of a stop signal that arrived after an output was committed, if any."""
    return signal.Signals(_state.late).name if _state.late is not None else None
