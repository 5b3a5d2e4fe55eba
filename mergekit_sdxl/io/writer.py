"""Streaming safetensors writer: header first, tensors in any order, atomic commit.

The header is computed from the tensor specs (key, dtype, shape) before any tensor exists, so tensors can be
written one at a time, in any order, from several threads (positional writes), and dropped right after.
Layout and header bytes match `safetensors.torch.save_file` (0.8) exactly: tensors sorted by descending dtype
rank then key (`safetensors_order`), compact JSON with `__metadata__` first, the JSON padded with spaces to a
multiple of 8 bytes. The one deliberate difference: metadata keys are sorted (save_file's order is random), so
equal inputs give byte-identical files (and equal AutoV2 hashes).

Data safety: bytes go to `.<name>.<pid>.mergekit-tmp` in the target folder; commit = fsync, then io/commit.py's
`commit_file` (no-clobber rename unless overwrite, never onto anything the run reads, atomic w.r.t. signals).
Any exception inside the `with` block (Ctrl-C, SIGTERM, SIGHUP included) removes the temporary file, so no partial
output is ever left under the real name. Temporary files of dead processes for the same output name (left by a
crash or SIGKILL) are removed when the next writer for that name opens (`cleanup_stale_temps`).

Test hook (crash-safety tests only): when the environment variable MERGEKIT_TEST_KILL_AT is set to one of
`header`, `tensor:N` (after the N-th tensor written, 1-based), `before_fsync`, `after_fsync`, `before_rename`,
`in_commit` (io/commit.py: just after the rename, inside the commit), `after_rename`, the process SIGKILLs itself
at that point (or sends itself another signal: `tensor:3=SIGTERM`). Unset (always, outside tests) it does
nothing.
"""

from __future__ import annotations

import errno
import json
import math
import os
import struct
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mergekit_sdxl.errors import OutputError
from mergekit_sdxl.io import signals
from mergekit_sdxl.io.commit import (
    KILL_ENV,
    TEMP_SUFFIX,
    _test_kill,
    check_target,
    cleanup_stale_temps,
    commit_file,
    remove,
    temp_path,
)
from mergekit_sdxl.io.dtypes import DTYPES, code_of
from mergekit_sdxl.io.posio import PositionalFile, tensor_memory
from mergekit_sdxl.platform.text import from_os

__all__ = ["TEMP_SUFFIX", "SafetensorsWriter", "TensorSpec", "build_header", "cleanup_stale_temps", "save_file",
           "safetensors_order", "temp_path"]


@dataclass(frozen=True)
class TensorSpec:
    """An output tensor announced before writing: key, safetensors dtype code, shape."""

    key: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        """Size of the tensor's data in bytes."""
        return math.prod(self.shape) * DTYPES[self.dtype].itemsize

    @classmethod
    def of(cls, key: str, tensor: torch.Tensor) -> TensorSpec:
        """The spec of an existing tensor."""
        return cls(key, code_of(tensor.dtype), tuple(tensor.shape))


def safetensors_order(specs: Iterable[TensorSpec]) -> list[TensorSpec]:
    """The order save_file lays tensors out in: descending dtype rank (safetensors' Dtype enum), then key."""
    return sorted(specs, key=lambda s: (-DTYPES[s.dtype].rank, s.key))


