"""Where a grid cell's weights come from: checkpoint files, or variants of a recipe merged in memory.

A `ModelSource` turns a cell's model settings (`model` values and recipe parameters) into a `GridModel`: a label,
what the cell PNG records (name, hash, recipe) and a function that produces the weights when the model's turn
comes. `check` builds every variant up front, so a bad value fails before anything is rendered.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from mergekit_sdxl.errors import UsageError
from mergekit_sdxl.platform.text import from_os
from mergekit_sdxl.recipe.types import Recipe
from mergekit_sdxl.sampler.axes import Setting
from mergekit_sdxl.sampler.gridplan import describe_settings, variant
from mergekit_sdxl.sampler.models import WeightSource


@dataclass
class GridModel:
    """One model of the grid: its label, what cell PNGs record about it, and how to get its weights."""

    label: str
    name: str
    weights: Callable[[], WeightSource]
    model_hash: str | None = None
    recipe: str | None = None
    paths: tuple[Path, ...] = field(default_factory=tuple)  # the files it is made of (for the block diff)


class FileModels:
    """Checkpoint files: the `model` setting names the file (else the one `base` file)."""

    def __init__(self, base: Path | None) -> None:
        self.base = base
        self._hashes: dict[Path, str] = {}

    def check(self, settings: Sequence[Setting]) -> None:
        recipe_params = [s.kind for s in settings if s.address is not None]
        if recipe_params:
            raise UsageError(f"{recipe_params[0]}: recipe parameters need --recipe (a grid of files has none)")
        path = self._path(settings)
        if not path.is_file():
            raise UsageError(f"model {path}: no such file")

    def model(self, settings: Sequence[Setting]) -> GridModel:
        from mergekit_sdxl.io.hashes import hashes_for
        from mergekit_sdxl.io.reader import open_checkpoint

        path = self._path(settings)
        if path not in self._hashes:
            self._hashes[path] = hashes_for(path).autov2
        autov2 = self._hashes[path]
        with open_checkpoint(path) as reader:
            recipe = reader.metadata.get("mergekit_sdxl.recipe") or reader.metadata.get("sd_merge_recipe")
        stem = from_os(path.stem)  # LANG=C: the name's bytes as the UTF-8 text they are (label, PNG text)
        return GridModel(f"{stem} [{autov2}]", stem, lambda: WeightSource.from_file(path), autov2, recipe, (path,))

    def _path(self, settings: Sequence[Setting]) -> Path:
        chosen = next((s.value for s in settings if s.kind == "model"), None)
        if chosen is None:
            if self.base is None:
                raise UsageError("no model: give --models FILE... or a model axis (--x model=A,B)")
            return self.base
        return Path(str(chosen)).expanduser()


class RecipeModels:
    """Variants of one recipe, merged in memory when their turn comes (one model in memory at a time)."""

    def __init__(self, path: Path, recipe: Recipe, arch: str | None, device: str = "cpu") -> None:
        self.path, self.recipe, self.arch, self.device = path, recipe, arch, device

    def check(self, settings: Sequence[Setting]) -> None:
        variant(self.recipe, settings, self.arch)

    def model(self, settings: Sequence[Setting]) -> GridModel:
        chosen = variant(self.recipe, settings, self.arch)
        changes = describe_settings([s for s in settings if s.changes_model])
        label = ", ".join(f"{k}={v}" for k, v in changes.items()) or "recipe as written"
        record = json.dumps({"recipe": str(self.path), "settings": changes}, sort_keys=True)
        # a model named by hash only has no path yet: the merge itself refuses it with the way to find it
        paths = tuple(Path(path) for name, ref in chosen.models.items()
                      if name not in chosen.unused and (path := ref.path) is not None)
        return GridModel(label, f"{self.path.stem} {label}".strip(), lambda: merge_in_memory(chosen, label,
                                                                                            self.device),
                         recipe=record, paths=paths)


def merge_in_memory(recipe: Recipe, label: str, device: str) -> WeightSource:
    """Run `recipe` into a dict of tensors (no file) and serve it as a WeightSource."""
    from mergekit_sdxl.lora.steps import merge_recipe_in_memory

    _, tensors = merge_recipe_in_memory(recipe, device)  # LoRA steps included
    return WeightSource.from_tensors(label, tensors)


def recipe_arch(recipe: Recipe) -> str | None:
    """The recipe's architecture: declared, else detected from its inputs' headers (None when unreadable: the
    merge will report why)."""
    if recipe.arch:
        return recipe.arch
    from mergekit_sdxl.engine.run import headers_of, job_arch, open_inputs
    from mergekit_sdxl.errors import MergekitError

    try:
        with ExitStack() as stack:
            readers = open_inputs(recipe, stack)
            return job_arch(recipe, headers_of(recipe, readers))
    except MergekitError:
        return None
