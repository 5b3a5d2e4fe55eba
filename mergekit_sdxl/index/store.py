"""The model index: one SQLite file mapping every indexed checkpoint or adapter to its hashes and header facts.

One row per file (keyed by its real path) with the identity that decides whether it must be hashed again (size,
mtime in ns, inode, device), the four hashes A1111/Civitai/kohya show (full sha256 = AutoV2's source, AutoV3,
legacy), and what its header says (format, kind, architecture, dominant dtype, tensor count, title, the
`sd_merge_recipe` / `sd_merge_models` lineage it carries). A second table remembers which folders were indexed.

Concurrency: the database runs in WAL mode with a busy timeout, hashing happens outside any transaction and each
file's row is written in its own short transaction, so two `index` runs (or an `index` and a `merge
--models-dir`) can work on the same database at once; the worst case is a file hashed by both.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Iterable, Iterator
from dataclasses import astuple, dataclass, fields, replace
from pathlib import Path

from mergekit_sdxl.errors import UsageError
from mergekit_sdxl.io.hashes import cache_file

SCHEMA_VERSION = 1
BUSY_TIMEOUT_MS = 60_000
HEX = frozenset("0123456789abcdef")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    path TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    inode INTEGER NOT NULL,
    device INTEGER NOT NULL,
    sha256 TEXT,
    autov3 TEXT,
    legacy TEXT,
    format TEXT NOT NULL,
    kind TEXT NOT NULL,
    arch TEXT,
    dtype TEXT,
    tensors INTEGER,
    title TEXT,
    merge_type TEXT,
    merge_recipe TEXT,
    merge_models TEXT,
    error TEXT,
    indexed_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS files_sha256 ON files(sha256);
CREATE INDEX IF NOT EXISTS files_autov3 ON files(autov3);
CREATE INDEX IF NOT EXISTS files_legacy ON files(legacy);
CREATE INDEX IF NOT EXISTS files_identity ON files(device, inode, size, mtime_ns);
CREATE TABLE IF NOT EXISTS roots (
    path TEXT PRIMARY KEY,
    indexed_at REAL NOT NULL
);
"""


@dataclass(frozen=True)
class Identity:
    """What decides whether a file must be hashed again: any change means a new file."""

    size: int
    mtime_ns: int
    inode: int
    device: int

    @classmethod
    def of(cls, st: os.stat_result) -> Identity:
        return cls(st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)


@dataclass(frozen=True)
class Entry:
    """One indexed file. Hashes are lower-case hex: `sha256` and `autov3` full (64), `legacy` 8.

    `kind` is "checkpoint", "vae", "lora" or "other"; `arch` the architecture id for checkpoints; `dtype` the
    safetensors code holding most of the tensor bytes. `merge_recipe` / `merge_models` are the file's own
    `sd_merge_recipe` / `sd_merge_models` metadata (raw JSON text, None when absent or too large). `error` says
    why the header could not be read (the hashes are still valid).
    """

    path: str
    size: int
    mtime_ns: int
    inode: int
    device: int
    sha256: str | None
    autov3: str | None
    legacy: str | None
    format: str
    kind: str
    arch: str | None = None
    dtype: str | None = None
    tensors: int | None = None
    title: str | None = None
    merge_type: str | None = None
    merge_recipe: str | None = None
    merge_models: str | None = None
    error: str | None = None
    indexed_at: float = 0.0

    @property
    def identity(self) -> Identity:
        return Identity(self.size, self.mtime_ns, self.inode, self.device)

    @property
    def autov2(self) -> str | None:
        return self.sha256[:10] if self.sha256 else None

    @property
    def name(self) -> str:
        return os.path.basename(self.path)

    def as_dict(self) -> dict[str, object]:
        """JSON-ready form (hashes in the lengths tools show them, plus the full digests)."""
        return {"path": self.path, "size": self.size, "sha256": self.sha256, "autov2": self.autov2,
                "autov3": self.autov3[:12] if self.autov3 else None, "autov3_full": self.autov3,
                "legacy": self.legacy, "format": self.format, "kind": self.kind, "arch": self.arch,
                "dtype": self.dtype, "tensors": self.tensors, "title": self.title, "merge_type": self.merge_type,
                "error": self.error}


