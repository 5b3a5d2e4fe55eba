"""What every part of the recipe parser shares: one-line errors naming the field, type names for messages,
"did you mean" hints, linear-time regular expressions (patterns.py), and `Fields`, the base of the parsers
(where/mapping/choice)."""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mergekit_sdxl import patterns
from mergekit_sdxl.errors import RecipeError
from mergekit_sdxl.recipe.formula import NAME_PATTERN

MAX_LIST = 64  # values in an MBW vector, models of a variadic step
MAX_RULES = 256  # overrides per parameter, drop patterns
MAX_PATTERN = 500
_NAME = re.compile(rf"^{NAME_PATTERN}$")


def fail(where: str, message: str) -> RecipeError:
    return RecipeError(f"{where}: {message}")


def type_name(value: Any) -> str:
    return {bool: "true/false", int: "a number", float: "a number", str: "a string", list: "a list",
            dict: "a mapping", type(None): "empty"}.get(type(value), type(value).__name__)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def suggest(word: str, choices: Iterable[str]) -> str:
    """"; did you mean 'x'?" for the closest choice (ignoring case), or ""."""
    lowered = {choice.lower(): choice for choice in choices}
    close = difflib.get_close_matches(str(word).lower(), list(lowered), n=1, cutoff=0.6)
    return f"; did you mean {lowered[close[0]]!r}?" if close else ""


WANT = {int: "a whole number", bool: "true or false", str: "a string"}


def matches_type(value: Any, want: type) -> bool:
    if want is bool:
        return isinstance(value, bool)
    if want is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, want)


def compile_pattern(pattern: Any, where: str) -> Any:
    """A recipe regex (`overrides[].match`, `output.drop[]`), validated for the linear-time engine (patterns.py);
    matching goes through `patterns.search`."""
    if isinstance(pattern, str) and len(pattern) > MAX_PATTERN:
        raise fail(where, f"regular expression longer than {MAX_PATTERN} characters")
    return patterns.compile_user(pattern, where, RecipeError)


class Fields:
    """Field access with errors that name the recipe file and the dotted field path."""

    def __init__(self, source: str, base_dir: Path) -> None:
        self.source = source
        self.base_dir = base_dir

    def where(self, *parts: str) -> str:
        return ": ".join((self.source, ".".join(parts))) if parts else self.source

    def mapping(self, value: Any, where: str, allowed: Iterable[str]) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise fail(where, f"expected a mapping, got {type_name(value)}")
        allowed = tuple(allowed)
        for key in value:
            if not isinstance(key, str):
                raise fail(where, f"field names must be strings, got {key!r}")
            if key not in allowed:
                raise fail(where, f"unknown field {key!r}{suggest(key, allowed)} (allowed: {', '.join(allowed)})")
        return value

    def text(self, value: Any, name: str) -> str | None:
        if value is not None and not isinstance(value, str):
            raise fail(self.where(name), f"expected a string, got {type_name(value)}")
        return value

    def choice(self, value: Any, where: str, choices: Iterable[str], optional: bool = False) -> Any:
        choices = tuple(choices)
        if value is None and optional:
            return None
        if not isinstance(value, str) or value not in choices:
            raise fail(where, f"{value!r} is not one of {', '.join(choices)}{suggest(str(value), choices)}")
        return value

    def name(self, name: Any, where: str) -> str:
        if not isinstance(name, str) or not _NAME.match(name):
            raise fail(where, f"{name!r} is not a valid name (letters, digits and _, not starting with a digit; "
                              "names are used in formulas, where `-` means minus)")
        return name
