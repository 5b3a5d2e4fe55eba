"""Committing outputs: a finished temporary file or folder takes the output's name atomically, and never clobbers.

Rules (README "Safety", docs/safety.md):
- An output is a new path, an existing regular file (with `--overwrite`), or an existing folder this tool wrote
  (with `--overwrite`; recognised by the manifest `MANIFEST` listing every file we wrote, and refused if it holds
  anything else), or an empty folder. Symlinks, devices, FIFOs and other people's folders are never replaced.
- Nothing that the run reads is ever an output (io/inputs.py), checked before any work and again at the commit.
- Without `--overwrite` the commit itself refuses to replace anything, even a file that appeared during the run:
  `renameat2(RENAME_NOREPLACE)` where the kernel and filesystem have it (Linux), else `link()` + `unlink()` for
  files and `mkdir()` + `rename()` over that empty folder for folders (both atomic no-clobber), else, on a
  filesystem that has neither, a check just before a plain rename (a race with another writer in that instant is
  possible there, and only there).
- With `--overwrite` a file is replaced by one rename; a folder is swapped in with `RENAME_EXCHANGE` (else two
  renames, the old folder parked under a recognisable temporary name for that instant) and the old one removed.
- The commit runs inside `signals.critical()`: a stop signal during it takes effect only after it, and once the
  output landed the run counts as done (io/signals.py).

Temporary names: `.<name>.<pid>.mergekit-tmp` in the output's folder. Those of dead processes for the same
output are removed when the next run for it starts (`cleanup_stale_temps`).

Platform hooks: `rename_noreplace` and `exchange` are the two primitives other platforms may replace.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import shutil
import signal
import stat
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from mergekit_sdxl.errors import OutputError
from mergekit_sdxl.io import inputs as run_inputs
from mergekit_sdxl.io import jsonio, signals
from mergekit_sdxl.platform import libc
from mergekit_sdxl.platform.names import check_output_name
from mergekit_sdxl.platform.process import pid_alive, replace_failure

TEMP_SUFFIX = ".mergekit-tmp"
KILL_ENV = "MERGEKIT_TEST_KILL_AT"
MANIFEST = ".mergekit-sdxl.json"
_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2
_AT_FDCWD = -100
_UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM, errno.EXDEV}
Paths = Iterable[str | os.PathLike[str]]


# ------------------------------------------------------------------------------------------- rename primitives


def _test_kill(point: str) -> None:
    """The crash-test hook (io/writer.py docstring): MERGEKIT_TEST_KILL_AT=`point` SIGKILLs this process there,
    `point=SIGTERM` (any signal name) sends that signal instead."""
    wanted = os.environ.get(KILL_ENV)
    if wanted is None:
        return
    where, _, name = wanted.partition("=")
    if where == point:  # Windows has no SIGKILL: os.kill with 9 is TerminateProcess there, the same abrupt end
        os.kill(os.getpid(), getattr(signal, name) if name else getattr(signal, "SIGKILL", 9))


def _call_renameat2(src: Path, dst: Path, flags: int) -> bool:
    """True if done; False if renameat2 or the flag is not available here; OSError for real failures."""
    fn = libc.renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(dst))


def rename_noreplace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> str:
    """Rename `src` (file or folder) to `dst` only if nothing exists at `dst`.

    Returns:
        How it was done: "renameat2", "link", "mkdir" or "checked" (the racy last resort, see module docstring).

    Raises:
        FileExistsError: something exists at `dst`. OSError: other failures.
    """
    src, dst = Path(src), Path(dst)
    if _call_renameat2(src, dst, _RENAME_NOREPLACE):
        return "renameat2"
    if src.is_dir() and not src.is_symlink():
        os.mkdir(dst)  # reserves the name (FileExistsError if taken); rename replaces only an empty folder
        try:
            os.rename(src, dst)
        except OSError as exc:
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):  # someone filled it meanwhile: theirs now
                raise FileExistsError(errno.EEXIST, "appeared during the run", str(dst)) from None
            with contextlib.suppress(OSError):
                os.rmdir(dst)
            raise
        return "mkdir"
    try:
        os.link(src, dst)
    except FileExistsError:
        raise
    except OSError as exc:
        if exc.errno not in _UNSUPPORTED and exc.errno != errno.EMLINK:
            raise
    else:
        os.unlink(src)
        return "link"
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, "exists", str(dst))
    os.rename(src, dst)
    return "checked"


def exchange(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """Atomically swap two existing paths (RENAME_EXCHANGE); False where unsupported."""
    return _call_renameat2(Path(a), Path(b), _RENAME_EXCHANGE)


# ------------------------------------------------------------------------------------------- target checks


def temp_path(dest: str | os.PathLike[str], tag: str = "") -> Path:
    """The temporary name this process uses for `dest` (a file or a folder)."""
    dest = Path(dest)
    return dest.with_name(f".{dest.name}.{os.getpid()}{tag}{TEMP_SUFFIX}")


def check_target(dest: str | os.PathLike[str], *, overwrite: bool, folder: bool = False,
                 inputs: Paths = ()) -> None:
    """Raise OutputError unless `dest` may receive an output now (see the module docstring's rules)."""
    dest = Path(dest)
    check_output_name(dest)  # a name Windows could not store is refused everywhere (platform/names.py)
    run_inputs.check_output(dest, folder=folder, inputs=inputs)
    try:
        st = os.lstat(dest)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise OutputError(f"{dest}: cannot be checked: {exc.strerror}") from exc
    if st is not None:
        _check_existing(dest, st, overwrite, folder)
    parent = dest.parent
    if not parent.is_dir():
        raise OutputError(f"{parent}: output folder does not exist")


def _check_existing(dest: Path, st: os.stat_result, overwrite: bool, folder: bool) -> None:
    if stat.S_ISLNK(st.st_mode):
        raise OutputError(f"{dest}: is a symbolic link; give the real path of the output")
    if folder:
        if not stat.S_ISDIR(st.st_mode):
            raise OutputError(f"{dest}: exists and is not a folder")
        if _is_empty(dest):
            return  # an empty folder holds nothing to lose (`mkdir out && ... -o out` works)
        if not overwrite:
            raise OutputError(f"{dest}: already exists; pass --overwrite to replace it")
        _check_ours(dest)
        return
    if stat.S_ISDIR(st.st_mode):
        raise OutputError(f"{dest}: is a folder; give an output file name")
    if not stat.S_ISREG(st.st_mode):
        raise OutputError(f"{dest}: is not a regular file (a device, FIFO or socket); refusing to replace it")
    if not overwrite:
        raise OutputError(f"{dest}: already exists; pass --overwrite to replace it")


def _check_ours(folder: Path) -> None:
    """An existing output folder may be replaced only if it is empty or every file in it is one we wrote (listed
    by our manifest)."""
    listed = read_manifest(folder)
    if listed is None:
        raise OutputError(f"{folder}: exists and was not written by mergekit-sdxl (no {MANIFEST}); refusing to "
                          "replace it: remove it yourself or choose another folder")
    for path in _files(folder):
        rel = path.relative_to(folder).as_posix()
        if rel != MANIFEST and rel not in listed:
            raise OutputError(f"{folder}: holds {rel!r}, which mergekit-sdxl did not write; refusing to replace "
                              "the folder: move that file or choose another folder")


def _is_empty(folder: Path) -> bool:
    try:
        with os.scandir(folder) as entries:
            return next(entries, None) is None
    except OSError:
        return False


def read_manifest(folder: Path) -> set[str] | None:
    """The files our manifest in `folder` lists, or None if there is no valid manifest."""
    path = folder / MANIFEST
    if path.is_symlink() or not path.is_file():
        return None
    try:
        data = jsonio.load_file(path, max_bytes=8 << 20, error=OutputError)
    except OutputError:
        return None
    files = data.get("files") if isinstance(data, dict) and data.get("tool") == "mergekit-sdxl" else None
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        return None
    return set(files)


def _files(folder: Path) -> Iterator[Path]:
    for root, dirs, files in os.walk(folder, followlinks=False):
        dirs.sort()
        for name in sorted(files) + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            yield Path(root) / name


# ------------------------------------------------------------------------------------------- commits

_staging: set[str] = set()  # real paths of temporary folders being filled (their files are not final outputs)


def _in_staging(path: Path) -> bool:
    real = os.path.realpath(path.parent)
    return any(real == s or real.startswith(s + os.sep) for s in _staging)


@contextlib.contextmanager
def _discarding_on_failure(tmp: Path, dest: Path, describe: Callable[[OSError], str]) -> Iterator[None]:
    """Remove the finished `tmp` when its commit to `dest` fails, and say why in one OutputError: a name that
    appeared meanwhile (FileExistsError) is kept and named as such; other OS errors are worded by `describe`."""
    try:
        yield
    except FileExistsError:
        remove(tmp)
        raise OutputError(f"{dest}: appeared while the output was being written; nothing was replaced "
                          "(the new output was discarded); pass --overwrite to replace it") from None
    except OutputError:
        remove(tmp)
        raise
    except OSError as exc:
        remove(tmp)
        raise OutputError(describe(exc)) from exc


def commit_file(tmp: str | os.PathLike[str], dest: str | os.PathLike[str], *, overwrite: bool,
                inputs: Paths = ()) -> None:
    """Give the finished, fsynced temporary file `tmp` the name `dest` (rules in the module docstring).

    The temporary file is removed if the commit fails. Raises OutputError.
    """
    tmp, dest = Path(tmp), Path(dest)
    with signals.critical():
        # replace_failure names Windows' "open elsewhere" case
        with _discarding_on_failure(tmp, dest, lambda exc: replace_failure(exc, dest)):
            if not overwrite and os.path.lexists(dest):
                raise FileExistsError(errno.EEXIST, "exists", str(dest))
            check_target(dest, overwrite=overwrite, inputs=inputs)
            if overwrite and os.path.lexists(dest):
                os.replace(tmp, dest)
            else:
                rename_noreplace(tmp, dest)
            _test_kill("in_commit")
        fsync_dir(dest.parent)
        if not _in_staging(dest):
            signals.note_committed(dest)


def commit_folder(tmp: str | os.PathLike[str], dest: str | os.PathLike[str], *, overwrite: bool,
                  inputs: Paths = ()) -> None:
    """Write the manifest into the finished folder `tmp`, fsync it, and make it `dest` (replacing a folder we
    wrote earlier only with `overwrite`). `tmp` is removed if the commit fails. Raises OutputError."""
    tmp, dest = Path(tmp), Path(dest)
    with signals.critical():
        with _discarding_on_failure(tmp, dest, lambda exc: f"{dest}: finishing the folder failed: "
                                                            f"{exc.strerror or exc}"):
            _write_manifest(tmp)
            if os.path.isdir(dest) and not os.path.islink(dest) and _is_empty(dest):
                _remove_empty(dest)
            if not overwrite and os.path.lexists(dest):
                raise FileExistsError(errno.EEXIST, "exists", str(dest))
            check_target(dest, overwrite=overwrite, folder=True, inputs=inputs)
            if overwrite and os.path.lexists(dest):
                _swap_in(tmp, dest)
            else:
                rename_noreplace(tmp, dest)
        fsync_dir(dest.parent)
        signals.note_committed(dest)


def _remove_empty(folder: Path) -> None:
    """Remove an empty output folder so the new one can take its name; if something arrived in it meanwhile,
    rmdir fails and it is kept (FileExistsError)."""
    try:
        os.rmdir(folder)
    except OSError as exc:
        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise FileExistsError(errno.EEXIST, "appeared during the run", str(folder)) from None
        raise


def _swap_in(tmp: Path, dest: Path) -> None:
    if exchange(tmp, dest):
        remove(tmp)  # now the old folder
        return
    old = temp_path(dest, ".old")
    os.rename(dest, old)
    try:
        os.rename(tmp, dest)
    except OSError:
        os.rename(old, dest)
        raise
    remove(old)


def _write_manifest(folder: Path) -> None:
    files = sorted(p.relative_to(folder).as_posix() for p in _files(folder) if p.name != MANIFEST)
    data = json.dumps({"tool": "mergekit-sdxl", "files": files}, indent=1) + "\n"
    (folder / MANIFEST).write_text(data, encoding="utf-8")
    for rel in files:
        _fsync_file(folder / rel)
    for root, _, _ in os.walk(folder):
        fsync_dir(Path(root))


def _fsync_file(path: Path) -> None:
    if path.is_symlink():
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(folder: Path) -> None:
    """fsync a folder (so a rename in it is durable); silently skipped where folders cannot be fsynced."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove(path: str | os.PathLike[str]) -> None:
    """Remove a temporary file or folder of ours; never interrupted half-way by a stop signal."""
    path = Path(path)
    with signals.critical():
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


# ------------------------------------------------------------------------------------------- staging


@contextlib.contextmanager
def staged_folder(dest: str | os.PathLike[str], *, overwrite: bool = False, inputs: Paths = ()) -> Iterator[Path]:
    """Yield a fresh temporary folder next to `dest`; on success it becomes `dest` (commit_folder), on any error
    or signal it is removed. The target is checked before the block runs."""
    dest = Path(dest)
    check_target(dest, overwrite=overwrite, folder=True, inputs=inputs)
    cleanup_stale_temps(dest.parent, dest.name)
    tmp = temp_path(dest)
    try:
        os.mkdir(tmp)
    except OSError as exc:
        raise OutputError(f"{tmp}: cannot create the temporary output folder: {exc.strerror}") from exc
    real = os.path.realpath(tmp)
    _staging.add(real)
    try:
        yield tmp
        commit_folder(tmp, dest, overwrite=overwrite, inputs=inputs)
    except OSError as exc:  # a write into the temporary folder failed (disk full, quota, I/O error)
        remove(tmp)
        reason = "disk full" if exc.errno == errno.ENOSPC else exc.strerror or str(exc)
        raise OutputError(f"{dest}: writing the output failed: {reason}") from exc
    except BaseException:
        remove(tmp)
        raise
    finally:
        _staging.discard(real)


def write_file(dest: str | os.PathLike[str], data: bytes, *, overwrite: bool = False, inputs: Paths = ()) -> None:
    """Write a small output file (a report, an image) atomically under the same rules as any output."""
    dest = Path(dest)
    check_target(dest, overwrite=overwrite, inputs=inputs)
    tmp = temp_path(dest)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    except OSError as exc:
        raise OutputError(f"{tmp}: cannot create the temporary output: {exc.strerror}") from exc
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        remove(tmp)
        reason = "disk full" if exc.errno == errno.ENOSPC else exc.strerror
        raise OutputError(f"{dest}: writing failed: {reason}") from exc
    except BaseException:
        remove(tmp)
        raise
    commit_file(tmp, dest, overwrite=overwrite, inputs=inputs)


def cleanup_stale_temps(folder: str | os.PathLike[str], outname: str) -> list[Path]:
    """Remove `.<outname>.<pid>[.old].mergekit-tmp` files or folders in `folder` whose process no longer runs
    (never one this run reads). Returns the removed paths."""
    pattern = re.compile(rf"\.{re.escape(outname)}\.(\d+)(?:\.old)?{re.escape(TEMP_SUFFIX)}")
    removed: list[Path] = []
    known = run_inputs.current()
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match and not _pid_alive(int(match.group(1))) and known.find(entry) is None:
            remove(entry)
            removed.append(entry)
    return removed


def _pid_alive(pid: int) -> bool:
    return pid_alive(pid)  # never os.kill(pid, 0) on Windows: that sends Ctrl-C (platform/process.py)
