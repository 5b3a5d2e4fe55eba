"""Lazy, validating safetensors reader and `open_checkpoint`, the one entry point for any checkpoint path.

The header is checked strictly before anything else happens (see `parse_header`), so a corrupt or hostile
file fails with a CheckpointError naming the file and key instead of a crash or a huge allocation later.
Tensor bytes are read with positional reads (`io.posio`: `os.preadv` where it exists, a locked seek + readinto
elsewhere) into a fresh buffer or a caller's buffer: no whole-file mmap, safe to call from several threads at once.
"""

from __future__ import annotations

import json
import math
import os
import stat
import struct
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PureWindowsPath
from typing import TYPE_CHECKING, Any, Protocol

from mergekit_sdxl.errors import CheckpointError
from mergekit_sdxl.io import jsonio
from mergekit_sdxl.io.dtypes import DTYPES, torch_dtype
from mergekit_sdxl.io.inputs import note_read
from mergekit_sdxl.io.posio import PositionalFile, tensor_memory

if TYPE_CHECKING:  # torch is imported where tensors are made, so header-only use stays fast
    import torch

MAX_HEADER = 100 * 1024 * 1024
MAX_HEADER_DEPTH = 8
MAX_DIMS = 16
SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
CKPT_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's dtype and shape. For safetensors, `start`/`end` are the absolute file offsets of its bytes;
    other sources report 0 and nbytes."""

    key: str
    dtype: str  # safetensors code, see io.dtypes
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        """Size of the tensor's data in bytes."""
        return self.end - self.start

    @property
    def numel(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)


class CheckpointReader(Protocol):
    """What every opened checkpoint offers (SafetensorsReader, TorchCheckpoint, diffusers folders)."""

    path: Path
    metadata: dict[str, str]

    def keys(self) -> list[str]: ...
    def __contains__(self, key: object) -> bool: ...
    def info(self, key: str) -> TensorInfo: ...
    def read(self, key: str) -> torch.Tensor: ...
    def close(self) -> None: ...
    def __enter__(self) -> CheckpointReader: ...
    def __exit__(self, *exc: object) -> None: ...


Checkpoint = CheckpointReader  # the shorter name some layers use


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r} in the JSON header")
        result[key] = value
    return result


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_header(raw: bytes, data_len: int, name: str) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Validate a safetensors JSON header against a data region of `data_len` bytes.

    Args:
        raw: the header bytes (after the 8-byte length), trailing spaces allowed.
        data_len: file size minus 8 minus len(raw).
        name: the file name used in error messages.

    Returns:
        ({key: TensorInfo with offsets relative to the data region}, metadata), keys in file order.

    Raises:
        CheckpointError: invalid UTF-8 or JSON, duplicate keys, wrong types, unknown dtypes, sizes that do not
            match shapes, offsets out of bounds, overlapping, or not covering the data region exactly.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"{name}: the safetensors header is not valid UTF-8 ({exc.reason})") from exc
    # a real header nests 3 levels ({key: {"shape": [...]}}); deeper ones are refused before json recurses
    jsonio.check_shape(text, f"{name}: the safetensors header", max_depth=MAX_HEADER_DEPTH, max_values=len(text))
    try:
        parsed = json.loads(text, object_pairs_hook=_no_duplicates)
    except (ValueError, RecursionError) as exc:
        raise CheckpointError(f"{name}: the safetensors header is not valid JSON: {exc}") from exc
    if not isinstance(parsed, dict):
        raise CheckpointError(f"{name}: the safetensors header is not a JSON object")
    metadata = _parse_metadata(parsed.pop("__metadata__", None), name)
    infos = sorted((_parse_entry(key, entry, data_len, name) for key, entry in parsed.items()),
                   key=lambda i: (i.start, i.end))
    _check_layout(infos, data_len, name)
    return {i.key: i for i in infos}, metadata


def _parse_metadata(raw: object, name: str) -> dict[str, str]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise CheckpointError(f"{name}: __metadata__ must be a JSON object of strings")
    for key, value in raw.items():
        if not isinstance(value, str):
            raise CheckpointError(f"{name}: __metadata__ value of {key!r} is {type(value).__name__}, not a string")
    return raw