def build_header(specs: Iterable[TensorSpec], metadata: Mapping[str, str] | None, slack: int = 0,
                 length: int | None = None) -> tuple[bytes, dict[str, int]]:
    """The 8-byte length plus padded JSON header for `specs` laid out in the given order.

    Args:
        slack: extra spaces reserved after the JSON (the total is then rounded up to a multiple of 8).
        length: pad the JSON to exactly this many bytes instead (ValueError if it does not fit).

    Returns:
        (header bytes, {key: absolute file offset of its data}).
    """
    entries: dict[str, object] = {}
    if metadata is not None:
        for k, v in metadata.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise ValueError(f"metadata must map str to str; {k!r} -> {type(v).__name__}")
        # names that came from the OS may carry surrogate-escaped bytes (LANG=C): store them as the UTF-8 they were
        entries["__metadata__"] = {from_os(k): from_os(metadata[k]) for k in sorted(metadata)}
    offsets: dict[str, int] = {}
    cursor = 0
    for spec in specs:
        if spec.key in entries or spec.key in offsets:
            raise ValueError(f"duplicate or reserved tensor key {spec.key!r}")
        entries[spec.key] = {"dtype": spec.dtype, "shape": list(spec.shape), "data_offsets": [cursor,
                                                                                              cursor + spec.nbytes]}
        offsets[spec.key] = cursor
        cursor += spec.nbytes
    raw = json.dumps(entries, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    if length is None:
        length = len(raw) + slack + (-(len(raw) + slack) % 8)
    if len(raw) > length:
        raise ValueError(f"header needs {len(raw)} bytes, only {length} reserved")
    raw += b" " * (length - len(raw))
    start = 8 + len(raw)
    return struct.pack("<Q", len(raw)) + raw, {k: start + o for k, o in offsets.items()}


class SafetensorsWriter:
    """Write a safetensors file whose tensors are announced up front.

    Usage:
        specs = [TensorSpec(k, "F16", shape) for ...]
        with SafetensorsWriter(out, specs, metadata, inputs=[a, b], overwrite=False) as w:
            for key in keys:                 # any order, each key once, from any thread
                w.write(key, tensor)         # dtype and shape must match the spec
        # committed here; an exception in the block removes the temporary file instead

    Args:
        path: output file.
        specs: every tensor the file will hold.
        metadata: `__metadata__` (str -> str); written with sorted keys; None omits the entry.
        overwrite: replace an existing `path` (inputs are refused regardless).
        inputs: paths of the inputs, which the output must not be.
        order: "safetensors" (save_file's layout, the default) or "given" (the specs' order).
        preallocate: reserve the full size up front, so a full disk fails before any work.
        header_slack: spaces reserved in the header so `update_metadata` can grow the metadata by that much
            before commit (0 keeps the file byte-identical to save_file).

    Raises:
        OutputError: output is an input, exists without overwrite, its folder is missing, or the disk is full.
    """

    def __init__(self, path: str | os.PathLike[str], specs: Iterable[TensorSpec],
                 metadata: Mapping[str, str] | None = None, *, overwrite: bool = False,
                 inputs: Iterable[str | os.PathLike[str]] = (), order: str = "safetensors",
                 preallocate: bool = True, header_slack: int = 0) -> None:
        self.path = Path(path)
        self._overwrite = overwrite
        self._inputs = [Path(p) for p in inputs]
        check_target(self.path, overwrite=overwrite, inputs=self._inputs)
        specs = list(specs)
        if order == "safetensors":
            specs = safetensors_order(specs)
        elif order != "given":
            raise ValueError(f"order must be 'safetensors' or 'given', not {order!r}")
        self.specs = {s.key: s for s in specs}
        self._layout = specs
        self.header, self.offsets = build_header(specs, metadata, slack=header_slack)
        self.size = len(self.header) + sum(s.nbytes for s in specs)
        self.tmp = temp_path(self.path)
        self._preallocate = preallocate
        self._written: set[str] = set()
        self._count = 0  # tensors written, for the test hook
        self._lock = threading.Lock()
        self._file: PositionalFile | None = None

    def __enter__(self) -> SafetensorsWriter:
        self.open()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()

    def open(self) -> None:
        """Remove stale temporaries of this output, create the temporary file, reserve its size, write the header."""
        cleanup_stale_temps(self.path.parent, self.path.name)
        try:
            with signals.critical():  # the file is kept (for abort) before any signal can act
                fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
                self._file = PositionalFile(fd, writable=True)
        except OSError as exc:
            raise OutputError(f"{self.tmp}: cannot create the temporary output: {exc.strerror}") from exc
        try:
            self._reserve()
            self._pwrite(memoryview(self.header), 0, "the header")
            _test_kill("header")
        except BaseException:  # __exit__ does not run when __enter__ fails: clean up here
            self.abort()
            raise

    def _reserve(self) -> None:
        assert self._file is not None
        if self._preallocate and hasattr(os, "posix_fallocate") and self.size:
            try:
                os.posix_fallocate(self._file.fd, 0, self.size)
                return
            except OSError as exc:
                if exc.errno == errno.ENOSPC:
                    raise OutputError(f"{self.path}: not enough disk space for {self.size / 1e9:.2f} GB") from exc
        os.ftruncate(self._file.fd, self.size)

    def write(self, key: str, tensor: torch.Tensor) -> None:
        """Write one announced tensor; its dtype and shape must equal the spec (no implicit casts)."""
        spec = self._spec(key)
        if code_of(tensor.dtype) != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise ValueError(f"{key!r}: got {code_of(tensor.dtype)} {tuple(tensor.shape)}, "
                             f"announced {spec.dtype} {spec.shape}")
        flat = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        self._write_view(key, tensor_memory(flat).cast("B"))

    def write_bytes(self, key: str, data: bytes | bytearray | memoryview) -> None:
        """Write the raw bytes of one announced tensor (already in the spec's dtype, little-endian)."""
        spec = self._spec(key)
        view = memoryview(data).cast("B")
        if len(view) != spec.nbytes:
            raise ValueError(f"{key!r}: got {len(view)} bytes, announced {spec.nbytes}")
        self._write_view(key, view)

    def _spec(self, key: str) -> TensorSpec:
        if self._file is None:
            raise RuntimeError("SafetensorsWriter is not open (use it as a context manager)")
        spec = self.specs.get(key)
        if spec is None:
            raise ValueError(f"{key!r} was not announced to the writer")
        with self._lock:
            if key in self._written:
                raise ValueError(f"{key!r} written twice")
            self._written.add(key)
        return spec

    def _write_view(self, key: str, view: memoryview) -> None:
        self._pwrite(view, self.offsets[key], f"tensor {key!r}")
        if KILL_ENV in os.environ:
            with self._lock:
                self._count += 1
                _test_kill(f"tensor:{self._count}")

    def _pwrite(self, view: memoryview, offset: int, what: str) -> None:
        if self._file is None:
            raise RuntimeError("SafetensorsWriter is not open (use it as a context manager)")
        try:
            self._file.write(view, offset)
        except OSError as exc:
            reason = "disk full" if exc.errno == errno.ENOSPC else exc.strerror
            raise OutputError(f"{self.path}: writing {what} failed: {reason}") from exc

    def update_metadata(self, metadata: Mapping[str, str] | None) -> None:
        """Replace the metadata before commit (e.g. with hashes known only at the end).

        Raises:
            OutputError: the new header does not fit in the space reserved (header_slack).
        """
        try:
            header, _ = build_header(self._layout, metadata, length=len(self.header) - 8)
        except ValueError as exc:
            raise OutputError(f"{self.path}: the final metadata does not fit the reserved header space: {exc}") \
                from exc
        self._pwrite(memoryview(header), 0, "the header")
        self.header = header

    def pending(self) -> list[str]:
        """Announced keys not written yet."""
        return [k for k in self.specs if k not in self._written]

    def commit(self) -> None:
        """Check every tensor was written, fsync, close, then io/commit.py's commit_file (no-clobber rename unless
        overwrite, re-checked against the inputs, atomic with respect to stop signals, folder fsynced)."""
        missing = self.pending()
        if missing:
            self.abort()
            raise OutputError(f"{self.path}: {len(missing)} announced tensors never written, e.g. {missing[0]!r}")
        try:
            _test_kill("before_fsync")
            assert self._file is not None
            os.fsync(self._file.fd)
            _test_kill("after_fsync")
            self._file.close()  # Windows cannot rename a file that is still open
            self._file = None
            _test_kill("before_rename")
        except OSError as exc:
            self.abort()
            reason = "disk full" if exc.errno == errno.ENOSPC else exc.strerror
            raise OutputError(f"{self.path}: finishing the file failed: {reason}") from exc
        except BaseException:  # a stop signal before the rename: nothing is left
            self.abort()
            raise
        commit_file(self.tmp, self.path, overwrite=self._overwrite, inputs=self._inputs)
        _test_kill("after_rename")

    def abort(self) -> None:
        """Close and remove the temporary file (idempotent; a stop signal cannot cut it short)."""
        with signals.critical():
            if self._file is not None:
                self._file.close()
                self._file = None
            remove(self.tmp)


def save_file(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike[str],
              metadata: Mapping[str, str] | None = None, **kwargs: Any) -> None:
    """Write a dict of tensors at once (tests, small files); kwargs go to SafetensorsWriter."""
    specs = [TensorSpec.of(k, t) for k, t in tensors.items()]
    with SafetensorsWriter(path, specs, metadata, **kwargs) as w:
        for key, tensor in tensors.items():
            w.write(key, tensor)
