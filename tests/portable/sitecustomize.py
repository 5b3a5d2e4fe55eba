"""The portability test mode: run Python as if on Windows/macOS as far as the project's code can tell.

Put this folder first on PYTHONPATH and set MERGEKIT_TEST_HIDE_POSIX=1: every Python process started that way
(pytest and every child it spawns) imports this module at start-up, before any project module, and loses

- `os.pread`, `os.preadv`, `os.pwrite`, `os.pwritev` (absent on Windows; `preadv` absent on macOS < 11),
  `os.posix_fallocate` (absent on Windows and macOS);
- `signal.SIGHUP` (absent on Windows);
- glibc's symbols, looked up through ctypes (`mallopt`, `malloc_trim`, `gnu_get_libc_version`, `madvise`,
  `renameat2` ...):
  a lookup fails as it does on macOS or Windows, whose C libraries have none of them.

`tests/conftest.py` checks that the mode took effect when the variable is set, so a run cannot silently test the
normal path instead. `make test-portable` runs the suites in this mode; tests/test_portable.py runs the default
subset of it and compares outputs byte for byte with the normal path.
"""

import os

HIDDEN_OS = ("pread", "preadv", "pwrite", "pwritev", "posix_fallocate")
HIDDEN_SIGNALS = ("SIGHUP",)
HIDDEN_LIBC = frozenset({"mallopt", "malloc_trim", "mallinfo", "mallinfo2", "malloc_info", "gnu_get_libc_version",
                         "gnu_get_libc_release", "madvise", "posix_madvise", "renameat2"})


def _hide() -> None:
    import ctypes
    import signal

    for name in HIDDEN_OS:
        if hasattr(os, name):
            delattr(os, name)
    for name in HIDDEN_SIGNALS:
        if hasattr(signal, name):
            delattr(signal, name)
    lookup = ctypes.CDLL.__getitem__

    def hidden_lookup(self: ctypes.CDLL, name: object) -> object:
        if name in HIDDEN_LIBC:
            raise AttributeError(f"{name} (hidden by the portability test mode)")
        return lookup(self, name)

    ctypes.CDLL.__getitem__ = hidden_lookup  # type: ignore[method-assign]


if os.environ.get("MERGEKIT_TEST_HIDE_POSIX") == "1":
    _hide()
