"""Indexing folders: find model files, hash the new or changed ones (streamed), record them, forget vanished ones.

A file is hashed again only when its size, mtime (ns), inode or device changed; a file renamed or hard-linked
inside the index keeps its hashes (same identity). Hashing uses `io.hashes.hashes_for`, so files already hashed
by `hash` or `merge` come from that cache. A file that changes while it is hashed is reported and not recorded.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

from mergekit_sdxl.errors import MergekitError, UsageError
from mergekit_sdxl.index.store import Entry, Identity, ModelIndex

SUFFIXES = (".safetensors", ".sft", ".ckpt", ".pt", ".pth")


@dataclass
class ScanReport:
    """What one indexing run did."""

    roots: list[str]
    files: int = 0
    hashed: list[str] = field(default_factory=list)
    unchanged: int = 0
    renamed: int = 0
    removed: int = 0
    failed: list[str] = field(default_factory=list)  # one message per file
    bytes_hashed: int = 0
    seconds: float = 0.0


@dataclass(frozen=True)
class ScanPlan:
    """The files found under the given folders and which of them need hashing."""

    roots: list[str]
    found: dict[str, os.stat_result]
    todo: list[str]

    @property
    def bytes_to_hash(self) -> int:
        return sum(self.found[path].st_size for path in self.todo)


def plan_scan(index: ModelIndex, targets: Iterable[str | os.PathLike[str]]) -> ScanPlan:
    """Walk `targets` (folders, or single files) and compare every model file with its index row.

    Raises:
        UsageError: a target does not exist or is neither a folder nor a regular file.
    """
    roots: list[str] = []
    found: dict[str, os.stat_result] = {}
    for target in targets:
        path = Path(target).expanduser()
        if path.is_dir():
            root = os.path.realpath(path)
            roots.append(root)
            found.update(_walk(root))
        elif path.is_file():
            real = os.path.realpath(path)
            found[real] = os.stat(real)
        else:
            raise UsageError(f"{path}: no such folder or file to index")
    todo = [p for p, st in sorted(found.items()) if not _fresh(index.get(p), st)]
    return ScanPlan(list(dict.fromkeys(roots)), found, todo)


def run_scan(index: ModelIndex, plan: ScanPlan, progress: Callable[[int], None] | None = None,
             on_file: Callable[[str], None] | None = None) -> ScanReport:
    """Hash and record `plan.todo`, then drop rows of files that vanished from the scanned folders."""
    start = time.perf_counter()
    report = ScanReport(plan.roots, files=len(plan.found), unchanged=len(plan.found) - len(plan.todo))
    for path in plan.todo:
        if on_file is not None:
            on_file(path)
        before = plan.found[path]
        known = index.same_file(Identity.of(before))
        if known is not None and known.path != path:  # renamed or hard-linked: same bytes, same hashes
            index.put(replace(known, path=path, indexed_at=0.0))
            report.renamed += 1
            if progress is not None:
                progress(before.st_size)
            continue
        entry = _index_one(path, before, progress)
        if isinstance(entry, str):
            report.failed.append(entry)
            continue
        index.put(entry)
        report.hashed.append(path)
        report.bytes_hashed += before.st_size
    for root in plan.roots:
        gone = [e.path for e in index.under(root) if e.path not in plan.found and not os.path.exists(e.path)]
        report.removed += index.remove(gone)
        index.add_root(root)
    report.seconds = time.perf_counter() - start
    return report


def scan(index: ModelIndex, targets: Iterable[str | os.PathLike[str]],
         progress: Callable[[int], None] | None = None) -> ScanReport:
    """`plan_scan` then `run_scan`."""
    return run_scan(index, plan_scan(index, targets), progress)


def refresh(index: ModelIndex, path: str) -> Entry | None:
    """The row of `path` brought up to date (hashed again if the file changed); None if it is gone or unreadable."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    row = index.get(path)
    if _fresh(row, st):
        return row
    entry = _index_one(path, st, None)
    if isinstance(entry, str):
        return None
    index.put(entry)
    return entry


def _index_one(path: str, before: os.stat_result, progress: Callable[[int], None] | None) -> Entry | str:
    """The new row for `path`, or a one-line reason it could not be indexed."""
    # imported here: an incremental run with nothing to hash never needs the header reader or the hasher
    from mergekit_sdxl.index.describe import describe
    from mergekit_sdxl.io.hashes import hashes_for

    try:
        hashes = hashes_for(path, progress)
    except MergekitError as exc:
        return str(exc)
    except OSError as exc:
        return f"{path}: cannot read: {exc.strerror or exc}"
    try:
        after = os.stat(path)
    except OSError as exc:
        return f"{path}: vanished while it was being hashed ({exc.strerror})"
    if Identity.of(after) != Identity.of(before):
        return f"{path}: changed while it was being hashed; index it again when it is complete"
    facts = describe(path)
    ident = Identity.of(before)
    return Entry(path, ident.size, ident.mtime_ns, ident.inode, ident.device, hashes.sha256, hashes.autov3,
                 hashes.legacy, facts.format, facts.kind, facts.arch, facts.dtype, facts.tensors, facts.title,
                 facts.merge_type, facts.merge_recipe, facts.merge_models, facts.error)


def _fresh(row: Entry | None, st: os.stat_result) -> bool:
    return row is not None and row.sha256 is not None and row.identity == Identity.of(st)


def _walk(root: str) -> dict[str, os.stat_result]:
    """Model files under `root` (real paths -> stat), hidden files and folders (temporaries) skipped."""
    found: dict[str, os.stat_result] = {}
    for folder, dirs, names in os.walk(root, onerror=None, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            if name.startswith(".") or not name.lower().endswith(SUFFIXES):
                continue
            real = os.path.realpath(os.path.join(folder, name))
            try:
                st = os.stat(real)
            except OSError:
                continue  # a dangling link, or removed meanwhile
            if stat.S_ISREG(st.st_mode):
                found[real] = st
    return found
