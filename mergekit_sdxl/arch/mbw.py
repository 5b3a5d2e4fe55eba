"""MBW (merge block weighted) vectors: parse lists, strings, named dicts and presets into one weight per block.

Accepted forms (docs/conventions.md, section 2), for `arch` "sdxl" or "sd15" (layouts: `ArchSpec.blocks`):
- 20 values for SDXL (BASE, IN00..IN08, M00, OUT00..OUT08) or 26 for SD1.x (BASE, IN00..IN11, M00, OUT00..OUT11);
- 26 values for SDXL: SuperMerger's positions 0-9 and 13-22 (IN09-11 and OUT09-11 are dropped). A list or string
  may drop only values that carry nothing: each of IN09..IN11 must equal IN08 or M00 (its kept neighbours) and each
  of OUT09..OUT11 must equal OUT08 (its one kept neighbour); otherwise it is refused, naming the dropped positions.
  Preset names are SuperMerger's own SD1 vectors and keep its rule unchecked;
- 25 values plus a separate `base_alpha` (bbc-mc MBW, meh): the 25 are IN00..OUT11, base_alpha is BASE;
- under the sd-mecha convention on SDXL, a 21st value for the VAE (without it the VAE follows BASE);
- a string "0,0.1, 0.1" of those values, a preset name (GRAD_V, FLAT_25, ...), or a named form
  `{IN04: 0.3, OUT00..OUT02: 0.5, MID: 0, default: 0}` (also as the string "IN04:0.3, OUT00..OUT02:0.5").
In the named form a single block beats a range, and a range beats `default`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from mergekit_sdxl.arch.blocks import DEFAULT_CONVENTION, block_names
from mergekit_sdxl.arch.registry import arch_spec
from mergekit_sdxl.arch.tables import check_arch
from mergekit_sdxl.errors import RecipeError

SD1_LEN = 26
# the blocks of SuperMerger's 26-value SD1 vector, by position
_SD1_BLOCKS = ("BASE", *(f"IN{i:02d}" for i in range(12)), "M00", *(f"OUT{i:02d}" for i in range(12)))
_SDXL_FROM_SD1 = (*range(0, 10), *range(13, 23))  # SuperMerger's 26 -> 20 rule for SDXL
# the positions that rule drops, each run with the kept positions next to it: IN09..IN11 sit between IN08 and M00,
# OUT09..OUT11 follow OUT08 (the last block)
_SD1_DROPPED: tuple[tuple[tuple[int, ...], tuple[int, ...]], ...] = (((10, 11, 12), (9, 13)), ((23, 24, 25), (22,)))
_BLOCK = re.compile(r"^(BASE|VAE|MID|M|IN|OUT)(\d*)$")
_NAMED = re.compile(r"^([^:=]+?)\s*[:=]\s*(.*)$")


def _smoothstep(t: float) -> float:
    return 3 * t * t - 2 * t * t * t


def _blocks25(f: Any) -> tuple[float, ...]:
    """BASE 0 followed by f(t) for the 25 blocks IN00..OUT11, t = i/24."""
    return (0.0, *(float(f(i / 24)) for i in range(25)))


def _ones(*spans: tuple[int, int]) -> tuple[float, ...]:
    """A 26-value vector that is 1 on the given [start, end) position spans, else 0."""
    return tuple(float(any(a <= i < b for a, b in spans)) for i in range(SD1_LEN))


# SuperMerger's presets, as the 26-value SD1 vectors it ships (values to 1e-10 of its file).
PRESETS: dict[str, tuple[float, ...]] = {
    "GRAD_V": (0.0, *((12 - i) / 12 for i in range(12)), 0.0, *((i + 1) / 12 for i in range(12))),
    "GRAD_A": (0.0, *(i / 12 for i in range(12)), 1.0, *((11 - i) / 12 for i in range(12))),
    "FLAT_25": (0.0, *[0.25] * 25),
    "FLAT_75": (0.0, *[0.75] * 25),
    "WRAP08": _ones((1, 5), (22, 26)),
    "WRAP12": _ones((1, 7), (20, 26)),
    "WRAP14": _ones((1, 8), (19, 26)),
    "WRAP16": _ones((1, 9), (18, 26)),
    "MID12_50": tuple(0.5 * x for x in _ones((6, 20))),
    "OUT07": _ones((19, 26)),
    "OUT12": _ones((14, 26)),
    "OUT12_5": tuple(0.5 if i == 13 else x for i, x in enumerate(_ones((14, 26)))),
    "RING08_5": _ones((7, 11), (16, 20)),
    "RING10_5": _ones((6, 11), (16, 21)),
    "RING10_3": _ones((7, 12), (15, 20)),
    "SMOOTHSTEP": _blocks25(_smoothstep),
    "REVERSE-SMOOTHSTEP": _blocks25(lambda t: 1 - _smoothstep(t)),
    "COSINE": _blocks25(lambda t: (1 + math.cos(math.pi * t)) / 2),
    "REVERSE_COSINE": _blocks25(lambda t: (1 - math.cos(math.pi * t)) / 2),
    "ALL_A": (0.0,) * SD1_LEN,
    "ALL_B": (1.0,) * SD1_LEN,
}


def parse_mbw(
    value: Any,
    arch: str,
    convention: str = DEFAULT_CONVENTION,
    *,
    where: str = "MBW weights",
    base_alpha: float | None = None,
    default: float | None = None,
) -> dict[str, float]:
    """Parse an MBW vector into {block: weight} covering `block_names(arch, convention)` in order.

    Args:
        value: a list of numbers, a comma-separated string, a preset name, or a named mapping.
        arch: an architecture id (arch/registry.py).
        convention: block convention; "sd-mecha" adds SDXL's VAE block.
        where: what the value is, for error messages (e.g. "step rev2b, parameter alpha").
        base_alpha: BASE weight for a 25-value vector (older tools keep it separate).
        default: fill for blocks a named mapping leaves out (its own `default` entry wins).

    Returns:
        One finite float per block, in block order.

    Raises:
        RecipeError: naming `where`, for wrong lengths, unknown names or presets, and non-finite or
        non-numeric values.
    """
    check_arch(arch)
    names = block_names(arch, convention)
    if isinstance(value, Mapping):
        return _from_mapping(value, names, where, default)
    if isinstance(value, str):
        text = value.strip()
        if text.upper() in PRESETS:
            return _from_list(list(PRESETS[text.upper()]), arch, names, where, None, preset=True)
        if ":" in text or "=" in text:
            return _from_mapping(_split_named(text, where), names, where, default)
        if re.fullmatch(r"[A-Za-z][\w*/+-]*", text):
            raise RecipeError(f"{where}: unknown preset {text!r}; presets: {', '.join(PRESETS)}")
        value = [part.strip() for part in text.replace("\n", ",").split(",") if part.strip()]
    if isinstance(value, Sequence):
        values = [_number(item, where, f"value {i + 1}") for i, item in enumerate(value)]
        base = None if base_alpha is None else _number(base_alpha, where, "base_alpha")
        return _from_list(values, arch, names, where, base)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        raise RecipeError(f"{where}: a single number is not a block-weight vector; {_expected(arch, names)}")
    raise RecipeError(f"{where}: expected a list, string, preset name or mapping of block weights, "
                      f"got {type(value).__name__}")


def to_list(weights: Mapping[str, float], arch: str, convention: str = DEFAULT_CONVENTION) -> list[float]:
    """The weights as a vector in block order (the inverse of parse_mbw on a list of the right length)."""
    return [weights[name] for name in block_names(arch, convention)]


def _from_list(values: list[float], arch: str, names: tuple[str, ...], where: str,
               base_alpha: float | None, *, preset: bool = False) -> dict[str, float]:
    n_blocks = len(names) - 1 if names[-1] == "VAE" else len(names)  # the VAE weight is optional
    if len(values) == SD1_LEN - 1:
        if base_alpha is None:
            raise RecipeError(f"{where}: 25 values (IN00..IN11, M00, OUT00..OUT11, as bbc-mc MBW and meh write "
                              f"them) need a separate base_alpha for BASE")
        values = [base_alpha, *values]
    elif base_alpha is not None:
        raise RecipeError(f"{where}: base_alpha goes only with 25 values; got {len(values)} values")
    if arch_spec(arch).blocks.sd1_vector and len(values) == SD1_LEN:
        if not preset:
            _check_dropped(values, where)
        values = [values[i] for i in _SDXL_FROM_SD1]
    if len(values) == n_blocks and len(names) > n_blocks:
        values = [*values, values[0]]  # VAE follows BASE
    if len(values) != len(names):
        raise RecipeError(f"{where}: {_expected(arch, names)}, got {len(values)}")
    return dict(zip(names, values))


def _check_dropped(values: list[float], where: str) -> None:
    """Refuse a 26-value SD1 vector on SDXL whose dropped positions carry a weight of their own (see the module
    docstring): silently dropping them would merge those layers with a weight the user never wrote."""
    sd1 = _SD1_BLOCKS
    offending = []
    for dropped, kept in _SD1_DROPPED:
        allowed = {values[i] for i in kept}
        for i in dropped:
            if values[i] not in allowed:
                neighbours = " or ".join(f"{sd1[k]} = {values[k]:g}" for k in kept)
                offending.append(f"{sd1[i]} = {values[i]:g} (not {neighbours})")
    if offending:
        raise RecipeError(f"{where}: 26 values (the SD1.x layout) on SDXL drop IN09-IN11 and OUT09-OUT11 (SDXL has "
                          f"no such blocks), but these differ from their kept neighbours and would be lost: "
                          f"{'; '.join(offending)}. Give the 20 SDXL values (BASE, IN00..IN08, M00, OUT00..OUT08), "
                          "or set each of IN09-IN11 to IN08 or M00 and each of OUT09-OUT11 to OUT08")


def _expected(arch: str, names: tuple[str, ...]) -> str:
    spec = arch_spec(arch)
    depth, length = spec.blocks.depth, spec.blocks.length
    layout = f"BASE, IN00..IN{depth - 1:02d}, M00, OUT00..OUT{depth - 1:02d}"
    if not spec.blocks.sd1_vector:
        return f"expected {length} values ({layout}) for {spec.name}, or {length - 1} with base_alpha"
    if names[-1] == "VAE":
        layout = f"BASE, IN00..IN{depth - 1:02d}, M00, OUT00..OUT{depth - 1:02d}[, VAE]"
        return f"expected {length} or {length + 1} values ({layout}) for {spec.name}, or 26 (SuperMerger SD1 layout)"
    return f"expected {length} values ({layout}) for {spec.name}, or 26 (SuperMerger SD1 layout)"


def _number(item: Any, where: str, what: str) -> float:
    if isinstance(item, bool) or not isinstance(item, (int, float, str)):
        raise RecipeError(f"{where}: {what} is {item!r}, not a number")
    try:
        number = float(item)
    except ValueError:
        raise RecipeError(f"{where}: {what} is {item!r}, not a number") from None
    if not math.isfinite(number):
        raise RecipeError(f"{where}: {what} is {item!r}; weights must be finite numbers")
    return number


def _split_named(text: str, where: str) -> dict[str, str]:
    """"IN04:0.3, OUT00..OUT02=0.5" -> {"IN04": "0.3", "OUT00..OUT02": "0.5"}."""
    out: dict[str, str] = {}
    for part in (p.strip() for p in re.split(r"[,;\n]", text)):
        if not part:
            continue
        match = _NAMED.match(part)
        if not match:
            raise RecipeError(f"{where}: {part!r} is not NAME:VALUE (e.g. IN04:0.3 or OUT00..OUT02:0.5)")
        name, number = match.groups()
        if name in out:
            raise RecipeError(f"{where}: {name!r} is given twice")
        out[name] = number
    return out


def _from_mapping(mapping: Mapping[Any, Any], names: tuple[str, ...], where: str,
                  default: float | None) -> dict[str, float]:
    singles: dict[str, float] = {}
    ranged: dict[str, tuple[float, str]] = {}
    for raw_name, raw_value in mapping.items():
        label = str(raw_name).strip()
        number = _number(raw_value, where, f"{label!r}")
        if label.lower() == "default":
            default = number
            continue
        targets = _resolve(label, names, where)
        if len(targets) == 1 and ".." not in label:
            if targets[0] in singles:
                raise RecipeError(f"{where}: block {targets[0]} is given twice")
            singles[targets[0]] = number
            continue
        for block in targets:
            if block in ranged:
                raise RecipeError(f"{where}: block {block} is in both {ranged[block][1]!r} and {label!r}")
            ranged[block] = (number, label)
    weights: dict[str, float] = {}
    missing = []
    for block in names:
        if block in singles:
            weights[block] = singles[block]
        elif block in ranged:
            weights[block] = ranged[block][0]
        elif default is not None:
            weights[block] = default
        else:
            missing.append(block)
    if missing:
        raise RecipeError(f"{where}: no weight for {', '.join(missing)}; give them or a `default`")
    return weights


def _resolve(label: str, names: tuple[str, ...], where: str) -> list[str]:
    """Block names a label stands for: one block, or an inclusive range `OUT00..OUT02` in block order."""
    if ".." in label:
        start, _, end = label.partition("..")
        first, last = _canonical(start, names, where), _canonical(end, names, where)
        i, j = names.index(first), names.index(last)
        if i > j:
            raise RecipeError(f"{where}: range {label!r} runs backwards; write {last}..{first}")
        return list(names[i:j + 1])
    return [_canonical(label, names, where)]


def _canonical(label: str, names: tuple[str, ...], where: str) -> str:
    """`in4`, `IN04` -> IN04; `MID`, `M`, `M00` -> M00; `base` -> BASE; unknown names are errors."""
    match = _BLOCK.match(label.strip().upper())
    name = label.strip().upper()
    if match:
        kind, digits = match.groups()
        if kind in ("MID", "M") and digits in ("", "0", "00"):
            name = "M00"
        elif kind in ("IN", "OUT") and digits:
            name = f"{kind}{int(digits):02d}"
    if name not in names:
        raise RecipeError(f"{where}: unknown block {label!r}; the blocks are {', '.join(names)} "
                          "(MID = M00; ranges like OUT00..OUT02; `default` for the rest)")
    return name