_COLUMNS = tuple(f.name for f in fields(Entry))


def default_db_path() -> Path:
    """The index file: `index.sqlite3` in the user cache folder ($MERGEKIT_SDXL_CACHE_DIR, else
    $XDG_CACHE_HOME/mergekit-sdxl or ~/.cache/mergekit-sdxl), beside the hash cache."""
    return cache_file().parent / "index.sqlite3"


class ModelIndex:
    """An open index database. Use as a context manager; every method is safe against concurrent writers."""

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self.path = Path(path) if path is not None else default_db_path()
        self._db = _connect(self.path)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> ModelIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------------------------------------- writes
    def put(self, entry: Entry) -> None:
        """Insert or replace the row of `entry.path` (one short transaction)."""
        entry = replace(entry, indexed_at=entry.indexed_at or time.time())
        marks = ", ".join("?" for _ in _COLUMNS)
        with self._write():
            self._db.execute(f"INSERT OR REPLACE INTO files ({', '.join(_COLUMNS)}) VALUES ({marks})", astuple(entry))

    def remove(self, paths: Iterable[str]) -> int:
        """Delete the rows of `paths`; returns how many existed."""
        paths = list(paths)
        with self._write():
            before = self._db.total_changes
            self._db.executemany("DELETE FROM files WHERE path = ?", [(p,) for p in paths])
            return self._db.total_changes - before

    def add_root(self, folder: str) -> None:
        """Remember that `folder` (a real path) was indexed."""
        with self._write():
            self._db.execute("INSERT OR REPLACE INTO roots (path, indexed_at) VALUES (?, ?)", (folder, time.time()))

    # ----------------------------------------------------------------------------------------------- reads
    def get(self, path: str) -> Entry | None:
        """The row of `path` (a real path), or None."""
        return self._one("SELECT * FROM files WHERE path = ?", (path,))

    def same_file(self, identity: Identity) -> Entry | None:
        """A row for a file with this exact identity (the same file under another name: a rename or hard link)."""
        return self._one("SELECT * FROM files WHERE device = ? AND inode = ? AND size = ? AND mtime_ns = ? "
                         "AND sha256 IS NOT NULL LIMIT 1",
                         (identity.device, identity.inode, identity.size, identity.mtime_ns))

    def under(self, folder: str) -> list[Entry]:
        """Every row whose path lies inside `folder` (a real path), sorted by path."""
        prefix = folder.rstrip(os.sep) + os.sep
        return self._all("SELECT * FROM files WHERE substr(path, 1, ?) = ? ORDER BY path", (len(prefix), prefix))

    def entries(self) -> list[Entry]:
        """Every row, sorted by path."""
        return self._all("SELECT * FROM files ORDER BY path", ())

    def roots(self) -> list[str]:
        """The folders indexed so far, sorted."""
        return [row[0] for row in self._db.execute("SELECT path FROM roots ORDER BY path")]

    def find(self, text: str, kinds: Iterable[str] = ("sha256", "autov3", "legacy")) -> list[tuple[str, Entry]]:
        """Rows whose hash of one of `kinds` starts with `text` (hex, any case), as (kind, entry).

        "sha256" covers AutoV2 (its first 10 hex) and full digests; "legacy" needs all 8 hex.
        """
        prefix = normalize_hex(text)
        found: list[tuple[str, Entry]] = []
        for kind in kinds:
            if kind == "legacy":
                rows = self._all("SELECT * FROM files WHERE legacy = ? ORDER BY path", (prefix,)) \
                    if len(prefix) == 8 else []
            elif kind in ("sha256", "autov3"):  # a range scan on the index: prefix <= h < prefix + 'g'
                rows = self._all(f"SELECT * FROM files WHERE {kind} >= ? AND {kind} < ? ORDER BY path",
                                 (prefix, prefix + "g"))
            else:
                raise ValueError(f"unknown hash kind {kind!r}")
            found += [(kind, row) for row in rows]
        return found

    # ------------------------------------------------------------------------------------------- internals
    def _one(self, sql: str, args: tuple[object, ...]) -> Entry | None:
        row = self._db.execute(sql, args).fetchone()
        return Entry(*row) if row else None

    def _all(self, sql: str, args: tuple[object, ...]) -> list[Entry]:
        return [Entry(*row) for row in self._db.execute(sql, args)]

    def _write(self) -> _Transaction:
        return _Transaction(self._db)


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on error): takes the write lock up front, so a concurrent writer
    waits for the busy timeout instead of failing halfway through."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind: object, exc: object, tb: object) -> None:
        self.db.execute("COMMIT" if kind is None else "ROLLBACK")


