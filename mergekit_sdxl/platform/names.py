"""File names that work on every OS: the rules Windows imposes, applied to outputs everywhere.

A recipe or script made on Linux should not fail later on Windows, or write somewhere else there: `NUL.safetensors`
is the null device on Windows (the output would vanish), `model:v2.safetensors` an alternate data stream of a file
called `model`, and `model. ` loses its trailing dot and space. So every name this tool creates (output files,
export and grid folders) is refused, on every OS, when Windows could not store it as given. Inputs are left alone:
they already exist on the system that reads them.

Rules (Microsoft, "Naming Files, Paths, and Namespaces"): no `< > : " / \\ | ? *` and no control characters; not a
device name (CON, PRN, AUX, NUL, COM0-9, LPT0-9, the superscript-digit COM/LPT, CONIN$, CONOUT$), also not with
an extension (`NUL.tar.gz` is NUL); no trailing space or dot; not `.` or `..`.
"""

from __future__ import annotations

import os
from pathlib import Path

from mergekit_sdxl.errors import OutputError

FORBIDDEN_CHARS = '<>:"/\\|?*'
RESERVED = frozenset({"CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$"}
                     | {f"{port}{n}" for port in ("COM", "LPT") for n in "0123456789\u00b9\u00b2\u00b3"})


def name_problem(name: str) -> str | None:
    """Why `name` (one path component) cannot be created under that name on every OS, or None when it can."""
    if name in ("", ".", ".."):
        return f"{name!r} is not a file name" if name else "the path ends in no file name"
    bad = sorted({c for c in name if c in FORBIDDEN_CHARS or ord(c) < 32})
    if bad:
        shown = " ".join(repr(c) for c in bad)
        return f"the name {name!r} contains {shown}, which Windows does not allow in file names"
    if name[-1] in ". ":
        return f"the name {name!r} ends with {'a dot' if name[-1] == '.' else 'a space'}, which Windows drops"
    stem = name.split(".", 1)[0].rstrip(" ")
    if stem.upper() in RESERVED:
        return (f"{stem!r} is a reserved device name on Windows (with any extension: {name!r} would not be a "
                "file there)")
    return None


def output_name_problem(path: str | os.PathLike[str]) -> str | None:
    """`name_problem` of the last component of an output path (as this OS splits it), or None."""
    return name_problem(Path(path).name)


def check_output_name(path: str | os.PathLike[str]) -> None:
    """Raise OutputError (naming the path and the rule) if the output's name is not portable (see module doc)."""
    problem = output_name_problem(path)
    if problem is not None:
        raise OutputError(f"{path}: {problem}; choose another name (refused on every OS, so a recipe or script "
                          "made here also works on Windows)")
