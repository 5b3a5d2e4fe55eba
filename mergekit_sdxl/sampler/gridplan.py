"""The cells of an XY(Z) grid and the order they are rendered in (torch-free).

Cells are numbered page by page (Z), row by row (Y), column by column (X). They are *rendered* grouped by the
model they need: every cell whose settings give the same weights (same model file, or the same recipe variant)
is rendered while that model is loaded, so each variant is merged once, and seeds, prompts, steps, CFG, sampler
and schedule never cause a reload. Within a model, cells that differ only in their seed are batched.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergekit_sdxl.errors import RecipeError, UsageError
from mergekit_sdxl.recipe.edit import describe, set_value
from mergekit_sdxl.recipe.types import Recipe
from mergekit_sdxl.sampler.axes import ONE, Axis, Setting, check_axes

RENDER_KINDS = ("prompt", "negative", "steps", "cfg", "sampler", "schedule")  # GenParams fields set by axes


@dataclass(frozen=True)
class Cell:
    """One image of the grid: where it sits and the settings that make it."""

    index: int
    x: int
    y: int
    z: int
    settings: tuple[Setting, ...]

    @property
    def model_key(self) -> tuple[tuple[str, str], ...]:
        """What decides the weights: the model and recipe-parameter settings (empty = the base model)."""
        return tuple((s.kind, str(s.value)) for s in _model_order(self.settings) if s.changes_model)

    @property
    def render(self) -> dict[str, Any]:
        """GenParams fields this cell sets (prompt, negative, steps, cfg, sampler, schedule)."""
        return {s.kind: s.value for s in self.settings if s.kind in RENDER_KINDS}

    def seed(self, default: int) -> int:
        return next((int(s.value) for s in self.settings if s.kind == "seed"), default)

    @property
    def file_name(self) -> str:
        return f"z{self.z:02d}_y{self.y:02d}_x{self.x:02d}.png"


@dataclass(frozen=True)
class GridPlan:
    """The axes and every cell (Z-major, then Y, then X)."""

    x: Axis
    y: Axis
    z: Axis
    cells: tuple[Cell, ...]

    @classmethod
    def build(cls, x: Axis = ONE, y: Axis = ONE, z: Axis = ONE) -> GridPlan:
        check_axes((x, y, z))
        cells: list[Cell] = []
        for zi, zp in enumerate(z.points):
            for yi, yp in enumerate(y.points):
                for xi, xp in enumerate(x.points):
                    cells.append(Cell(len(cells), xi, yi, zi, (*zp.settings, *yp.settings, *xp.settings)))
        return cls(x, y, z, tuple(cells))

    def by_model(self) -> list[tuple[tuple[tuple[str, str], ...], list[Cell]]]:
        """Cells grouped by `model_key`, groups in order of first appearance (each model is loaded once)."""
        groups: dict[tuple[tuple[str, str], ...], list[Cell]] = {}
        for cell in self.cells:
            groups.setdefault(cell.model_key, []).append(cell)
        return list(groups.items())

    def batches(self, cells: Sequence[Cell], size: int, default_seed: int) -> list[tuple[dict[str, Any], list[Cell]]]:
        """Cells of one model grouped by render settings (seeds batched, at most `size` per batch)."""
        groups: dict[tuple[tuple[str, str], ...], list[Cell]] = {}
        for cell in cells:
            groups.setdefault(tuple(sorted((k, repr(v)) for k, v in cell.render.items())), []).append(cell)
        out = []
        for group in groups.values():
            for i in range(0, len(group), max(1, size)):
                out.append((group[0].render, group[i:i + max(1, size)]))
        return out

    @property
    def pages(self) -> int:
        return len(self.z.points)

    def varying(self) -> set[str]:
        """The kinds that vary on some axis."""
        return {*self.x.kinds, *self.y.kinds, *self.z.kinds}


def _model_order(settings: Sequence[Setting]) -> list[Setting]:
    """Model inputs first, then whole parameters, then single blocks (so a block edit lands on a swept vector)."""
    def rank(s: Setting) -> int:
        if s.address is None:
            return 0
        return 2 if s.address.blocks is not None else 1

    return sorted(settings, key=rank)


def variant(recipe: Recipe, settings: Sequence[Setting], arch: str | None) -> Recipe:
    """`recipe` with the cell's model settings applied (`model` values are `ALIAS=PATH` in recipe mode)."""
    for setting in _model_order(settings):
        if setting.kind == "model":
            recipe = with_model(recipe, str(setting.value))
        elif setting.address is not None:
            recipe = set_value(recipe, setting.address, setting.value, arch)
    return recipe


def with_model(recipe: Recipe, text: str) -> Recipe:
    """`ALIAS=PATH`: the recipe with input ALIAS read from PATH."""
    alias, sep, path = text.partition("=")
    alias = alias.strip()
    if not sep or not path.strip():
        raise UsageError(f"model {text!r}: with --recipe, model values are ALIAS=PATH (models: "
                         f"{', '.join(recipe.models)})")
    if alias not in recipe.models:
        raise RecipeError(f"model {text!r}: the recipe has no model {alias!r} (models: {', '.join(recipe.models)})")
    ref = dataclasses.replace(recipe.models[alias], path=str(Path(path.strip()).expanduser()), sha256=None)
    return dataclasses.replace(recipe, models={**recipe.models, alias: ref})


def describe_settings(settings: Sequence[Setting]) -> dict[str, str]:
    """Settings as `{kind: value}` text, for labels, PNG metadata and the report."""
    return {s.kind: describe(s.value) if s.address is not None else s.label for s in settings}


def fixed_values(plan: GridPlan, values: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of `values` that no axis varies (for the title line)."""
    varying = plan.varying()
    return {k: v for k, v in values.items() if k not in varying}
