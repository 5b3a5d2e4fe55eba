"""Preview grids: columns are models (files, or variants of a recipe merged in memory), rows prompt x seed.

One model is in memory at a time: columns load in turn into one `ModelSlot`, which swaps weights in place when
the shapes match. Every cell is written as its own PNG with A1111 `parameters`; the grid PNG has row and column
labels.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from mergekit_sdxl.errors import RecipeError, UsageError
from mergekit_sdxl.sampler.models import ModelSlot, WeightSource
from mergekit_sdxl.sampler.pipeline import GenParams, Renderer, to_pil
from mergekit_sdxl.sampler.pngmeta import parameters_text, png_info
from mergekit_sdxl.sampler.sizes import DEFAULT_SIZE, size_warning


@dataclass
class Column:
    """One grid column: a label, what goes into the PNG metadata, and how to get its weights."""

    label: str
    name: str
    weights: Callable[[], WeightSource]
    model_hash: str | None = None
    recipe: str | None = None


@dataclass(frozen=True)
class CellEvent:
    """Reported after each image: its position, the totals and the seconds it took."""

    index: int
    total: int
    column: str
    prompt_index: int
    seed: int
    seconds: float
    path: Path


def file_column(path: str | Path) -> Column:
    """A column for a checkpoint file, labelled with its name and AutoV2 hash (cached across runs)."""
    from mergekit_sdxl.io.hashes import hashes_for
    from mergekit_sdxl.io.reader import open_checkpoint

    path = Path(path)
    autov2 = hashes_for(path).autov2
    with open_checkpoint(path) as reader:
        recipe = reader.metadata.get("mergekit_sdxl.recipe") or reader.metadata.get("sd_merge_recipe")
    return Column(f"{path.stem} [{autov2}]", path.stem, lambda: WeightSource.from_file(path), autov2, recipe)


def parse_sweep(text: str) -> tuple[str, str, list[float]]:
    """`"out.alpha=0,0.25,0.5"` -> ("out", "alpha", [0.0, 0.25, 0.5])."""
    target, _, values = text.partition("=")
    step, _, param = target.strip().rpartition(".")
    try:
        numbers = [float(v) for v in values.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"--sweep {text!r}: values must be numbers, e.g. out.alpha=0,0.25,0.5") from None
    if not step or not param or not numbers:
        raise UsageError(f"--sweep {text!r}: expected STEP.PARAM=V1,V2,... (e.g. out.alpha=0,0.25,0.5)")
    return step, param, numbers


def with_param(recipe: object, step: str, param: str, value: float) -> object:
    """`recipe` with constant `value` for parameter `param` of method step `step` (RecipeError if absent)."""
    found = recipe.steps.get(step)
    if found is None:
        raise RecipeError(f"--sweep: the recipe has no step {step!r} (steps: {', '.join(recipe.steps)})")
    names = [p.name for p in getattr(found, "params", ())]
    if param not in names:
        raise RecipeError(f"--sweep: step {step!r} has no parameter {param!r} "
                          f"(parameters: {', '.join(names) or 'none, it is a formula step'})")
    params = tuple(dataclasses.replace(p, value=value, blocks=None, overrides=()) if p.name == param else p
                   for p in found.params)
    return dataclasses.replace(recipe, steps={**recipe.steps, step: dataclasses.replace(found, params=params)})


def weights_from_recipe(recipe_path: str | Path, sweep: str, model_paths: dict[str, str] | None = None,
                        device: str = "cpu") -> list[Column]:
    """Columns for each swept value of a recipe, each merged in memory when its turn comes.

    Args:
        recipe_path: the recipe YAML.
        sweep: `STEP.PARAM=V1,V2,...`; each value replaces that parameter (a constant for every block).
        model_paths: alias -> path overrides (`-m alias=path`).
        device: where the merge arithmetic runs.
    """
    from mergekit_sdxl.recipe.load import load_recipe

    recipe = load_recipe(recipe_path, model_paths or {})
    step, param, values = parse_sweep(sweep)
    variants = [with_param(recipe, step, param, v) for v in values]  # validates before anything is merged

    def column(variant: object, value: float) -> Column:
        label = f"{step}.{param}={value:g}"
        record = json.dumps({"recipe": str(recipe_path), "sweep": label}, sort_keys=True)
        return Column(label, f"{Path(recipe_path).stem} {label}", lambda: _merge(variant, label, device),
                      recipe=record)

    return [column(variant, value) for variant, value in zip(variants, values)]


def _merge(recipe: object, label: str, device: str) -> WeightSource:
    from mergekit_sdxl.engine.run import execute_in_memory, headers_of, open_inputs, plan_recipe

    with ExitStack() as stack:
        readers = open_inputs(recipe, stack)
        plan = plan_recipe(recipe, headers_of(recipe, readers))
        tensors = execute_in_memory(plan, readers, device=device)
    return WeightSource.from_tensors(label, tensors)


def run_grid(columns: Sequence[Column], prompts: Sequence[str], seeds: Sequence[int], params: GenParams,
             out_dir: str | Path, slot: ModelSlot, batch_size: int = 4,
             on_cell: Callable[[CellEvent], None] | None = None, notify: Callable[[str], None] = print) -> Path:
    """Render every cell, write the cell PNGs and the labelled grid; returns the grid's path.

    A width or height of 0 in `params` means the model's default size (SDXL 1024x1024, SD1.5 512x512).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    total = len(columns) * len(prompts) * len(seeds)
    cells: dict[tuple[int, int, int], object] = {}
    done = 0
    for c, column in enumerate(columns):
        renderer = None  # drop the previous model's references before the next one loads (one model in memory)
        source = column.weights()
        try:
            renderer = Renderer(slot.load(source))
        finally:
            source.close()
        sized = _sized(params, renderer.model.arch, notify if c == 0 else None)
        for p, prompt in enumerate(prompts):
            cell_params = dataclasses.replace(sized, prompt=prompt)
            for batch in _batches(list(seeds), batch_size):
                start = time.perf_counter()
                images = renderer.decode(renderer.sample(cell_params, batch))
                each = (time.perf_counter() - start) / len(batch)
                for seed, image in zip(batch, images):
                    done += 1
                    path = out / f"c{c:02d}_p{p:02d}_s{seed}.png"
                    cells[c, p, seed] = _save_cell(to_pil(image), path, cell_params, seed, column)
                    if on_cell is not None:
                        on_cell(CellEvent(done, total, column.label, p, seed, each, path))
    rows = [(p, s) for p in range(len(prompts)) for s in seeds]
    grid = compose_grid([[cells[c, p, s] for c in range(len(columns))] for p, s in rows],
                        [f"{_short(prompts[p])} | seed {s}" for p, s in rows], [c.label for c in columns])
    grid_path = out / "grid.png"
    grid.save(grid_path)
    return grid_path


