"""JSON from files and metadata the user gives us, read with size, nesting and value-count limits: the one home
for reading untrusted JSON (safetensors headers, `model_index.json`, shard indexes, configs, metadata values such
as `sd_merge_models`, peft adapter metadata, our manifests and hash cache).

Python's json module recurses once per nesting level, so a value nested a few thousand levels deep raises
RecursionError (or recurses later in our own code), and a multi-GB `model_index.json` would be read whole. Before
`json.loads` touches the text, its length, nesting depth and number of values are counted in one regex pass
(strings skipped), so a hostile value costs bounded time and memory and fails with one line naming the file.
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
MAX_VALUES = 2_000_000
MAX_CONFIG_BYTES = 4 << 20  # model_index.json, config.json, shard indexes, manifests

# After escaped backslashes and escaped quotes are removed (two C-speed replaces), a string is `"[^"]*"`. Tokens: a
# whole string (skipped), a structural character, or a quote that starts no complete string (invalid JSON: stop).
# One left-to-right pass: a string is consumed whole, so no position is scanned twice.
_TOKENS = re.compile(r'"[^"]*"|[\[\]{},]|"')


def check_shape(text: str, what: str, *, max_depth: int = MAX_DEPTH, max_values: int = MAX_VALUES,
                error: type[MergekitError] = CheckpointError) -> None:
    """Raise `error` if `text` nests deeper than `max_depth`, holds more than `max_values` values (counted by
    commas and brackets), or leaves a string open. Linear time, no recursion."""
    depth = values = 0
    for match in _TOKENS.finditer(text.replace("\\\\", "").replace('\\"', "")):
        char = match.group()
        if len(char) > 1:  # a complete string
            continue
        if char == '"':
            raise error(f"{what}: not valid JSON (a string is never closed)")
        if char in "[{":
            depth += 1
            values += 1
            if depth > max_depth:
                raise error(f"{what}: JSON nested deeper than {max_depth} levels")
        elif char in "]}":
            depth -= 1
        else:
            values += 1
        if values > max_values:
            raise error(f"{what}: more than {max_values:,} JSON values")


def loads(raw: bytes | str, what: str, *, max_bytes: int = MAX_CONFIG_BYTES, max_depth: int = MAX_DEPTH,
          max_values: int = MAX_VALUES, error: type[MergekitError] = CheckpointError,
          object_pairs_hook: Callable[[list[tuple[str, Any]]], Any] | None = None) -> Any:
    """Parse JSON text within the limits; `error` naming `what` if it is too large, too deep, not UTF-8 or not
    JSON. `max_bytes` counts UTF-8 bytes for bytes input and characters for str input."""
    if len(raw) > max_bytes:
        unit = "bytes" if isinstance(raw, (bytes, bytearray)) else "characters"
        raise error(f"{what}: {len(raw):,} {unit} of JSON; the limit is {max_bytes:,}")
    if isinstance(raw, (bytes, bytearray)):
        try:
            text = bytes(raw).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise error(f"{what}: not valid UTF-8 ({exc.reason})") from exc
    else:
        text = raw
    check_shape(text, what, max_depth=max_depth, max_values=max_values, error=error)
    try:
        return json.loads(text, object_pairs_hook=object_pairs_hook)
    except (ValueError, RecursionError) as exc:
        raise error(f"{what}: not valid JSON ({str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__})") \
            from exc


def load_file(path: str | os.PathLike[str], *, max_bytes: int = MAX_CONFIG_BYTES, max_depth: int = MAX_DEPTH,
              error: type[MergekitError] = CheckpointError) -> Any:
    """Read and parse a small JSON file: at most `max_bytes` are read whatever the file's size, and a FIFO or device
    is refused instead of blocking."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except OSError as exc:
        raise error(f"{path}: cannot read: {exc.strerror or exc}") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise error(f"{path}: is not a regular file")
        if st.st_size > max_bytes:
            raise error(f"{path}: {st.st_size:,} bytes of JSON; the limit is {max_bytes:,}")
        with open(fd, "rb", closefd=False) as f:
            raw = f.read(max_bytes + 1)
    except OSError as exc:
        raise error(f"{path}: cannot read: {exc.strerror or exc}") from exc
    finally:
        os.close(fd)
    return loads(raw, str(path), max_bytes=max_bytes, max_depth=max_depth, error=error)
