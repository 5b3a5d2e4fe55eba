"""`.ckpt` / `.pt` / `.pth` checkpoints, loaded with `torch.load(weights_only=True)` and nothing else.

A pickle can run arbitrary code when it is loaded, so the full unpickler is never used: only tensors, plain
containers and numbers are accepted. Zip-format files (torch >= 1.6) are memory-mapped, so tensors are paged in
as they are read; legacy pickles are read whole.
"""

from __future__ import annotations

import os
import pickle
import warnings
import zipfile
from pathlib import Path

import torch

from mergekit_sdxl.errors import CheckpointError
from mergekit_sdxl.io.dtypes import code_of
from mergekit_sdxl.io.reader import TensorInfo

UNSAFE_HINT = ("it contains pickled Python objects other than tensors, and unpickling arbitrary objects is refused "
               "for safety (it can run code). Use a .safetensors version of the model, or convert this file with "
               "a tool you trust")


def load_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Load a PyTorch checkpoint safely and return its flat {key: tensor} state dict.

    `{"state_dict": {...}}` wrappers (Lightning, SD1 checkpoints) are unwrapped; their other entries (epoch,
    global_step) are ignored.

    Raises:
        CheckpointError: the file needs a full unpickler, is not a checkpoint, or holds non-tensor values.
    """
    p = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "pickle protocol N" notices: harmless and not the user's business
            obj = torch.load(p, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(p))
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"{p}: refused: {UNSAFE_HINT}{_blocked_global(exc)}") from None
    except Exception as exc:  # noqa: BLE001 - any other failure means an unreadable file
        raise CheckpointError(f"{p}: not a readable PyTorch checkpoint: {_first_line(exc)}") from None
    while isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{p}: holds a {type(obj).__name__}, not a dict of tensors")
    for key, value in obj.items():
        if not isinstance(key, str):
            raise CheckpointError(f"{p}: key {key!r} is not a string")
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{p}: key {key!r} holds a {type(value).__name__}, not a tensor; "
                                  "only flat dicts of tensors are supported")
    return obj


def _blocked_global(exc: BaseException) -> str:
    """The line of torch's message that names the refused object (its first line suggests unsafe loading)."""
    for line in str(exc).splitlines():
        if "GLOBAL" in line or "Unsupported" in line:
            return f" ({line.strip()})"
    return ""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class TorchCheckpoint:
    """A loaded `.ckpt/.pt/.pth` state dict behind the same interface as SafetensorsReader."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.metadata: dict[str, str] = {}
        self._tensors = load_state_dict(self.path)
        for key, tensor in self._tensors.items():
            try:
                code_of(tensor.dtype)
            except KeyError:
                raise CheckpointError(f"{self.path}: tensor {key!r} has unsupported dtype {tensor.dtype}") from None

    def keys(self) -> list[str]:
        """Tensor keys in the file's order."""
        return list(self._tensors)

    def __contains__(self, key: object) -> bool:
        return key in self._tensors

    def __len__(self) -> int:
        return len(self._tensors)

    def info(self, key: str) -> TensorInfo:
        """Dtype and shape of `key` (offsets are 0..nbytes: a pickle has no fixed layout)."""
        t = self._get(key)
        return TensorInfo(key, code_of(t.dtype), tuple(t.shape), 0, t.numel() * t.element_size())

    def read(self, key: str) -> torch.Tensor:
        """The tensor `key` (contiguous, CPU)."""
        return self._get(key).contiguous()

    def _get(self, key: str) -> torch.Tensor:
        try:
            return self._tensors[key]
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor {key!r}") from None

    def close(self) -> None:
        """Drop the tensors (and with them the file mapping)."""
        self._tensors = {}

    def __enter__(self) -> TorchCheckpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
