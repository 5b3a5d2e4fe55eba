"""Asking whether a process still runs, on POSIX and on Windows.

On POSIX that is `os.kill(pid, 0)`. On Windows the same call is anything but a question: signal 0 is
`CTRL_C_EVENT`, so `os.kill(pid, 0)` sends Ctrl-C to the console process group `pid` (any other number
terminates the process). Windows therefore asks the kernel: OpenProcess, then a zero-timeout wait on the handle.
"""

from __future__ import annotations

import os
import sys
from typing import Any

_SYNCHRONIZE = 0x00100000
_PROCESS_QUERY_LIMITED_INFORMATION = 0x1000
_ERROR_ACCESS_DENIED = 5
_WAIT_TIMEOUT = 0x102


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs now (a process we may not signal counts as running)."""
    if pid <= 0:
        return False
    if sys.platform == "win32":
        return _windows_pid_alive(pid, _kernel32())
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return pid < 2**31
    return True


def _kernel32() -> Any:  # noqa: ANN401 - ctypes.WinDLL exists only on Windows
    import ctypes
    from ctypes import wintypes

    k32 = ctypes.WinDLL("kernel32", use_last_error=True)  # type: ignore[attr-defined, unused-ignore]  # typeshed: Windows only
    k32.OpenProcess.argtypes = [wintypes.DWORD, wintypes.BOOL, wintypes.DWORD]
    k32.OpenProcess.restype = wintypes.HANDLE
    k32.WaitForSingleObject.argtypes = [wintypes.HANDLE, wintypes.DWORD]
    k32.WaitForSingleObject.restype = wintypes.DWORD
    k32.CloseHandle.argtypes = [wintypes.HANDLE]
    k32.get_last_error = ctypes.get_last_error  # type: ignore[attr-defined, unused-ignore]  # typeshed: Windows only
    return k32


def _windows_pid_alive(pid: int, k32: Any) -> bool:  # noqa: ANN401
    """`pid_alive` through kernel32 (passed in, so tests can run it anywhere with a stand-in)."""
    if pid >= 2**32:
        return False
    handle = k32.OpenProcess(_SYNCHRONIZE | _PROCESS_QUERY_LIMITED_INFORMATION, False, pid)
    if not handle:
        return k32.get_last_error() == _ERROR_ACCESS_DENIED  # exists, but not ours; else: no such process
    try:
        return k32.WaitForSingleObject(handle, 0) == _WAIT_TIMEOUT  # still running; 0 = it has exited
    finally:
        k32.CloseHandle(handle)


# Windows system error codes for "the file is in use": access denied (e.g. replacing a file another program maps,
# as A1111 and ComfyUI do with a loaded model), sharing violation, lock violation.
_IN_USE = {5, 32, 33}


def in_use_by_another_program(exc: OSError) -> bool:
    """Whether a rename/replace/remove failed because another program has the file open (Windows' rules: a file
    that is open elsewhere can be neither replaced nor removed; POSIX has no such failure)."""
    return getattr(exc, "winerror", None) in _IN_USE


def replace_failure(exc: OSError, target: str | os.PathLike[str]) -> str:
    """One line for a failed commit rename onto `target` that says what to do about it."""
    if in_use_by_another_program(exc):
        return (f"{target}: cannot be replaced: another program has it open (a model loaded in A1111, Forge or "
                "ComfyUI, a file browser's preview?); close it there and run again, or write to another name")
    return f"{target}: finishing the file failed: {exc.strerror or exc}"
