"""A published (downloaded) merged file as the recipe readers see it, and what they produce.

Only the safetensors header is read: metadata, key names, dtypes and shapes. Every JSON value is parsed with the
bounds of `jsontext`; every field a reader needs is type-checked with `Fields`, so wrong types in someone else's
metadata give one line naming the file, the metadata key and the field.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergekit_sdxl.arch.detect import detect_arch
from mergekit_sdxl.dtypes import CHECKPOINT, DTYPES
from mergekit_sdxl.errors import ArchError, CheckpointError
from mergekit_sdxl.io.reader import SafetensorsReader, sniff
from mergekit_sdxl.provenance.jsontext import load_metadata_json

DTYPE_NAMES = {d.code: d.name for d in DTYPES.values() if CHECKPOINT in d.roles}  # float dtypes a merge saves in
_DATE = re.compile(r"^(\d{4})-(\d{2})-(\d{2})")
_MISSING = object()


@dataclass(frozen=True)
class PublishedFile:
    """The header of a merged file: metadata (strings), key -> (dtype code, shape) in file order, architecture."""

    path: Path
    metadata: dict[str, str]
    keys: dict[str, tuple[str, tuple[int, ...]]]
    arch: str | None

    @property
    def name(self) -> str:
        return self.path.name

    def where(self, key: str) -> str:
        return f"{self.name}: metadata {key}"

    def json(self, key: str) -> Any:
        """The metadata value `key` parsed as JSON (bounded), or None when absent."""
        text = self.metadata.get(key)
        return None if text is None else load_metadata_json(text, self.where(key))

    def dominant_dtype(self) -> str | None:
        """The float dtype code holding most elements (the dtype the merge was saved in)."""
        counts: Counter[str] = Counter()
        for dtype, shape in self.keys.values():
            if dtype in DTYPE_NAMES:
                n = 1
                for d in shape:
                    n *= d
                counts[dtype] += n
        return counts.most_common(1)[0][0] if counts else None

    def date(self) -> str | None:
        """`modelspec.date` (YYYY-MM-DD) when the file records one."""
        match = _DATE.match(self.metadata.get("modelspec.date", ""))
        return "-".join(match.groups()) if match else None


def read_published(path: str | Path) -> PublishedFile:
    """Read a merged file's header.

    Raises:
        CheckpointError: not a safetensors file, or a malformed header.
    """
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such file")
    if sniff(p) != "safetensors":
        raise CheckpointError(f"{p}: not a safetensors file; merge recipes are stored in safetensors metadata "
                              "(.ckpt files carry none)")
    with SafetensorsReader(p) as reader:
        keys = {i.key: (i.dtype, tuple(i.shape)) for i in reader.infos()}
        metadata = dict(reader.metadata)
    try:
        arch: str | None = detect_arch(keys, str(p))
    except ArchError:
        arch = None
    return PublishedFile(p, metadata, keys, arch)


@dataclass(frozen=True)
class InputRef:
    """One input of a published merge as its metadata records it."""

    alias: str
    role: str  # "model A", "primary model", ...
    sha256: str | None = None
    autov3: str | None = None
    name: str | None = None
    legacy: str | None = None


@dataclass
class Reconstruction:
    """A recipe rebuilt from metadata: YAML data (values may be `Noted`), header comments, the inputs."""

    tool: str
    data: dict[str, Any]
    header: list[str]
    inputs: list[InputRef]
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Assumptions:
    """What the caller knows beyond the file: the merge's date (decides SuperMerger's block rule and arithmetic)
    and the storage dtype of an input by sha256 (from the model index), which decides A1111's arithmetic."""

    date: str | None = None
    input_dtype: Callable[[str], str | None] = field(default=lambda sha256: None)


class Fields:
    """Typed access to a JSON object from metadata; errors name the file, the metadata key and the field."""

    def __init__(self, data: Any, where: str) -> None:
        if not isinstance(data, dict):
            raise CheckpointError(f"{where}: expected a JSON object, got {_kind(data)}")
        self.data, self.where = data, where

    def get(self, name: str, kinds: tuple[type, ...], default: Any = _MISSING) -> Any:
        """The field's value if it has one of `kinds` (include `type(None)` to accept null); `default` when the
        field is absent (an error when no default is given)."""
        if name not in self.data:
            if default is _MISSING:
                raise CheckpointError(f"{self.where}: field {name!r} is missing")
            return default
        value = self.data[name]
        if value is None and type(None) in kinds:
            return None
        if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
            raise CheckpointError(f"{self.where}.{name}: expected {_names(kinds)}, got {_describe(value)}")
        return value

    def number(self, name: str, default: Any = _MISSING, text_ok: bool = False) -> float:
        """A finite number (also a numeric string when `text_ok`, as SuperMerger accepts for base_alpha)."""
        value = self.get(name, (int, float, str) if text_ok else (int, float), default)
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise CheckpointError(f"{self.where}.{name}: {_short(value)} is not a number") from None
        if number != number or number in (float("inf"), float("-inf")):
            raise CheckpointError(f"{self.where}.{name}: {value!r} is not a finite number")
        return number

    def sha256(self, name: str) -> str | None:
        """A recorded model hash: 64 hex (lower-cased), or None when empty or null."""
        value = self.get(name, (str, type(None)), None)
        if not value:
            return None
        text = value.strip().lower()
        if len(text) != 64 or any(c not in "0123456789abcdef" for c in text):
            raise CheckpointError(f"{self.where}.{name}: {_short(value)} is not a sha256 (64 hex digits)")
        return text


def _names(kinds: tuple[type, ...]) -> str:
    names = {int: "a number", float: "a number", str: "a string", bool: "true/false", list: "a list",
             dict: "an object", type(None): "null"}
    return " or ".join(dict.fromkeys(names.get(k, str(k)) for k in kinds))


def _kind(value: Any) -> str:
    return {bool: "true/false", int: "a number", float: "a number", str: "a string", list: "a list",
            dict: "an object", type(None): "null"}.get(type(value), type(value).__name__)


def _describe(value: Any) -> str:
    if value is None or isinstance(value, bool):
        return json_literal(value)
    return f"{_kind(value)} {_short(value)}"


def json_literal(value: Any) -> str:
    return {None: "null", True: "true", False: "false"}[value]


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def sd_merge_models(pub: PublishedFile) -> dict[str, dict[str, Any]]:
    """The file's `sd_merge_models` lineage (sha256 -> entry), entries that are not objects dropped."""
    raw = pub.json("sd_merge_models")
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise CheckpointError(f"{pub.where('sd_merge_models')}: expected a JSON object, got {_kind(raw)}")
    return {str(sha).lower(): entry for sha, entry in raw.items() if isinstance(entry, dict)}


def recorded_name(models: dict[str, dict[str, Any]], sha256: str | None) -> tuple[str | None, str | None]:
    """(name, legacy hash) recorded for `sha256` in sd_merge_models, as strings, or (None, None)."""
    entry = models.get(sha256 or "", {})
    name, legacy = entry.get("name"), entry.get("legacy_hash")
    return (str(name)[:200] if isinstance(name, str) else None,
            str(legacy)[:16] if isinstance(legacy, str) else None)
