"""Everything a run reads, so no output can ever land on it.

Every file the tool opens for reading is noted here (`note_read`: checkpoints, `.ckpt` files, every file of a
diffusers folder, adapters, VAEs, recipes) by device + inode, which sees through symlinks, hard links and
different spellings of one path; folders read as models are also kept by their real path. `check_output` then
refuses any output that is, holds, or sits inside something read, with or without `--overwrite`.

The set lives for one run: the CLI opens a `run_scope()` around each command (library callers may do the same);
outside a scope, `check_output` sees only the inputs given to it explicitly.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from mergekit_sdxl.errors import CheckpointError, MergekitError, OutputError

MAX_WALK = 100_000  # files looked at inside one folder (an input folder or an output folder to be replaced)


@dataclass
class InputSet:
    """Files (by device + inode) and folders (by real path) a run reads."""

    files: dict[tuple[int, int], Path] = field(default_factory=dict)
    folders: dict[str, Path] = field(default_factory=dict)

    def add(self, path: str | os.PathLike[str]) -> None:
        """Note a file, or a folder and every regular file under it; a path that cannot be stat'ed is skipped."""
        p = Path(path)
        try:
            st = os.stat(p)
        except (OSError, ValueError):
            return
        if stat.S_ISDIR(st.st_mode):
            self.folders[os.path.realpath(p)] = p
            for file in _walk(p, CheckpointError):
                self.add(file)
        else:
            self.files[(st.st_dev, st.st_ino)] = p

    def add_fd(self, fd: int, path: str | os.PathLike[str]) -> None:
        """Note an open file by its descriptor (the file actually opened, whatever happens to the path later)."""
        st = os.fstat(fd)
        self.files[(st.st_dev, st.st_ino)] = Path(path)

    def update(self, other: InputSet) -> None:
        self.files.update(other.files)
        self.folders.update(other.folders)

    def find(self, path: str | os.PathLike[str]) -> Path | None:
        """The input `path` is (same device + inode), or None."""
        try:
            st = os.stat(path)
        except (OSError, ValueError):
            return None
        return self.files.get((st.st_dev, st.st_ino))

    def folder_holding(self, path: str | os.PathLike[str]) -> Path | None:
        """The input folder `path` lies inside (or is), or None."""
        real = os.path.realpath(path)
        for folder, given in self.folders.items():
            if real == folder or real.startswith(folder.rstrip(os.sep) + os.sep):
                return given
        return None


_current: contextvars.ContextVar[InputSet | None] = contextvars.ContextVar("mergekit_inputs", default=None)


@contextlib.contextmanager
def run_scope() -> Iterator[InputSet]:
    """Collect every file read until the block ends (re-entrant: an inner scope shares the outer one's set)."""
    active = _current.get()
    if active is not None:
        yield active
        return
    scope = InputSet()
    token = _current.set(scope)
    try:
        yield scope
    finally:
        _current.reset(token)


def note_read(path: str | os.PathLike[str], fd: int | None = None) -> None:
    """Record that this run reads `path` (a file, or a folder with everything in it)."""
    active = _current.get()
    if active is None:
        return
    if fd is not None:
        active.add_fd(fd, path)
    else:
        active.add(path)


def current(extra: Iterable[str | os.PathLike[str]] = ()) -> InputSet:
    """The run's input set plus `extra` paths (a copy)."""
    out = InputSet()
    active = _current.get()
    if active is not None:
        out.update(active)
    for path in extra:
        out.add(path)
    return out


def check_output(dest: str | os.PathLike[str], *, folder: bool = False,
                 inputs: Iterable[str | os.PathLike[str]] = ()) -> None:
    """Refuse an output that is an input, lies inside an input folder, or (a folder output) holds an input.

    Raises:
        OutputError: naming the output and the input it would destroy.
    """
    dest = Path(dest)
    known = current(inputs)
    hit = known.find(dest)
    if hit is not None:
        same = "" if os.path.abspath(hit) == os.path.abspath(dest) else f" ({hit})"
        raise OutputError(f"{dest}: is one of the inputs{same}; refusing to overwrite an input")
    holder = known.folder_holding(dest)
    if holder is not None:
        raise OutputError(f"{dest}: is inside the input folder {holder}; write the output somewhere else")
    if folder and dest.is_dir() and not dest.is_symlink():
        real = os.path.realpath(dest) + os.sep
        for path, given in known.folders.items():
            if (path + os.sep).startswith(real):
                raise OutputError(f"{dest}: holds the input folder {given}; refusing to replace it")
        for file in _walk(dest, OutputError):
            hit = known.find(file)
            if hit is not None:
                raise OutputError(f"{dest}: holds an input ({hit}); refusing to replace it")


def _walk(folder: Path, error: type[MergekitError]) -> Iterator[Path]:
    """Files under `folder` (symlinked folders not followed); `error` when there are more than MAX_WALK."""
    count = 0
    for root, dirs, files in os.walk(folder, followlinks=False):
        for name in files:
            count += 1
            if count > MAX_WALK:
                raise error(f"{folder}: holds more than {MAX_WALK} files; not a model or output folder")
            yield Path(root) / name
        dirs.sort()
