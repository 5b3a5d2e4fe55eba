"""`.ckpt` / `.pt` / `.pth` checkpoints, loaded with `torch.load(weights_only=True)` and nothing else.

A pickle can run arbitrary code when it is loaded, so the full unpickler is never used: only tensors, plain
containers and numbers are accepted.

Zip-format files (torch >= 1.6) are read like safetensors files: the pickle is unpickled onto the meta device
(shapes, strides and the file offset of each storage; no tensor data), every tensor is checked against the zip
member that holds its storage, and tensor bytes are then read with positional reads (`pread`), never through a
memory map: a file truncated or rewritten while we read it gives a CheckpointError, not a SIGBUS. Checked before
any data is read:
- the storage is a stored (uncompressed) zip member exactly as large as the pickle declares, inside the file;
- each tensor is an ordinary dense CPU tensor (no sparse, quantized, nested or meta-device tensors) whose strides
  neither overlap nor repeat elements (no stride-0 expansion of a tiny storage into a huge tensor) and stay
  inside its storage;
- all tensors together hold at most AMPLIFICATION times the bytes stored (tensors may share storage, but a few
  KB cannot become GBs of output);
- the pickle itself is at most MAX_PICKLE bytes; `{"state_dict": ...}` wrappers are unwrapped at most
  MAX_NESTING deep, and a dict that contains itself is refused.
Legacy (pre-zip) pickles are read whole by torch (in memory, no map) and get the same tensor checks.
"""

from __future__ import annotations

import io
import math
import os
import pickle
import struct
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from mergekit_sdxl.errors import CheckpointError
from mergekit_sdxl.io.dtypes import code_of
from mergekit_sdxl.io.posio import PositionalFile, tensor_memory
from mergekit_sdxl.io.reader import TensorInfo, open_regular

UNSAFE_HINT = ("it contains pickled Python objects other than tensors, and unpickling arbitrary objects is refused "
               "for safety (it can run code). Use a .safetensors version of the model, or convert this file with "
               "a tool you trust")
MAX_PICKLE = 64 << 20  # data.pkl of a full SDXL checkpoint is about 200 KB
MAX_NESTING = 8
AMPLIFICATION = 2
_SLACK = 1 << 20


@dataclass(frozen=True)
class _Stored:
    """Where one tensor's bytes are: a storage at `offset` in the file (`None`: tensor already in memory)."""

    tensor: torch.Tensor  # meta (zip) or CPU (legacy) tensor carrying dtype, shape, strides, storage offset
    offset: int | None
    storage_bytes: int


