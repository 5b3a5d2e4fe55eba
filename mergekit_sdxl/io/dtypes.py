"""Tensor casts between the dtypes of `mergekit_sdxl.dtypes` (the torch-free table of every dtype fact, re-exported
here), and the scaled-fp8 layout.

Casting rules (`cast`):
- Only float tensors are cast; integer and bool tensors (e.g. int64 `position_ids`) keep their dtype.
- A narrowing float cast (fp32 -> fp16, anything -> fp8) first clamps to the target's finite range
  (e4m3fn ±448, e5m2 ±57344, fp16 ±65504) and reports how many values were clamped (±inf counts as clamped;
  NaN stays NaN). A plain `.to()` would turn them into inf or NaN.

Scaled fp8 (`to_storage(..., scaled=True)`, explicit opt-in only), in ComfyUI's layout (the facts: which tensors,
key names, marker, dtypes, are in `mergekit_sdxl.arch.scaled_fp8`, re-exported here): a weight `W` is written as
`q = fp8(W / s)` with one float32 scalar per tensor, `s = amax(|W|) / fmax` (s = 1 when W is all zero or has no
finite value), stored beside it as a 0-dim F32 tensor under `<prefix>.scale_weight` (`scale_key`). The value is
recovered as `q.float() * s` (`dequantize_scaled`). Non-finite inputs (±inf) clamp to ±fmax and are counted.
A loader that does not know the convention reads `W / s` instead of `W`, which is why it is never implicit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mergekit_sdxl.arch.scaled_fp8 import (
    LEGACY_MARKER,
    REST_DTYPE,
    SCALE_SUFFIX,
    SCALED_DTYPE,
    SCALED_MARKER,
    is_marker,
    is_scalable,
    scale_key,
    scaled_key_of,
    storage_dtype,
)
from mergekit_sdxl.dtypes import (
    CHECKPOINT,
    DTYPES,
    DtypeInfo,
    choices,
    info,
    is_float,
    is_fp8,
    itemsize,
    lookup,
    name_of,
    parse_dtype,
)

__all__ = [  # the table's names and the scaled-fp8 layout facts are re-exported for callers that also cast
    "CHECKPOINT", "CLI_TARGETS", "DTYPES", "LEGACY_MARKER", "REST_DTYPE", "SCALED_DTYPE", "SCALED_MARKER",
    "SCALE_SUFFIX", "DtypeInfo", "Stored", "amax", "cast", "choices", "code_of", "dequantize_scaled",
    "fp8_has_non_finite", "info", "is_float", "is_fp8", "is_marker", "is_scalable", "itemsize", "lookup", "name_of",
    "parse_dtype", "scale_key", "scaled_key_of", "storage_dtype", "to_scaled_fp8", "to_storage", "torch_dtype",
]

from mergekit_sdxl.errors import CheckpointError

if TYPE_CHECKING:  # torch is imported where tensors are made, so header-only use stays fast
    import torch


CLI_TARGETS = choices(CHECKPOINT)


def torch_dtype(code: str) -> torch.dtype:
    """The torch dtype for a safetensors code."""
    import torch

    return getattr(torch, DTYPES[code].torch_name)


def code_of(dtype: torch.dtype) -> str:
    """The safetensors code of a torch dtype; KeyError for dtypes safetensors files cannot hold here."""
    name = str(dtype).removeprefix("torch.")
    found = lookup(name)
    if found is None or found.torch_name != name:
        raise KeyError(f"torch dtype {dtype} has no safetensors code in this tool")
    return found.code


@dataclass
class Stored:
    """A tensor in its storage dtype, its scale (scaled fp8 only) and how many values were clamped."""

    tensor: torch.Tensor
    scale: torch.Tensor | None
    n_clamped: int


def to_storage(value: torch.Tensor, code: str, scaled: bool = False) -> Stored:
    """Cast `value` to the storage dtype `code`: a clamped plain cast, or scaled fp8 when `scaled` is set.

    Non-float values, and non-float targets, are converted with a plain `.to()` (no clamping).
    """
    if scaled and value.is_floating_point():
        q, scale, clamped = to_scaled_fp8(value, code)
        return Stored(q, scale, clamped)
    if not value.is_floating_point() or not is_float(code):
        return Stored(value.to(torch_dtype(code)), None, 0)
    tensor, clamped = cast(value, code)
    return Stored(tensor, None, clamped)


CHUNK = 1 << 22  # elements per slice in the casts below: bounds temporaries to a few MB per tensor


def cast(tensor: torch.Tensor, code: str) -> tuple[torch.Tensor, int]:
    """Cast a float tensor to `code`, clamping to the target's finite range when it is narrower.

    Works slice by slice, so the only full-size allocation is the result.

    Returns:
        (cast tensor, number of clamped values). Non-float tensors and same-dtype tensors come back unchanged.
    """
    import torch

    target = torch_dtype(code)
    if not tensor.is_floating_point() or tensor.dtype == target:
        return tensor, 0
    fmax = _fmax(code)
    if fmax >= _fmax(code_of(tensor.dtype)) or amax(tensor) <= fmax:
        return tensor.to(target), 0
    src = tensor.reshape(-1)
    out = torch.empty(src.shape, dtype=target, device=tensor.device)
    clamped = 0
    for i in range(0, src.numel(), CHUNK):
        part = src[i : i + CHUNK]
        clamped += int((part.abs() > fmax).sum().item())
        # clamp in fp32 at least: bf16 cannot hold 65504, its nearest value 65536 would become inf in fp16
        out[i : i + CHUNK] = part.to(torch.promote_types(part.dtype, torch.float32)).clamp(-fmax, fmax)
    return out.view(tensor.shape), clamped


def _fmax(code: str) -> float:
    """The largest finite value of the float dtype `code`."""
    fmax = DTYPES[code].fmax
    if fmax is None:
        raise ValueError(f"{code} is not a float dtype")
    return fmax


def amax(tensor: torch.Tensor, finite_only: bool = False) -> float:
    """max |x| without a full-size temporary (NaN ignored; with `finite_only`, ±inf ignored too); 0 if empty."""
    import torch

    if tensor.numel() == 0:
        return 0.0
    if tensor.element_size() > 1:  # aminmax is one fast pass, but has no fp8 kernels
        lo, hi = (v.item() for v in torch.aminmax(tensor))
        value = max(-lo, hi)
        if not math.isnan(value) and not (finite_only and math.isinf(value)):
            return value
    src = tensor.reshape(-1)
    best = 0.0
    for i in range(0, src.numel(), CHUNK):
        part = src[i : i + CHUNK].to(torch.float32, copy=True).abs_()  # a copy: never touch the input
        bad = ~part.isfinite() if finite_only else part.isnan()
        best = max(best, part.masked_fill_(bad, 0).amax().item())
    return best


# The smallest byte, with the sign bit set, that codes a non-finite value: e4m3fn has only NaN (0x7F/0xFF), e5m2
# has inf and NaN (exponent all ones: 0x7C-0x7F and 0xFC-0xFF). Finite codes with the sign bit set lie below it.
_FP8_NON_FINITE = {"F8_E4M3": 0xFF, "F8_E5M2": 0xFC}


def fp8_has_non_finite(tensor: torch.Tensor) -> bool:
    """Whether an fp8 tensor holds NaN/inf, from its bytes in one vectorised pass (fp8 has no isfinite kernel,
    and its float reductions are scalar loops)."""
    import torch

    if tensor.numel() == 0:
        return False
    top = int((tensor.reshape(-1).view(torch.uint8) | 0x80).max())
    return top >= _FP8_NON_FINITE[code_of(tensor.dtype)]


def to_scaled_fp8(tensor: torch.Tensor, code: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Quantize to fp8 with one per-tensor scale (see module docstring).

    Returns:
        (fp8 tensor, 0-dim float32 scale, number of clamped values: only ±inf inputs can clamp).
    """
    import torch

    if not is_fp8(code):
        raise ValueError(f"scaled fp8 needs an fp8 target, not {code}")
    fmax = _fmax(code)
    top = amax(tensor)
    finite = math.isfinite(top)
    if not finite:
        top = amax(tensor, finite_only=True)
    scale = torch.tensor(top / fmax if top > 0 else 1.0, dtype=torch.float32)
    src = tensor.reshape(-1)
    out = torch.empty(src.shape, dtype=torch_dtype(code), device=tensor.device)
    clamped = 0
    for i in range(0, src.numel(), CHUNK):
        part = src[i : i + CHUNK].to(torch.float32, copy=True).div_(scale)  # a copy: never touch the input
        if not finite:  # only ±inf can leave the range; rounding past fmax by an ulp rounds back to fmax
            clamped += int(part.isinf().sum().item())
            part.clamp_(-fmax, fmax)
        out[i : i + CHUNK] = part
    return out.view(tensor.shape), scale, clamped


def dequantize_scaled(q: torch.Tensor, scale: torch.Tensor, code: str, where: str = "a scaled fp8 weight") -> \
        torch.Tensor:
    """`q.float() * scale`, cast (without clamping: the product is in range) to `code`.

    Raises:
        CheckpointError: the scale does not broadcast to the weight's shape (names `where`).
    """
    import torch

    try:
        fits = torch.broadcast_shapes(tuple(q.shape), tuple(scale.shape)) == tuple(q.shape)
    except RuntimeError:
        fits = False
    if not fits:
        raise CheckpointError(f"{where}: its scale has shape {list(scale.shape)}, which does not fit the weight's "
                              f"{list(q.shape)}")
    return (q.float() * scale.float()).to(torch_dtype(code))
