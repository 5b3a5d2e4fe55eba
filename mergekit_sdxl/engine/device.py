"""Device selection: `auto` picks CUDA when present, else CPU; a requested but missing device is an error.

Apple's MPS (`mps`, macOS) is accepted where a command allows it (merge, grid) and torch reports it available;
`auto` never picks it (a streaming merge is bound by disk reads, and MPS has no float64 for `compute_dtype: fp64`).
"""

from __future__ import annotations

import torch

from mergekit_sdxl.dtypes import COMPUTE, choices, lookup
from mergekit_sdxl.errors import DeviceError


def resolve_device(name: str = "auto", allow_mps: bool = False) -> torch.device:
    """`auto` | `cpu` | `cuda` | `cuda:N` (| `mps` with `allow_mps`) -> torch.device, checked for availability."""
    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    choices = "auto, cpu, cuda, cuda:N" + (" or mps" if allow_mps else "")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise DeviceError(f"unknown device {name!r}; use {choices}") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {name!r} requested but CUDA is not available on this machine; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(f"device {name!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    elif device.type == "mps" and allow_mps:
        if not _mps_available():
            raise DeviceError(f"device {name!r} requested but torch reports no MPS device here (it needs macOS 12.3+ "
                              "on Apple silicon or an AMD GPU); use --device cpu")
    elif device.type != "cpu":
        raise DeviceError(f"device type {device.type!r} is not supported here; use {choices}")
    return device


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def check_compute_dtype(device: torch.device, dtype: torch.dtype) -> None:
    """DeviceError when `device` cannot compute in `dtype` (MPS has no float64)."""
    if device.type == "mps" and dtype == torch.float64:
        raise DeviceError("compute dtype fp64 is not available on MPS (Apple GPUs have no float64); use fp32 or "
                          "--device cpu")


def compute_dtype(name: str) -> torch.dtype:
    """fp32 (default) or fp64 for the arithmetic."""
    found = lookup(name)
    if found is None or COMPUTE not in found.roles:
        raise DeviceError(f"unknown compute dtype {name!r}; use {' or '.join(choices(COMPUTE))}")
    return getattr(torch, found.torch_name)
