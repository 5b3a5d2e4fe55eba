"""Device selection: `auto` picks CUDA when present, else CPU; a requested but missing device is an error."""

from __future__ import annotations

import torch

from mergekit_sdxl.dtypes import COMPUTE, choices, lookup
from mergekit_sdxl.errors import DeviceError


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` | `cpu` | `cuda` | `cuda:N` -> torch.device, checked for availability."""
    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise DeviceError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {name!r} requested but CUDA is not available on this machine; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(f"device {name!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    elif device.type != "cpu":
        raise DeviceError(f"device type {device.type!r} is not supported; use auto, cpu or cuda[:N]")
    return device


def compute_dtype(name: str) -> torch.dtype:
    """fp32 (default) or fp64 for the arithmetic."""
    found = lookup(name)
    if found is None or COMPUTE not in found.roles:
        raise DeviceError(f"unknown compute dtype {name!r}; use {' or '.join(choices(COMPUTE))}")
    return getattr(torch, found.torch_name)
