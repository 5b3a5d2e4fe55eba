"""XY(Z) preview grids: render every cell of a `GridPlan`, write each as a PNG, then the labelled grid and report.

One model is in memory at a time: the cells are rendered grouped by model (see `gridplan`), loading each model
into one `ModelSlot` (weights swapped in place when the shapes match). Every cell PNG has A1111 `parameters`;
`grid.png` carries the whole grid (axes, every cell's parameters) in its `mergekit_grid` text chunk and the first
cell's `parameters`; `index.html` is the report to look at (see `report`).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from mergekit_sdxl.arch.registry import arch_spec
from mergekit_sdxl.errors import UsageError
from mergekit_sdxl.io.commit import staged_folder
from mergekit_sdxl.sampler.axes import Setting
from mergekit_sdxl.sampler.gridmodels import GridModel
from mergekit_sdxl.sampler.gridplan import Cell, GridPlan, describe_settings
from mergekit_sdxl.sampler.layout import render_page, stack_pages
from mergekit_sdxl.sampler.models import ModelSlot
from mergekit_sdxl.sampler.pipeline import GenParams, Renderer, to_pil
from mergekit_sdxl.sampler.pngmeta import parameters_text, png_info
from mergekit_sdxl.sampler.prompt_schedule import check_prompt
from mergekit_sdxl.sampler.sizes import size_warning

GRID_CHUNK = "mergekit_grid"


class ModelSource(Protocol):
    def check(self, settings: Sequence[Setting]) -> None: ...
    def model(self, settings: Sequence[Setting]) -> GridModel: ...


@dataclass(frozen=True)
class CellEvent:
    """Reported after each image: its position in rendering order, the total, and the cell."""

    index: int
    total: int
    cell: Cell
    label: str
    path: Path


@dataclass
class CellRecord:
    """What was rendered for one cell (for grid.png, index.html and callers)."""

    cell: Cell
    path: Path
    parameters: str
    model: str
    settings: dict[str, str]
    recipe: str | None = None


@dataclass
class GridResult:
    """The grid's files, every cell, and where the time went."""

    plan: GridPlan
    grid: Path
    pages: list[Path]
    cells: list[CellRecord]
    models: list[GridModel]
    seconds_per_cell: float
    seconds_loading: float
    title: str = ""


def run_grid(plan: GridPlan, base: GenParams, seed: int, source: ModelSource, out_dir: str | Path,
             slot: ModelSlot, *, batch_size: int = 4, title: str = "",
             on_cell: Callable[[CellEvent], None] | None = None, notify: Callable[[str], None] = print,
             lora_dir: str | Path | None = None, embeddings_dir: str | Path | None = None,
             overwrite: bool = False, finish: Callable[[GridResult, Path], None] | None = None) -> GridResult:
    """Render every cell of `plan` and write the cell PNGs and the labelled grid; see the module docstring.

    Args:
        plan: the axes and cells.
        base: settings of every cell before its axes apply (width/height 0: the model's default size).
        seed: the seed of cells no axis gives one.
        source: turns model settings into weights (files or recipe variants).
        out_dir: the folder to write: filled under a temporary name and swapped in when complete (io/commit.py),
            so an error or a stop signal leaves nothing; `overwrite` replaces only an earlier output folder of
            this tool (never an input or a folder holding other files).
        finish: called with the result and the temporary folder before it is committed, to add files to it
            (e.g. index.html); its paths are the temporary ones.
        slot: where models are loaded (device, dtypes).
        title: the grid's title line.
        lora_dir: where `<lora:NAME:...>` in prompts finds NAME.
        embeddings_dir: textual-inversion embeddings used by name in prompts.
    """
    final = Path(out_dir)
    groups = check_plan(plan, base, source)
    with staged_folder(final, overwrite=overwrite) as out:
        result = _render(plan, base, seed, source, out, slot, groups, batch_size, title, on_cell, notify, lora_dir,
                         embeddings_dir)
        if finish is not None:
            finish(result, out)
    return _moved(result, out, final)


def _moved(result: GridResult, tmp: Path, final: Path) -> GridResult:
    """The result with its paths in the committed folder instead of the temporary one."""
    def move(path: Path) -> Path:
        return final / path.relative_to(tmp)

    cells = [dataclasses.replace(r, path=move(r.path)) for r in result.cells]
    return dataclasses.replace(result, grid=move(result.grid), pages=[move(p) for p in result.pages], cells=cells)


