"""Reading recipe files: a bounded read, UTF-8, and a YAML loader that builds no Python objects and refuses
anchors/aliases, duplicate keys and hostile nesting; then `parser.parse_recipe` validates the data."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from mergekit_sdxl.errors import RecipeError, UsageError
from mergekit_sdxl.recipe.parser import parse_recipe
from mergekit_sdxl.recipe.types import Recipe

MAX_RECIPE_BYTES = 1 << 20
MAX_YAML_DEPTH = 32
MAX_NUMBER_CHARS = 100
MAX_YAML_NODES = 50_000  # far above any real recipe; bounds the time a hostile 1 MB recipe can take


def load_recipe(path: str | Path, model_paths: Mapping[str, str] | None = None) -> Recipe:
    """Read and validate a recipe file.

    Args:
        path: the YAML file; relative model paths in it are resolved against its folder.
        model_paths: alias -> path overrides from the command line (`-m beta7=/models/b7.safetensors`),
            used as given (relative to the current directory).

    Returns:
        The validated Recipe.

    Raises:
        RecipeError: one line naming the file, step and field, for any problem.
    """
    file = Path(path)
    if file.exists() and not file.is_file():  # a FIFO would block the read forever; a folder is no recipe
        raise RecipeError(f"{file}: is not a regular file; give the recipe's YAML file")
    try:
        with file.open("rb") as handle:
            raw = handle.read(MAX_RECIPE_BYTES + 1)
    except OSError as exc:
        raise RecipeError(f"{file}: cannot read recipe: {exc.strerror or exc}") from exc
    if len(raw) > MAX_RECIPE_BYTES:
        raise RecipeError(f"{file}: recipe is larger than {MAX_RECIPE_BYTES} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeError(f"{file}: recipe is not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    data = load_yaml(text, str(file))
    return parse_recipe(data, source=str(file), base_dir=file.parent, model_paths=model_paths)


def parse_model_overrides(items: Iterable[str]) -> dict[str, str]:
    """`["beta7=/models/b7.safetensors", ...]` -> {alias: path}; UsageError for a malformed or repeated item."""
    out: dict[str, str] = {}
    for item in items:
        alias, sep, path = item.partition("=")
        alias = alias.strip()
        if not sep or not alias or not path.strip():
            raise UsageError(f"-m {item!r}: expected ALIAS=PATH, e.g. -m beta7=/models/kxl-beta7.safetensors")
        if alias in out:
            raise UsageError(f"-m {alias}: given twice")
        out[alias] = path.strip()
    return out


class _Loader(yaml.SafeLoader):
    """SafeLoader that refuses anchors and aliases (no billion laughs) and duplicate mapping keys."""

    source = "<recipe>"
    depth = 0
    nodes = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        line = event.start_mark.line + 1
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
            raise RecipeError(f"{self.source}:{line}: YAML anchors and aliases (&{event.anchor} / *{event.anchor}) "
                              "are not allowed in recipes; write the value out")
        if self.depth >= MAX_YAML_DEPTH:
            raise RecipeError(f"{self.source}:{line}: YAML nests deeper than {MAX_YAML_DEPTH} levels")
        self.nodes += 1
        if self.nodes > MAX_YAML_NODES:
            raise RecipeError(f"{self.source}:{line}: more than {MAX_YAML_NODES} YAML values; not a recipe")
        self.depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (list, dict)):
                raise RecipeError(f"{self.source}:{key_node.start_mark.line + 1}: mapping keys must be plain values")
            if key in seen:
                raise RecipeError(f"{self.source}:{key_node.start_mark.line + 1}: duplicate key {key!r}")
            seen.add(key)
        return super().construct_mapping(node, deep)


def _construct_int(loader: _Loader, node: Any) -> Any:
    """YAML integers of at most MAX_NUMBER_CHARS characters (Python refuses to convert 4300+ digits anyway)."""
    if len(str(node.value)) > MAX_NUMBER_CHARS:
        raise RecipeError(f"{loader.source}:{node.start_mark.line + 1}: a number of {len(str(node.value))} "
                          f"characters; numbers in recipes have at most {MAX_NUMBER_CHARS}")
    return yaml.SafeLoader.construct_yaml_int(loader, node)


_Loader.add_constructor("tag:yaml.org,2002:int", _construct_int)


def load_yaml(text: str, source: str = "<recipe>") -> Any:
    """Parse YAML text safely: no Python objects, no anchors/aliases, no duplicate keys; RecipeError otherwise."""
    try:  # the constructor already scans the text: a control character fails here
        loader = _Loader(text)
    except yaml.YAMLError as exc:
        raise RecipeError(f"{source}: invalid YAML: {str(exc).splitlines()[0]}") from exc
    loader.source = source
    try:
        return loader.get_single_data()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = f":{mark.line + 1}" if mark else ""
        raise RecipeError(f"{source}{line}: invalid YAML: {exc.problem or exc.context}") from exc
    except yaml.YAMLError as exc:
        raise RecipeError(f"{source}: invalid YAML: {exc}") from exc
    except (ValueError, RecursionError, OverflowError) as exc:  # a value YAML parsed but Python cannot hold
        raise RecipeError(f"{source}: invalid value: {str(exc).splitlines()[0][:200]}") from exc
    finally:
        loader.dispose()
