"""Hash -> file through the index: what recipes that name models by `{sha256: ...}`, `{autov2: ...}` or
`{autov3: ...}` are resolved with.

A match is trusted only if the file is still what was hashed (same size, mtime, inode; otherwise it is hashed
again). Several files with the same content (copies) are one answer; files with different content matching a short
hash are an error listing the candidates; no match is an error naming the indexed folders.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

from mergekit_sdxl.errors import RecipeError, UsageError
from mergekit_sdxl.index.scan import ScanPlan, plan_scan, refresh, run_scan
from mergekit_sdxl.index.store import Entry, ModelIndex, default_db_path, normalize_hex
from mergekit_sdxl.recipe.types import ModelRef, Recipe

# recipe field -> (index column, what it is called, the fewest hex digits accepted)
HASH_FIELDS: dict[str, tuple[str, str, int]] = {
    "sha256": ("sha256", "sha256", 8),
    "autov2": ("sha256", "AutoV2", 8),
    "autov3": ("autov3", "AutoV3", 8),
}
_SHOWN = 6  # candidates listed in an ambiguity error


@dataclass(frozen=True)
class Match:
    """The file a hash resolved to."""

    entry: Entry
    copies: int  # further files with identical content


def lookup(index: ModelIndex, field: str, value: str, where: str) -> Match:
    """The indexed file whose `field` ("sha256", "autov2" or "autov3") starts with `value`.

    Raises:
        RecipeError: naming `where`, for a malformed hash, no match (listing the indexed folders) or an
            ambiguous one (listing the candidates).
    """
    column, label, least = HASH_FIELDS[field]
    try:
        prefix = normalize_hex(value)
    except UsageError as exc:  # re-raised as a recipe error naming the field
        raise RecipeError(f"{where}: {exc}") from exc
    if len(prefix) < least:
        raise RecipeError(f"{where}: {label} {value!r} is too short to find a file by; give at least {least} hex "
                          "digits (AutoV2 has 10, AutoV3 12)")
    stale = 0
    current: dict[str, Entry] = {}
    for _, row in index.find(prefix, (column,)):
        fresh = refresh(index, row.path)
        if fresh is None or not (getattr(fresh, column) or "").startswith(prefix):
            stale += 1
            continue
        current[fresh.path] = fresh
    by_content: dict[str, list[Entry]] = {}
    for entry in current.values():
        by_content.setdefault(str(entry.sha256), []).append(entry)
    if not by_content:
        raise NotIndexed(f"{where}: no indexed file has {label} {prefix}{_stale_note(stale)}; "
                          f"{_searched(index)}")
    if len(by_content) > 1:
        shown = [copies[0] for copies in by_content.values()]
        listed = "; ".join(f"{e.sha256[:10] if e.sha256 else '?'} (AutoV3 {e.autov3[:12] if e.autov3 else '-'}) "
                           f"{e.path}" for e in shown[:_SHOWN])
        more = f"; and {len(shown) - _SHOWN} more" if len(shown) > _SHOWN else ""
        raise RecipeError(f"{where}: {label} {prefix} is ambiguous: {len(shown)} different files match: {listed}"
                          f"{more}. Give more digits (or the full sha256)")
    copies = next(iter(by_content.values()))
    return Match(copies[0], len(copies) - 1)


class NotIndexed(RecipeError):
    """No indexed file has the hash a recipe names (the one lookup failure worth reporting with the others)."""


def _stale_note(stale: int) -> str:
    return f" ({stale} indexed file(s) that matched have changed or gone since)" if stale else ""


def _searched(index: ModelIndex) -> str:
    roots = index.roots()
    if not roots:
        return (f"the index {index.path} has no folders yet: run `mergekit-sdxl index DIR` or pass "
                "--models-dir DIR")
    shown = ", ".join(roots[:8]) + (f" and {len(roots) - 8} more" if len(roots) > 8 else "")
    return (f"indexed folders: {shown} (index {index.path}); index the folder that holds it "
            "(`mergekit-sdxl index DIR` or --models-dir DIR)")


def resolve_models(recipe: Recipe, index: ModelIndex) -> Recipe:
    """`recipe` with every model named by hash given the path of its file.

    A model with a path that exists keeps it (its AutoV2/AutoV3, if given, must match the file; the sha256 pin is
    checked by the merge as before); otherwise the most specific hash given (sha256, then AutoV3, then AutoV2)
    finds the file in the index, and every other hash given must match it.

    Raises:
        RecipeError: naming `models.ALIAS`, for no match, an ambiguous one, or hashes that disagree.
    """
    models, unfound = {}, []
    for alias, ref in recipe.models.items():
        try:
            models[alias] = _resolve(ref, index, f"{recipe.source}: models.{alias}")
        except NotIndexed as exc:
            unfound.append(str(exc))
    if unfound:
        # every model without a file in one line: a user fixing one at a time would re-run once per model
        raise RecipeError("; ".join(unfound + _missing_paths(recipe)) + _hint(recipe))
    return replace(recipe, models=models)


def _missing_paths(recipe: Recipe) -> list[str]:
    """The models given by a path (and no hash) whose file does not exist, as check_present words them."""
    return [f"model {alias!r} -> {ref.path} (no such file)" for alias, ref in recipe.models.items()
            if ref.path is not None and not ref.hashes and not os.path.exists(ref.path)]


def _hint(recipe: Recipe) -> str:
    missing = _missing_paths(recipe)
    return "; give each missing file with -m ALIAS=PATH" if missing else ""


def _resolve(ref: ModelRef, index: ModelIndex, where: str) -> ModelRef:
    given = ref.hashes
    if not given:
        return ref
    if ref.path is not None and os.path.exists(ref.path):
        locators = {kind: value for kind, value in given.items() if kind != "sha256"}
        if locators:
            entry = refresh(index, os.path.realpath(ref.path))
            if entry is None:
                raise RecipeError(f"{where}: cannot hash {ref.path} to check its {', '.join(locators)}")
            _agree(entry, locators, where, f"{ref.path}")
        return ref
    kind = next(k for k in ("sha256", "autov3", "autov2") if k in given)
    entry = lookup(index, kind, given[kind], where).entry
    _agree(entry, given, where, f"the file found by {HASH_FIELDS[kind][1]} ({entry.path})")
    return replace(ref, path=entry.path)


def _agree(entry: Entry, given: dict[str, str], where: str, what: str) -> None:
    for kind, value in given.items():
        column, label, _ = HASH_FIELDS[kind]
        actual = getattr(entry, column) or ""
        if not actual.startswith(value):
            shown = actual[:len(value)] if actual else "none"
            raise RecipeError(f"{where}: {what} has {label} {shown}, not {value}: the hashes in the recipe "
                              "name different files")


def needs_index(recipe: Recipe) -> list[ModelRef]:
    """The models the index must find or check: named only by hash, by a path that does not exist, or with AutoV2 /
    AutoV3 locators to check against their file."""
    return [ref for ref in recipe.models.values() if ref.autov2 or ref.autov3
            or (ref.sha256 and (ref.path is None or not os.path.exists(ref.path)))]


def resolve_recipe(recipe: Recipe, dirs: Sequence[str | os.PathLike[str]] = (),
                   db: str | os.PathLike[str] | None = None,
                   progress: Callable[[ScanPlan], AbstractContextManager[Callable[[int], None]]] | None = None,
                   warn: Callable[[str], None] | None = None) -> Recipe:
    """`recipe` with its models named by hash resolved, after indexing `dirs` (incrementally) into `db`.

    What commands that load recipes call before planning. Without `dirs` and without an existing index, a model
    named by hash is a RecipeError (no empty index is created just to fail a lookup).

    Args:
        progress: given the scan plan, a context manager yielding `advance(n_bytes)` (a progress bar).
        warn: receives one line per file that could not be indexed.
    """
    hashed = needs_index(recipe)
    if not hashed and not dirs:
        return recipe
    path = Path(db) if db is not None else default_db_path()
    if not dirs and not path.exists():
        raise RecipeError("; ".join([f"{recipe.source}: models.{hashed[0].alias} is named by hash and there is no "
                                     f"model index at {path}: pass --models-dir DIR (or run `mergekit-sdxl index DIR` "
                                     "first)"] + _missing_paths(recipe)) + _hint(recipe))
    with ModelIndex(path) as index:
        if dirs:
            plan = plan_scan(index, dirs)
            with progress(plan) if progress is not None else nullcontext(None) as advance:
                report = run_scan(index, plan, advance)
            for message in report.failed:
                if warn is not None:
                    warn(message)
        return resolve_models(recipe, index)