def _render(plan: GridPlan, base: GenParams, seed: int, source: ModelSource, out: Path, slot: ModelSlot,
            groups: list[tuple[Any, list[Cell]]], batch_size: int, title: str,
            on_cell: Callable[[CellEvent], None] | None, notify: Callable[[str], None],
            lora_dir: str | Path | None, embeddings_dir: str | Path | None) -> GridResult:
    records: dict[int, CellRecord] = {}
    models: list[GridModel] = []
    done, rendering, loading = 0, 0.0, 0.0
    for g, (_, cells) in enumerate(groups):
        start = time.perf_counter()
        model = source.model(cells[0].settings)
        models.append(model)
        renderer = None  # drop the previous model's references before the next one loads (one model in memory)
        weights = model.weights()
        try:
            renderer = Renderer(slot.load(weights), slot, lora_dir, embeddings_dir)
        finally:
            weights.close()
        loading += time.perf_counter() - start
        sized = _sized(base, renderer.model.arch, notify if g == 0 else None)
        for render, batch in plan.batches(cells, batch_size, seed):
            params = dataclasses.replace(sized, **render)
            start = time.perf_counter()
            images = renderer.decode(renderer.sample(params, [c.seed(seed) for c in batch]))
            fields = renderer.cell_fields(params)  # TI hashes, Lora hashes
            rendering += time.perf_counter() - start
            for cell, image in zip(batch, images):
                done += 1
                records[cell.index] = _save_cell(to_pil(image), out / cell.file_name, params, cell, seed, model,
                                                 fields)
                if on_cell is not None:
                    on_cell(CellEvent(done, len(plan.cells), cell, _cell_label(plan, cell), records[cell.index].path))
    ordered = [records[c.index] for c in plan.cells]
    grid, pages = write_grid(plan, ordered, out, title)
    return GridResult(plan, grid, pages, ordered, models, rendering / max(1, done), loading, title)


def check_plan(plan: GridPlan, base: GenParams, source: ModelSource) -> list[tuple[Any, list[Cell]]]:
    """Build every variant and check every cell's settings (before anything is rendered); the cells by model."""
    groups = plan.by_model()
    for _, cells in groups:
        source.check(cells[0].settings)
        _check_render(base, cells)
    return groups


def _check_render(base: GenParams, cells: Sequence[Cell]) -> None:
    for cell in cells:
        try:
            params = dataclasses.replace(base, **cell.render)
            params.check()
            check_prompt(params.prompt, 2 * params.steps)  # A1111's syntax errors before anything renders
            check_prompt(params.negative, 2 * params.steps, negative=True)
        except ValueError as exc:
            raise UsageError(f"{', '.join(f'{k}={v}' for k, v in cell.render.items())}: {exc}") from exc


def _sized(params: GenParams, arch: str, notify: Callable[[str], None] | None) -> GenParams:
    if not params.width or not params.height:
        width, height = arch_spec(arch).sampler.size
        params = dataclasses.replace(params, width=width, height=height)
    warning = size_warning(arch, params.width, params.height)
    if warning and notify is not None:
        notify(f"warning: {warning}")
    return params


def _save_cell(image: Any, path: Path, params: GenParams, cell: Cell, seed: int, model: GridModel,
               fields: dict[str, str] | None = None) -> CellRecord:
    text = parameters_text(params.prompt, params.negative, params.steps, params.sampler, params.schedule,
                           params.cfg, cell.seed(seed), params.width, params.height, model.model_hash, model.name,
                           params.clip_skip, model.recipe, extra=fields, rng=params.rng)
    image.save(path, pnginfo=png_info(text, model.recipe))
    return CellRecord(cell, path, text, model.label, describe_settings(cell.settings), model.recipe)


def _cell_label(plan: GridPlan, cell: Cell) -> str:
    parts = [f"{ax.title} {ax.points[i].label}" for ax, i in ((plan.x, cell.x), (plan.y, cell.y), (plan.z, cell.z))
             if ax.title]
    return " | ".join(parts) or "cell"


def write_grid(plan: GridPlan, records: Sequence[CellRecord], out: Path, title: str) -> tuple[Path, list[Path]]:
    """`grid.png` (every page stacked, with the grid's parameters in its metadata) and, with a Z axis, one
    `grid-zNN.png` per page."""
    from PIL import Image

    by_index = {r.cell.index: r for r in records}
    page_images, page_paths = [], []
    for z, zpoint in enumerate(plan.z.points):
        rows = [[Image.open(by_index[c.index].path).convert("RGB") for c in plan.cells if c.z == z and c.y == y]
                for y in range(len(plan.y.points))]
        page_title = title if not plan.z.title else f"{title}\n{plan.z.title}: {zpoint.label}".strip()
        image, _ = render_page(rows, [p.label for p in plan.x.points], [p.label for p in plan.y.points],
                               title=page_title, x_title=plan.x.title, y_title=plan.y.title)
        page_images.append(image)
        if plan.pages > 1:
            path = out / f"grid-z{z:02d}.png"
            image.save(path, pnginfo=_grid_info(plan, [r for r in records if r.cell.z == z], title))
            page_paths.append(path)
    grid = out / "grid.png"
    stack_pages(page_images).save(grid, pnginfo=_grid_info(plan, records, title))
    return grid, page_paths


def grid_record(plan: GridPlan, records: Sequence[CellRecord], title: str) -> dict[str, Any]:
    """The whole grid as JSON-ready data: title, axes, and every cell's file, settings and parameters."""
    return {
        "title": title,
        "axes": {name: {"title": ax.title, "values": [p.label for p in ax.points]}
                 for name, ax in (("x", plan.x), ("y", plan.y), ("z", plan.z)) if ax.title},
        "cells": [{"file": r.path.name, "x": r.cell.x, "y": r.cell.y, "z": r.cell.z, "model": r.model,
                   "settings": r.settings, "parameters": r.parameters, "recipe": r.recipe} for r in records],
    }


def _grid_info(plan: GridPlan, records: Sequence[CellRecord], title: str) -> Any:
    info = png_info(records[0].parameters if records else "")
    info.add_text(GRID_CHUNK, json.dumps(grid_record(plan, records, title), ensure_ascii=False))
    return info
