"""Which signals stop a run on this OS.

SIGINT (Ctrl-C) exists everywhere. Windows consoles also send SIGBREAK (Ctrl-Break), whose default action ends the
process at once, skipping the cleanup that removes a half-written temporary file: it must be handled like Ctrl-C.
SIGTERM and SIGHUP exist on POSIX (Windows has a SIGTERM that only the C runtime's raise() sends, no SIGHUP).
"""

from __future__ import annotations

import signal


def console_interrupts() -> list[int]:
    """The console's interrupt keys as signals: SIGINT, plus SIGBREAK on Windows."""
    keys: list[int] = [signal.SIGINT]
    if hasattr(signal, "SIGBREAK"):
        keys.append(signal.SIGBREAK)
    return keys


def stop_signals() -> list[int]:
    """Every signal that asks a run to stop and that exists here: the console's, then SIGTERM and SIGHUP."""
    return console_interrupts() + [getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name)]


def handle_console_break() -> None:
    """Make Ctrl-Break (Windows) raise KeyboardInterrupt like Ctrl-C, so cleanup runs (main thread only)."""
    for signum in console_interrupts()[1:]:
        signal.signal(signum, signal.default_int_handler)
