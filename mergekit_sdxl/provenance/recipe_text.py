"""Writes a reconstructed recipe as YAML with a comment above each entry that says where its value came from.

Recipe data is plain nested dicts/lists/scalars; any value may be wrapped in `Noted(value, comment)`. Mappings are
written in block style, lists and hash references (`{sha256: ...}`) in flow style, every scalar through PyYAML so
quoting is always right (a hex hash that looks like an octal number is quoted). The text is parsed back and
compared with the data before it is returned: what is written is exactly what was meant.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from typing import Any

import yaml

WIDTH = 118


@dataclass(frozen=True)
class Noted:
    """A recipe value with the comment written above it (empty: none)."""

    value: Any
    comment: str = ""


@dataclass(frozen=True)
class Flow:
    """A mapping written on one line (`{sha256: 0123...}`)."""

    value: dict[str, Any]


def plain(value: Any) -> Any:
    """The data without `Noted`/`Flow` wrappers."""
    if isinstance(value, Noted):
        return plain(value.value)
    if isinstance(value, Flow):
        return plain(value.value)
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(item) for item in value]
    return value


def render(data: dict[str, Any], header: list[str]) -> str:
    """The YAML text of `data`, preceded by `header` as comment lines.

    Raises:
        ValueError: the text does not parse back to the same data (a bug in the writer, never silent).
    """
    lines = [line for text in header for line in _comment(text, 0)]
    _mapping(data, 0, lines)
    text = "\n".join(lines) + "\n"
    if yaml.safe_load(text) != plain(data):
        raise ValueError("the written recipe does not read back as the reconstructed data")
    return text


def _mapping(data: dict[str, Any], indent: int, lines: list[str]) -> None:
    pad = " " * indent
    for key, item in data.items():
        comment = ""
        if isinstance(item, Noted):
            comment, item = item.comment, item.value
        lines += _comment(comment, indent)
        name = _scalar(key)
        if isinstance(item, dict) and item:
            lines.append(f"{pad}{name}:")
            _mapping(item, indent + 2, lines)
        else:
            lines.append(f"{pad}{name}: {_inline(item)}")


def _inline(value: Any) -> str:
    value = plain(value)
    if isinstance(value, (dict, list)):
        text = yaml.safe_dump(value, default_flow_style=True, width=1 << 30, sort_keys=False, allow_unicode=True)
        return text.strip()
    return _scalar(value)


def _scalar(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 30, allow_unicode=True)
    return text.removesuffix("\n").removesuffix("\n...").strip()


def _comment(text: str, indent: int) -> list[str]:
    if not text:
        return []
    pad = " " * indent + "# "
    out: list[str] = []
    for paragraph in text.splitlines():
        wrapped = textwrap.wrap(paragraph, WIDTH - len(pad), break_long_words=False, break_on_hyphens=False)
        out += [pad + line for line in wrapped or [""]]
    return [line.rstrip() for line in out]