def _parse_entry(key: str, entry: object, data_len: int, name: str) -> TensorInfo:
    where = f"{name}: tensor {key!r}"
    if not isinstance(entry, dict):
        raise CheckpointError(f"{where}: header entry is not a JSON object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise CheckpointError(f"{where}: unknown or unsupported dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise CheckpointError(f"{where}: shape must be a list of non-negative integers, got {shape!r}")
    if len(shape) > MAX_DIMS or math.prod(max(d, 1) for d in shape) >= 2**62:  # torch sizes are int64
        raise CheckpointError(f"{where}: shape {shape} is too large to be a tensor")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
        raise CheckpointError(f"{where}: data_offsets must be two integers, got {offsets!r}")
    start, end = offsets
    if not 0 <= start <= end <= data_len:
        raise CheckpointError(f"{where}: data_offsets {offsets} outside the data region of {data_len} bytes")
    expected = math.prod(shape) * DTYPES[dtype].itemsize
    if end - start != expected:
        raise CheckpointError(f"{where}: {end - start} bytes stored but shape {shape} of {dtype} needs {expected}")
    return TensorInfo(key, dtype, tuple(shape), start, end)


def _check_layout(infos: list[TensorInfo], data_len: int, name: str) -> None:
    cursor = 0
    for i in infos:  # sorted by offset
        if i.start < cursor:
            raise CheckpointError(f"{name}: tensor {i.key!r} overlaps the previous tensor's bytes")
        if i.start > cursor:
            raise CheckpointError(f"{name}: {i.start - cursor} bytes before tensor {i.key!r} belong to no tensor")
        cursor = i.end
    if cursor != data_len:
        raise CheckpointError(f"{name}: {data_len - cursor} bytes at the end of the data belong to no tensor")


class SafetensorsReader:
    """A validated, lazily read safetensors file.

    Usage:
        with SafetensorsReader(path) as r:
            for key in r.keys():          # file order (sequential reads)
                t = r.read(key)           # a fresh CPU tensor
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._file = PositionalFile(open_regular(self.path))
        try:
            self.size = os.fstat(self._file.fd).st_size
            self.header_len = self._read_header_len()
            raw = self._pread(8, self.header_len)
            self._infos, self.metadata = parse_header(raw, self.size - 8 - self.header_len, str(self.path))
        except BaseException:
            self.close()
            raise
        self.data_start = 8 + self.header_len

    def _read_header_len(self) -> int:
        if self.size < 8:
            raise CheckpointError(f"{self.path}: only {self.size} bytes, too short for a safetensors file")
        (n,) = struct.unpack("<Q", self._pread(0, 8))
        if n > MAX_HEADER:
            raise CheckpointError(f"{self.path}: header length {n} exceeds the {MAX_HEADER}-byte limit; "
                                  "not a safetensors file, or corrupt")
        if 8 + n > self.size:
            raise CheckpointError(f"{self.path}: header length {n} runs past the end of the {self.size}-byte "
                                  "file (truncated download?)")
        return n

    def _pread(self, offset: int, size: int) -> bytes:
        buf = bytearray(size)
        self._readinto(memoryview(buf), offset)
        return bytes(buf)

    def _readinto(self, view: memoryview, offset: int) -> None:
        try:
            self._file.readinto(view, offset)
        except EOFError as exc:
            raise CheckpointError(f"{self.path}: {exc}") from exc

    def keys(self) -> list[str]:
        """Tensor keys in file order (ascending offsets): the cheapest order to read them in."""
        return list(self._infos)

    def __contains__(self, key: object) -> bool:
        return key in self._infos

    def __len__(self) -> int:
        return len(self._infos)

    def __iter__(self) -> Iterator[str]:
        return iter(self._infos)

    def info(self, key: str) -> TensorInfo:
        """Dtype, shape and absolute file offsets of `key`."""
        try:
            i = self._infos[key]
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor {key!r}") from None
        return TensorInfo(i.key, i.dtype, i.shape, self.data_start + i.start, self.data_start + i.end)

    def infos(self) -> list[TensorInfo]:
        """Every entry with absolute offsets, in file order."""
        return [self.info(k) for k in self._infos]

    def read(self, key: str) -> torch.Tensor:
        """The tensor `key` in a fresh CPU buffer, in its stored dtype."""
        import torch

        i = self.info(key)
        return self._fill(i, torch.empty(i.nbytes, dtype=torch.uint8))

    def read_into(self, key: str, buffer: torch.Tensor) -> torch.Tensor:
        """Read `key` into the front of a caller's contiguous CPU uint8 tensor (e.g. pinned, reused).

        Returns:
            A view of `buffer` with the tensor's dtype and shape; valid until the buffer is reused.
        """
        import torch

        i = self.info(key)
        if buffer.dtype != torch.uint8 or buffer.dim() != 1 or not buffer.is_contiguous() or buffer.is_cuda:
            raise ValueError("read_into needs a contiguous 1-D uint8 CPU tensor")
        if buffer.numel() < i.nbytes:
            raise ValueError(f"buffer of {buffer.numel()} bytes is too small for {key!r} ({i.nbytes} bytes)")
        return self._fill(i, buffer[: i.nbytes])

    def read_part_into(self, key: str, first: int, count: int, buffer: torch.Tensor) -> torch.Tensor:
        """Values `first` .. `first + count - 1` of `key` (flattened, file order) read into the front of a caller's
        contiguous CPU uint8 tensor: a tensor streamed in pieces small enough to stay in the CPU cache.

        Returns:
            A 1-D view of `buffer` with the tensor's dtype; valid until the buffer is reused.
        """
        import torch

        i = self.info(key)
        size = DTYPES[i.dtype].itemsize
        if first < 0 or count < 0 or first + count > i.numel:
            raise ValueError(f"values {first}..{first + count} are outside {key!r} ({i.numel} values)")
        if buffer.dtype != torch.uint8 or buffer.dim() != 1 or not buffer.is_contiguous() or buffer.is_cuda:
            raise ValueError("read_part_into needs a contiguous 1-D uint8 CPU tensor")
        if buffer.numel() < count * size:
            raise ValueError(f"buffer of {buffer.numel()} bytes is too small for {count} values of {key!r}")
        part = TensorInfo(key, i.dtype, (count,), i.start + first * size, i.start + (first + count) * size)
        return self._fill(part, buffer[: count * size])

    def read_bytes(self, key: str) -> bytes:
        """The raw stored bytes of `key`."""
        i = self.info(key)
        return self._pread(i.start, i.nbytes)

    def _fill(self, i: TensorInfo, raw: torch.Tensor) -> torch.Tensor:
        if i.nbytes:
            try:
                self._readinto(tensor_memory(raw).cast("B"), i.start)
            except OSError as exc:
                raise CheckpointError(f"{self.path}: reading tensor {i.key!r} failed: {exc.strerror}") from exc
        return raw.view(torch_dtype(i.dtype)).reshape(i.shape)

    def close(self) -> None:
        """Close the file descriptor (idempotent)."""
        file = getattr(self, "_file", None)
        if file is not None:
            file.close()

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SafetensorsReader({str(self.path)!r}, {len(self._infos)} tensors)"


def open_regular(path: Path) -> int:
    """A read-only descriptor of a regular file. O_NONBLOCK so a FIFO cannot block the open; anything that is not
    a regular file (FIFO, socket, device) is refused with a CheckpointError, as is an open that fails."""
    try:  # O_NONBLOCK and O_BINARY exist only on POSIX and Windows respectively
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot open: {exc.strerror or exc}") from exc
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        what = "a FIFO" if stat.S_ISFIFO(mode) else "a folder" if stat.S_ISDIR(mode) else "a special file"
        raise CheckpointError(f"{path}: is {what}, not a checkpoint file")
    if hasattr(os, "O_NONBLOCK") and sys.platform != "win32":  # the platform test tells the type checker too
        os.set_blocking(fd, True)
    note_read(path, fd)  # no output of this run may land on it (io/inputs.py)
    return fd


def sniff(path: Path) -> str:
    """"safetensors", "torch-zip", "torch-pickle" or "unknown", from the first bytes of a file.

    Raises:
        CheckpointError: the path cannot be opened or is not a regular file (e.g. a FIFO).
    """
    with PositionalFile(open_regular(path)) as file:
        try:
            head = file.read(0, min(9, os.fstat(file.fd).st_size))
        except (OSError, EOFError) as exc:
            raise CheckpointError(f"{path}: cannot read: {getattr(exc, 'strerror', None) or exc}") from exc
    # safetensors first: a header length of 128 + 256*k (k = 2..5) starts with the bytes of a pickle's PROTO
    # opcode, while a pickle's first 8 bytes never read as a length up to MAX_HEADER
    if len(head) == 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] <= MAX_HEADER:
        return "safetensors"
    if head[:4] == b"PK\x03\x04":
        return "torch-zip"
    if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:
        return "torch-pickle"
    return "unknown"


def open_checkpoint(path: str | os.PathLike[str]) -> CheckpointReader:
    """Open any supported checkpoint: safetensors, `.ckpt/.pt/.pth` (weights only), or a diffusers folder.

    Raises:
        CheckpointError: missing path, unknown format, unsafe pickle, or a malformed file.
    """
    p = Path(path)
    try:
        os.fsencode(p)
    except UnicodeEncodeError:  # Path.exists() would just say False
        raise CheckpointError(f"{p!a}: this file name cannot be written in the system's file name encoding "
                              f"({sys.getfilesystemencoding()}); use a UTF-8 locale (LANG=C.UTF-8) or set "
                              "PYTHONUTF8=1") from None
    if p.is_dir():
        return _open_folder(p)
    if not p.exists():
        raise CheckpointError(f"{p}: no such file{_foreign_path_hint(p)}")
    kind = sniff(p)
    if kind == "safetensors" or (kind == "unknown" and p.suffix.lower() in SAFETENSORS_SUFFIXES):
        return SafetensorsReader(p)
    if kind in ("torch-zip", "torch-pickle"):
        from mergekit_sdxl.io.ckpt import TorchCheckpoint

        return TorchCheckpoint(p)
    raise CheckpointError(f"{p}: not a safetensors or PyTorch checkpoint (unrecognised first bytes)")


def _foreign_path_hint(p: Path) -> str:
    """A hint when a missing path was written for Windows (drive letter, UNC or backslashes) but this is not."""
    text = str(p)
    if os.name == "nt" or ("\\" not in text and not PureWindowsPath(text).drive):
        return ""
    return " (it looks like a Windows path; on this system write paths with '/' and without a drive letter)"


def _open_folder(p: Path) -> CheckpointReader:
    from mergekit_sdxl.io import diffusers_folder

    note_read(p)  # the folder and every file in it
    return diffusers_folder.open_diffusers_folder(p)
