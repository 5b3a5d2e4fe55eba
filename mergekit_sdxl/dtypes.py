"""Every dtype fact in one torch-free table: safetensors code, the name users type, torch name, item size,
float-ness, finite range, accepted spellings, the rank safetensors' own writer sorts tensors by, and the roles a
dtype may play. Every command's `--dtype` choices and the recipe's `output.dtype` / `output.compute_dtype` read
the roles here, so one list answers "which dtypes may I use for X" everywhere.

Roles:
- `checkpoint`: storage dtype of a written checkpoint's float tensors (merge output, convert, test checkpoints):
  fp16, bf16, fp32, fp8_e4m3fn, fp8_e5m2.
- `weights`: dtype of adapter factors and of weights handed to diffusers/ONNX or baked: fp16, bf16, fp32.
- `compute`: the merge arithmetic: fp32, fp64; fp16 and bf16 round every operation to that dtype, which is how
  A1111 and SuperMerger compute on fp16 inputs (for reproducing their files exactly).

Tensor casts (clamping, scaled fp8) live in `mergekit_sdxl.io.dtypes`, which reads this table.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass

from mergekit_sdxl.errors import UsageError

CHECKPOINT = "checkpoint"
WEIGHTS = "weights"
COMPUTE = "compute"
ROLES = (CHECKPOINT, WEIGHTS, COMPUTE)


@dataclass(frozen=True)
class DtypeInfo:
    """Facts about one safetensors dtype."""

    code: str  # safetensors header string, e.g. "F16"
    name: str  # the name users type and recipes store, e.g. "fp16"
    torch_name: str  # attribute of the torch module, e.g. "float16"
    itemsize: int
    is_float: bool
    rank: int  # position in safetensors' Dtype enum; save_file writes higher ranks first
    fmax: float | None = None  # largest finite value (floats only)
    names: tuple[str, ...] = ()  # further accepted spellings (case-insensitive), besides code, name, torch name
    roles: frozenset[str] = frozenset()


def _row(code: str, name: str, torch_name: str, itemsize: int, rank: int, fmax: float | None = None,
         names: tuple[str, ...] = (), roles: Iterable[str] = ()) -> DtypeInfo:
    return DtypeInfo(code, name, torch_name, itemsize, fmax is not None, rank, fmax, names, frozenset(roles))


DTYPES: dict[str, DtypeInfo] = {d.code: d for d in (
    _row("BOOL", "bool", "bool", 1, 0),
    _row("U8", "uint8", "uint8", 1, 4),
    _row("I8", "int8", "int8", 1, 5),
    _row("F8_E5M2", "fp8_e5m2", "float8_e5m2", 1, 6, 57344.0, ("e5m2",), (CHECKPOINT,)),
    _row("F8_E4M3", "fp8_e4m3fn", "float8_e4m3fn", 1, 7, 448.0, ("fp8_e4m3", "e4m3fn", "fp8"), (CHECKPOINT,)),
    _row("I16", "int16", "int16", 2, 9),
    _row("U16", "uint16", "uint16", 2, 10),
    _row("F16", "fp16", "float16", 2, 11, 65504.0, ("half",), (CHECKPOINT, WEIGHTS, COMPUTE)),
    _row("BF16", "bf16", "bfloat16", 2, 12, 3.3895313892515355e38, (), (CHECKPOINT, WEIGHTS, COMPUTE)),
    _row("I32", "int32", "int32", 4, 13),
    _row("U32", "uint32", "uint32", 4, 14),
    _row("F32", "fp32", "float32", 4, 15, 3.4028234663852886e38, ("float",), (CHECKPOINT, WEIGHTS, COMPUTE)),
    _row("F64", "fp64", "float64", 8, 17, 1.7976931348623157e308, ("double",), (COMPUTE,)),
    _row("I64", "int64", "int64", 8, 18),
    _row("U64", "uint64", "uint64", 8, 19),
)}
# safetensors' enum also has F4, F6_E2M3, F6_E3M2 (ranks 1-3), F8_E8M0 (8) and C64 (16): no use in SD checkpoints,
# so the reader refuses them with a clear message rather than guessing a layout.

_BY_NAME: dict[str, str] = {}
for _d in DTYPES.values():
    for _n in (_d.code, _d.name, _d.torch_name, *_d.names):
        _BY_NAME[_n.lower()] = _d.code


def info(code: str) -> DtypeInfo:
    """The table row for a safetensors dtype code; KeyError if unknown."""
    return DTYPES[code]


def choices(role: str) -> tuple[str, ...]:
    """The names (`fp16`, ...) of the dtypes that may play `role`, in the table's order (narrowest first)."""
    if role not in ROLES:
        raise ValueError(f"unknown dtype role {role!r}; known: {', '.join(ROLES)}")
    return tuple(d.name for d in DTYPES.values() if role in d.roles)


def lookup(name: str) -> DtypeInfo | None:
    """The row for any accepted spelling ("fp16", "float16", "F16", "half", "torch.float16"), or None."""
    code = _BY_NAME.get(str(name).strip().lower().removeprefix("torch."))
    return None if code is None else DTYPES[code]


def parse_dtype(name: str, role: str | None = None, what: str = "dtype") -> str:
    """The safetensors code of `name` (any accepted spelling); with `role`, only a dtype allowed in that role.

    Raises:
        UsageError: one line naming `what` (e.g. "--dtype"), the value, and the allowed names.
    """
    found = lookup(name)
    allowed = choices(role) if role else tuple(d.name for d in DTYPES.values())
    if found is None or (role is not None and role not in found.roles):
        close = difflib.get_close_matches(str(name).strip().lower(), allowed, n=1)
        hint = f"; did you mean {close[0]!r}?" if close and found is None else ""
        known = "unknown dtype" if found is None else "dtype not allowed here:"
        raise UsageError(f"{what}: {known} {name!r}{hint} (use one of {', '.join(allowed)})")
    return found.code


def name_of(code: str) -> str:
    """The user-facing name of a safetensors code ("F16" -> "fp16")."""
    return DTYPES[code].name


def is_float(code: str) -> bool:
    """True for floating-point codes (the only ones casts change); KeyError for unknown codes."""
    return DTYPES[code].is_float


def is_float_dtype(name: str) -> bool:
    """True for a floating-point dtype in any spelling (`F16`, `BF16`, `F8_E4M3`, `float32`, `torch.half`)."""
    found = lookup(name)
    return found is not None and found.is_float


def is_fp8(code: str) -> bool:
    """True for the two fp8 formats."""
    return code in ("F8_E4M3", "F8_E5M2")


def itemsize(code: str) -> int:
    """Bytes per element of a safetensors code."""
    return DTYPES[code].itemsize