def normalize_hex(text: str) -> str:
    """`text` stripped and lower-cased; UsageError unless it is 1 to 64 hex digits."""
    value = str(text).strip().lower()
    if not value or len(value) > 64 or not set(value) <= HEX:
        raise UsageError(f"{text!r} is not a hash: expected hex digits (AutoV2 10, AutoV3 12, legacy 8, sha256 64)")
    return value


def _connect(path: Path) -> sqlite3.Connection:
    where = f"model index {path}"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"{where}: cannot open: {exc}") from exc
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            return _open_once(path, where)
        except sqlite3.OperationalError as exc:
            # Switching a new database to WAL (or migrating it) while another run does the same can fail with
            # "database is locked" at once: SQLite skips the busy handler where waiting could deadlock. The
            # other run finishes its set-up within milliseconds, so try again until the busy timeout.
            if time.monotonic() > deadline:
                raise UsageError(f"{where}: locked by another program for over {BUSY_TIMEOUT_MS // 1000} s "
                                 f"({exc}); try again when it has finished") from exc
            time.sleep(0.05)


_SQLITE_BUSY, _SQLITE_LOCKED = 5, 6  # SQLite's primary result codes; sqlite3 names them only from Python 3.11


def _is_lock(exc: sqlite3.OperationalError) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (_SQLITE_BUSY, _SQLITE_LOCKED)
    return "locked" in str(exc) or "busy" in str(exc)


def _open_once(path: Path, where: str) -> sqlite3.Connection:
    try:
        db = sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False)
    except (OSError, sqlite3.Error) as exc:
        if isinstance(exc, sqlite3.OperationalError) and _is_lock(exc):
            raise
        raise UsageError(f"{where}: cannot open: {exc}") from exc
    try:
        db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = NORMAL")
        _migrate(db, where)
    except sqlite3.DatabaseError as exc:
        db.close()
        if isinstance(exc, sqlite3.OperationalError) and _is_lock(exc):
            raise
        raise UsageError(f"{where}: not a usable index database ({exc}); move it away and index again, or give "
                         "another file with --db") from exc
    except BaseException:
        db.close()
        raise
    return db


def _migrate(db: sqlite3.Connection, where: str) -> None:
    db.execute("BEGIN IMMEDIATE")
    try:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise UsageError(f"{where}: written by a newer mergekit-sdxl (schema {version}, this one reads "
                             f"{SCHEMA_VERSION}); upgrade, or give another file with --db")
        if version < SCHEMA_VERSION:
            # statement by statement: executescript() would COMMIT the transaction
            for statement in filter(None, (s.strip() for s in _SCHEMA.split(";"))):
                db.execute(statement)
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise


def iter_hex_kinds(entry: Entry) -> Iterator[tuple[str, str]]:
    """(label, short hash) pairs as tools show them, for messages."""
    if entry.sha256:
        yield "AutoV2", entry.sha256[:10]
    if entry.autov3:
        yield "AutoV3", entry.autov3[:12]
    if entry.legacy:
        yield "legacy", entry.legacy