def load_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Load a PyTorch checkpoint safely and return its flat {key: tensor} state dict (every tensor read).

    Raises:
        CheckpointError: see TorchCheckpoint.
    """
    with TorchCheckpoint(path) as ckpt:
        return {key: ckpt.read(key) for key in ckpt.keys()}


class TorchCheckpoint:
    """A `.ckpt/.pt/.pth` state dict behind the same interface as SafetensorsReader (module docstring).

    Raises:
        CheckpointError: the file needs a full unpickler, is not a checkpoint, holds non-tensor values, or fails
            one of the checks in the module docstring.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.metadata: dict[str, str] = {}
        self._file: PositionalFile | None = PositionalFile(open_regular(self.path))
        self._fd = self._file.fd
        try:
            self.size = os.fstat(self._fd).st_size
            self._tensors = self._load()
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------------------------------------ loading
    def _load(self) -> dict[str, _Stored]:
        head = self._pread(0, 4)
        members = self._zip_members() if head == b"PK\x03\x04" else None
        obj = self._unpickle(members is not None)
        state = self._unwrap(obj)
        entries = {}
        for key, value in state.items():
            if not isinstance(key, str):
                raise CheckpointError(f"{self.path}: key {key!r} is not a string")
            if not isinstance(value, torch.Tensor):
                raise CheckpointError(f"{self.path}: key {key!r} holds a {type(value).__name__}, not a tensor; "
                                      "only flat dicts of tensors are supported")
            entries[key] = self._check(key, value, members)
        self._check_total(entries)
        return entries

    def _zip_members(self) -> dict[int, tuple[str, int, int]]:
        """{data offset: (member name, size, compression)} of every zip member; the pickle's size is checked."""
        with self._stream() as f:
            try:
                infos = zipfile.ZipFile(f).infolist()
            except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
                raise CheckpointError(f"{self.path}: not a readable PyTorch checkpoint: {exc}") from exc
        members = {}
        for info in infos:
            if info.filename.endswith("data.pkl") and info.file_size > MAX_PICKLE:
                raise CheckpointError(f"{self.path}: its pickle is {info.file_size} bytes, over the {MAX_PICKLE}-byte "
                                      "limit; not a model checkpoint")
            if info.filename.endswith("/byteorder"):
                self._check_byteorder(info)
            local = self._pread(info.header_offset, 30)
            if len(local) < 30 or local[:4] != b"PK\x03\x04":
                raise CheckpointError(f"{self.path}: zip member {info.filename!r} has no valid local header")
            name_len, extra_len = struct.unpack("<HH", local[26:30])
            members[info.header_offset + 30 + name_len + extra_len] = (info.filename, info.file_size,
                                                                        info.compress_type)
        return members

    def _check_byteorder(self, info: zipfile.ZipInfo) -> None:
        if info.file_size > 16 or info.compress_type != zipfile.ZIP_STORED:
            raise CheckpointError(f"{self.path}: invalid byteorder record")
        with self._stream() as f:
            order = zipfile.ZipFile(f).read(info).decode("ascii", "replace")
        if order != "little":
            raise CheckpointError(f"{self.path}: stores {order!r}-endian tensors; only little-endian checkpoints "
                                  "are supported")

    def _pread(self, offset: int, size: int) -> bytes:
        """Up to `size` bytes at `offset` (fewer at the end of the file)."""
        assert self._file is not None
        size = max(0, min(size, self.size - offset))
        try:
            return self._file.read(offset, size)
        except (OSError, EOFError) as exc:
            raise CheckpointError(f"{self.path}: cannot read: {getattr(exc, 'strerror', None) or exc}") from exc

    def _stream(self) -> io.BufferedReader:
        """A buffered reader over our own descriptor (the file we checked, whatever happens to the path)."""
        f = open(os.dup(self._fd), "rb")  # noqa: SIM115 - closed by the caller's `with`
        f.seek(0)  # a dup shares the file position with every other dup
        return f

    def _unpickle(self, zipped: bool) -> object:
        try:
            with warnings.catch_warnings(), self._stream() as f:
                warnings.simplefilter("ignore")  # "pickle protocol N" notices: harmless and not the user's business
                return torch.load(f, map_location="meta" if zipped else "cpu", weights_only=True, mmap=False)
        except pickle.UnpicklingError as exc:
            raise CheckpointError(f"{self.path}: refused: {UNSAFE_HINT}{_blocked_global(exc)}") from exc
        except Exception as exc:  # noqa: BLE001 - any other failure (RecursionError included) means an unreadable file
            raise CheckpointError(f"{self.path}: not a readable PyTorch checkpoint: {_first_line(exc)}") from exc

    def _unwrap(self, obj: object) -> dict:
        """`{"state_dict": {...}}` (Lightning, SD1) -> the inner dict; cycle-safe and depth-limited."""
        seen: set[int] = set()
        while isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            if id(obj) in seen or obj["state_dict"] is obj:
                raise CheckpointError(f"{self.path}: its state_dict contains itself; not a checkpoint")
            seen.add(id(obj))
            if len(seen) > MAX_NESTING:
                raise CheckpointError(f"{self.path}: state_dict nested more than {MAX_NESTING} levels deep")
            obj = obj["state_dict"]
        if not isinstance(obj, dict):
            raise CheckpointError(f"{self.path}: holds a {type(obj).__name__}, not a dict of tensors")
        if any(value is obj for value in obj.values()):
            raise CheckpointError(f"{self.path}: its dict contains itself; not a checkpoint")
        return obj

    def _check(self, key: str, t: torch.Tensor, members: dict[int, tuple[str, int, int]] | None) -> _Stored:
        where = f"{self.path}: tensor {key!r}"
        kind = (f"a {str(t.layout).removeprefix('torch.')}" if t.layout != torch.strided else "a quantized"
                if t.is_quantized else "a nested" if getattr(t, "is_nested", False) else
                f"a {type(t).__name__}" if type(t) not in (torch.Tensor, torch.nn.Parameter) else None)
        if kind is not None:
            raise CheckpointError(f"{where}: is {kind} tensor; only dense tensors are supported")
        try:
            code_of(t.dtype)
        except KeyError:
            raise CheckpointError(f"{where}: has unsupported dtype {t.dtype}") from None
        storage = t.untyped_storage()
        storage_bytes = storage.nbytes()
        offset = None
        if members is not None:
            offset = getattr(storage, "_checkpoint_offset", None)
            if t.device.type != "meta" or offset is None:
                raise CheckpointError(f"{where}: has no stored data (a meta-device tensor?)")
            member = members.get(offset)
            if member is None:
                raise CheckpointError(f"{where}: its storage does not start at a zip member")
            name, size, compression = member
            if compression != zipfile.ZIP_STORED:
                raise CheckpointError(f"{where}: its storage {name!r} is compressed; torch stores tensors "
                                      "uncompressed (a re-zipped or hostile file)")
            if size != storage_bytes or offset + size > self.size:
                raise CheckpointError(f"{where}: the pickle declares a {storage_bytes}-byte storage but "
                                      f"{name!r} holds {size} bytes")
        elif t.device.type != "cpu":
            raise CheckpointError(f"{where}: is a {t.device.type} tensor with no stored data")
        _check_strides(where, tuple(t.shape), tuple(t.stride()), int(t.storage_offset()), t.element_size(),
                       storage_bytes)
        return _Stored(t, offset, storage_bytes)

    def _check_total(self, entries: dict[str, _Stored]) -> None:
        stored: dict[object, int] = {}
        for e in entries.values():
            ident = e.offset if e.offset is not None else e.tensor.untyped_storage().data_ptr()
            stored[ident] = e.storage_bytes
        held = sum(e.tensor.numel() * e.tensor.element_size() for e in entries.values())
        if held > AMPLIFICATION * sum(stored.values()) + _SLACK:
            raise CheckpointError(f"{self.path}: its tensors would hold {held} bytes but only {sum(stored.values())} "
                                  "are stored (storage reused many times); refused")

    # ------------------------------------------------------------------------------------------------ interface
    def keys(self) -> list[str]:
        """Tensor keys in the file's order."""
        return list(self._tensors)

    def __contains__(self, key: object) -> bool:
        return key in self._tensors

    def __len__(self) -> int:
        return len(self._tensors)

    def info(self, key: str) -> TensorInfo:
        """Dtype and shape of `key` (offsets are 0..nbytes: a pickle has no fixed layout)."""
        t = self._get(key).tensor
        return TensorInfo(key, code_of(t.dtype), tuple(t.shape), 0, t.numel() * t.element_size())

    def read(self, key: str) -> torch.Tensor:
        """The tensor `key` (contiguous, CPU, a fresh buffer), read with positional reads."""
        e = self._get(key)
        t = e.tensor
        if e.offset is None:
            return t.contiguous()
        if t.numel() == 0:
            return torch.empty(t.shape, dtype=t.dtype)
        size = t.element_size()
        extent = 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
        raw = torch.empty(extent * size, dtype=torch.uint8)
        start = e.offset + int(t.storage_offset()) * size
        try:
            assert self._file is not None
            self._file.readinto(tensor_memory(raw).cast("B"), start)
        except EOFError as exc:  # a file cut while we read it: an error, never a SIGBUS (nothing is mapped)
            raise CheckpointError(f"{self.path}: reading tensor {key!r}: {exc} (truncated, or changed while being "
                                  "read?)") from exc
        except OSError as exc:
            raise CheckpointError(f"{self.path}: reading tensor {key!r} failed: {exc.strerror}") from exc
        values = raw.view(t.dtype)
        return values.as_strided(t.shape, t.stride()).contiguous()

    def _get(self, key: str) -> _Stored:
        try:
            return self._tensors[key]
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor {key!r}") from None

    def close(self) -> None:
        """Close the file and drop the tensors (idempotent)."""
        self._tensors = {}
        file, self._file = getattr(self, "_file", None), None
        self._fd = -1
        if file is not None:
            file.close()

    def __enter__(self) -> TorchCheckpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


