"""Small files a study writes (images, tables, reports, answers): written under a temporary name, then renamed, so
a reader never sees half a file and an interrupted write leaves only a dot-file behind."""

from __future__ import annotations

import os
from pathlib import Path


def atomic_write(path: Path, data: bytes | str) -> Path:
    """Write `data` (text as UTF-8) to `path` through `.<name>.tmp` in the same folder; returns `path`."""
    temp = path.with_name(f".{path.name}.tmp")
    if isinstance(data, str):
        temp.write_text(data, encoding="utf-8")
    else:
        temp.write_bytes(data)
    os.replace(temp, path)
    return path