def _sized(params: GenParams, arch: str, notify: Callable[[str], None] | None) -> GenParams:
    if not params.width or not params.height:
        params = dataclasses.replace(params, width=DEFAULT_SIZE[arch][0], height=DEFAULT_SIZE[arch][1])
    warning = size_warning(arch, params.width, params.height)
    if warning and notify is not None:
        notify(f"warning: {warning}")
    return params


def _batches(items: list[int], size: int) -> Iterator[list[int]]:
    for i in range(0, len(items), max(1, size)):
        yield items[i : i + max(1, size)]


def _save_cell(image: object, path: Path, params: GenParams, seed: int, column: Column) -> object:
    text = parameters_text(params.prompt, params.negative, params.steps, params.sampler, params.schedule,
                           params.cfg, seed, params.width, params.height, column.model_hash, column.name,
                           params.clip_skip, column.recipe)
    image.save(path, pnginfo=png_info(text, column.recipe))
    return image


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def compose_grid(cells: Sequence[Sequence[object]], row_labels: Sequence[str], col_labels: Sequence[str]) -> object:
    """One image: a header row of column labels, a label column, and the cells (all the same size)."""
    from PIL import Image, ImageDraw, ImageFont

    width = max(cell.size[0] for row in cells for cell in row)  # columns of different models may differ in size
    height = max(cell.size[1] for row in cells for cell in row)
    font = ImageFont.load_default(size=max(10, min(28, width // 20)))
    pad = font.size // 2
    label_w = max(width // 2, 8 * font.size)
    header_h = 3 * font.size
    grid = Image.new("RGB", (label_w + width * len(col_labels), header_h + height * len(row_labels)), "white")
    draw = ImageDraw.Draw(grid)
    for c, label in enumerate(col_labels):
        draw.multiline_text((label_w + c * width + pad, pad), _wrap(draw, label, font, width - 2 * pad), font=font,
                            fill="black")
    for r, (label, row) in enumerate(zip(row_labels, cells)):
        y = header_h + r * height
        draw.multiline_text((pad, y + pad), _wrap(draw, label, font, label_w - 2 * pad), font=font, fill="black")
        for c, cell in enumerate(row):
            grid.paste(cell, (label_w + c * width, y))
    return grid


def _wrap(draw: object, text: str, font: object, width: int) -> str:
    """Greedy word wrap (characters as the fallback) to `width` pixels."""
    lines, line = [], ""
    for word in text.split(" "):
        candidate = f"{line} {word}".strip()
        if line and draw.textlength(candidate, font=font) > width:
            lines.append(line)
            line = word
        else:
            line = candidate
    lines.append(line)
    return "\n".join(lines)