def _check_strides(where: str, shape: tuple[int, ...], stride: tuple[int, ...], offset: int, itemsize: int,
                   storage_bytes: int) -> None:
    """A dense view: no dimension repeats elements (stride 0 or overlapping strides), and it fits its storage."""
    if math.prod(shape) == 0:
        return
    dims = sorted((s, n) for n, s in zip(shape, stride) if n > 1)
    reach = 1  # elements spanned by the dimensions checked so far
    for s, n in dims:
        if s < reach:
            raise CheckpointError(f"{where}: strides {stride} for shape {list(shape)} repeat elements (an expanded "
                                  "or overlapping view); refused")
        reach = s * n
    extent = offset + 1 + sum((n - 1) * s for n, s in zip(shape, stride))
    if offset < 0 or extent * itemsize > storage_bytes:
        raise CheckpointError(f"{where}: shape {list(shape)} with strides {stride} at offset {offset} runs past "
                              f"its {storage_bytes}-byte storage")


def _blocked_global(exc: BaseException) -> str:
    """The line of torch's message that names the refused object (its first line suggests unsafe loading)."""
    for line in str(exc).splitlines():
        if "GLOBAL" in line or "Unsupported" in line:
            return f" ({line.strip()})"
    return ""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return line if len(line) <= 200 else line[:200] + "..."
