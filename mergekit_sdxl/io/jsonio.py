"""JSON from files the user gives us, read with a size and a nesting limit.

Python's json module recurses once per nesting level, so a header or config nested a few thousand levels deep
raises RecursionError (or worse, recurses later in our own code); a multi-GB `model_index.json` would be read
whole. `loads` checks the size first and the depth with a linear scan before parsing, and turns every failure into
the caller's error class with a one-line message naming the file.
"""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Callable
from typing import Any

from mergekit_sdxl.errors import CheckpointError, MergekitError

MAX_DEPTH = 64
MAX_CONFIG_BYTES = 4 << 20  # model_index.json, config.json, shard indexes, manifests
_BRACKETS = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]', re.S)


def depth_of(raw: bytes) -> int:
    """The deepest nesting of `[`/`{` in JSON text (brackets inside strings ignored); linear time."""
    depth = deepest = 0
    for match in _BRACKETS.finditer(raw):
        token = match.group()
        if token in (b"[", b"{"):
            depth += 1
            deepest = max(deepest, depth)
        elif token in (b"]", b"}"):
            depth -= 1
    return deepest


def loads(raw: bytes | str, what: str, *, max_bytes: int = MAX_CONFIG_BYTES, max_depth: int = MAX_DEPTH,
          error: type[MergekitError] = CheckpointError,
          object_pairs_hook: Callable[[list[tuple[str, Any]]], Any] | None = None) -> Any:
    """Parse JSON text; `error` naming `what` if it is too large, too deep, not UTF-8 or not JSON."""
    data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else bytes(raw)
    if len(data) > max_bytes:
        raise error(f"{what}: {len(data)} bytes of JSON; the limit is {max_bytes}")
    if depth_of(data) > max_depth:
        raise error(f"{what}: JSON nests deeper than {max_depth} levels")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{what}: not valid UTF-8 ({exc.reason})") from None
    try:
        return json.loads(text, object_pairs_hook=object_pairs_hook)
    except (ValueError, RecursionError) as exc:
        raise error(f"{what}: not valid JSON: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") \
            from None


def load_file(path: str | os.PathLike[str], *, max_bytes: int = MAX_CONFIG_BYTES, max_depth: int = MAX_DEPTH,
              error: type[MergekitError] = CheckpointError) -> Any:
    """Read and parse a small JSON file (at most `max_bytes` are read, whatever the file's size)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except OSError as exc:
        raise error(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # a FIFO or device would block or never end
            raise error(f"{path}: is not a regular file")
        with open(fd, "rb", closefd=False) as f:
            raw = f.read(max_bytes + 1)
    except OSError as exc:
        raise error(f"{path}: cannot read: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    return loads(raw, str(path), max_bytes=max_bytes, max_depth=max_depth, error=error)
