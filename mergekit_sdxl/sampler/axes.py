"""Grid axes (`grid --x/--y/--z`), torch-free: what varies along each axis, and the cells they make.

An axis flag is `KIND=V1,V2,...`, or `KIND=V1;V2;...` when values hold commas (prompts, MBW vectors):

    seed=1,2,3            steps=20,28         cfg=4,6,8          sampler=euler_a,dpmpp_2m
    schedule=normal,karras                    prompt=1girl, smile;1boy, night
    negative=lowres;                          model=a.safetensors,b.safetensors (with --recipe: ALIAS=PATH)
    output.alpha=0,0.5,1                      output.alpha=GRAD_V;GRAD_A;0,0.1,...(a whole vector)
    output.alpha[IN04]=0,0.5,1                output.alpha[OUT00..OUT02]=0,1
    rev2.coef[2]=0.25,0.5                     lora.strength=0.5,1    lora.blocks=ALL;MIDD;OUTALL

Several flags for one axis vary together (a joint axis: the n-th value of each makes the n-th point). Every
point is a tuple of `Setting`s; a cell's settings are its X, Y and Z points' together.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from mergekit_sdxl.errors import UsageError
from mergekit_sdxl.recipe.address import ParamAddress, parse_address, parse_blocks

GEN_KINDS: tuple[str, ...] = ("model", "seed", "prompt", "negative", "steps", "cfg", "sampler", "schedule")
MAX_POINTS = 256
MAX_CELLS = 4096


@dataclass(frozen=True)
class Setting:
    """One value of one kind: a generation setting (`kind` in GEN_KINDS) or a recipe parameter (`address`)."""

    kind: str  # a GEN_KINDS entry, or the address text for recipe parameters
    value: Any
    address: ParamAddress | None = None

    @property
    def changes_model(self) -> bool:
        """True when the weights differ with this setting (a model or a recipe parameter)."""
        return self.address is not None or self.kind == "model"

    @property
    def label(self) -> str:
        return _label(self.value)


@dataclass(frozen=True)
class Point:
    """One position along an axis: its label and the settings it makes."""

    label: str
    settings: tuple[Setting, ...]


@dataclass(frozen=True)
class Axis:
    """An axis: its title (the kinds along it) and its points in order."""

    title: str
    points: tuple[Point, ...]

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(s.kind for p in self.points for s in p.settings))


ONE = Axis("", (Point("", ()),))  # an absent axis: one point that sets nothing


def parse_flag(text: str, flag: str = "--x") -> tuple[str, ParamAddress | None, list[Any]]:
    """`"seed=1,2"` -> ("seed", None, [1, 2]); `"out.alpha[IN04]=0,1"` -> ("out.alpha[IN04]", address, ["0", "1"]).

    Raises:
        UsageError: no `=`, no values, an unknown kind (listing the valid ones), or a value of the wrong type.
    """
    kind, sep, raw = text.partition("=")
    kind = kind.strip()
    if not sep or not kind:
        raise UsageError(f"{flag} {text!r}: expected KIND=V1,V2,... ({_kinds_help()})")
    values = split_values(raw)
    if kind not in ("prompt", "negative"):  # `V1;` is one vector that holds commas
        values = [v for v in values if v]
    if not values:
        raise UsageError(f"{flag} {kind}: no values after '='")
    if len(values) > MAX_POINTS:
        raise UsageError(f"{flag} {kind}: {len(values)} values; at most {MAX_POINTS}")
    if kind in GEN_KINDS:
        return kind, None, [_typed(kind, v, flag) for v in values]
    if "." not in kind:
        raise UsageError(f"{flag} {text!r}: unknown kind {kind!r}; valid kinds: {_kinds_help()}")
    address = parse_address(kind)
    return str(address), address, values


def split_values(raw: str) -> list[str]:
    """`;`-separated when the text holds a `;` (values may then hold commas), else `,`-separated (empty values
    dropped); a prompt or negative may be empty only in the `;` form."""
    if ";" in raw:
        return [v.strip() for v in raw.split(";")]
    return [v.strip() for v in raw.split(",") if v.strip()]


def _kinds_help() -> str:
    return (f"{', '.join(GEN_KINDS)}, or a recipe parameter STEP.PARAM, STEP.PARAM[IN04], "
            "STEP.PARAM[OUT00..OUT02], STEP.coef[N]")


def _typed(kind: str, value: str, flag: str) -> Any:
    try:
        if kind == "seed":
            number = int(value)
            if not 0 <= number < 2**63:
                raise ValueError
            return number
        if kind == "steps":
            number = int(value)
            if not 1 <= number <= 500:
                raise ValueError
            return number
        if kind == "cfg":
            return float(value)
    except ValueError:
        what = {"seed": "whole numbers from 0 to 2**63-1", "steps": "whole numbers from 1 to 500",
                "cfg": "numbers"}[kind]
        raise UsageError(f"{flag} {kind}: {value!r}; {kind} values are {what}") from None
    if kind in ("model", "sampler", "schedule") and not value:
        raise UsageError(f"{flag} {kind}: an empty value")
    return value


def axis(flags: Sequence[str], flag: str = "--x") -> Axis:
    """The axis made by one or more flag values (joint when several: the n-th values go together)."""
    if not flags:
        return ONE
    parsed = [parse_flag(text, flag) for text in flags]
    kinds = [kind for kind, _, _ in parsed]
    duplicate = next((k for k in kinds if kinds.count(k) > 1), None)
    if duplicate:
        raise UsageError(f"{flag} {duplicate} is given twice; give all its values in one {flag}")
    lengths = {len(values) for _, _, values in parsed}
    if len(lengths) > 1:
        listing = ", ".join(f"{kind} {len(values)}" for kind, _, values in parsed)
        raise UsageError(f"{flag}: a joint axis needs the same number of values for each kind ({listing})")
    points = []
    for i in range(lengths.pop()):
        settings = tuple(Setting(kind, values[i], address) for kind, address, values in parsed)
        points.append(Point(_point_label(settings, joint=len(parsed) > 1), settings))
    return Axis(" | ".join(kinds), tuple(points))


def product_axis(axes: Sequence[Axis]) -> Axis:
    """Every combination of the points of `axes` (first axis slowest), as one axis."""
    real = [a for a in axes if a is not ONE and a.points]
    if not real:
        return ONE
    if len(real) == 1:
        return real[0]
    points = tuple(Point(" | ".join(p.label for p in combo), tuple(s for p in combo for s in p.settings))
                   for combo in itertools.product(*(a.points for a in real)))
    return Axis(" | ".join(a.title for a in real), points)


def pinpoint_axis(text: str, blocks: Sequence[str]) -> Axis:
    """`--pinpoint STEP.PARAM=V`: one point per block of `blocks`, each setting only that block to V."""
    target, sep, value = text.partition("=")
    address = parse_address(target.strip()) if sep else None
    if address is None or not value.strip() or address.blocks is not None or address.coef is not None:
        raise UsageError(f"--pinpoint {text!r}: expected STEP.PARAM=VALUE, e.g. output.alpha=1 (one column per "
                         "block, only that block set to the value)")
    points = []
    for block in blocks:
        at = ParamAddress(address.step, address.param, parse_blocks(block))
        points.append(Point(block, (Setting(str(at), value.strip(), at),)))
    return Axis(f"{address}[block] = {value.strip()}", tuple(points))


def check_axes(axes: Iterable[Axis]) -> None:
    """UsageError when one kind varies on two axes, or the grid is larger than MAX_CELLS."""
    seen: dict[str, int] = {}
    total = 1
    for n, ax in enumerate(axes):
        total *= max(1, len(ax.points))
        for kind in ax.kinds:
            if kind in seen and seen[kind] != n:
                raise UsageError(f"{kind} varies on two axes; put it on one (or make a joint axis)")
            seen[kind] = n
    if total > MAX_CELLS:
        raise UsageError(f"the grid has {total} cells; at most {MAX_CELLS}")


def _point_label(settings: Sequence[Setting], joint: bool) -> str:
    if not joint:
        return settings[0].label
    return " | ".join(f"{s.kind} {s.label}" for s in settings)


def _label(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    text = str(value)
    return text if text else "(empty)"
