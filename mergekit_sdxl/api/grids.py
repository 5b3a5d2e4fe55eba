"""Preview images from Python: `plan_grid` (check everything, render nothing), `grid` (XY(Z) grids over models,
seeds, prompts, sampler settings and recipe parameters) and `render` (one image).

    job = plan_grid(GridOptions(recipe="rev2.yaml", x=("output.alpha[IN04]=0,0.5,1",), seeds=(1, 2)))
    result = grid(job, "grid-out")      # grid.png, index.html and one PNG per cell
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

from mergekit_sdxl.api.results import GridResult
from mergekit_sdxl.errors import RecipeError, UsageError

if TYPE_CHECKING:
    from mergekit_sdxl.sampler.models import ModelSlot  # imports torch: for the type checker only

PathLike = Union[str, "os.PathLike[str]"]
Notify = Callable[[str], None]

# Animagine XL 3.1 model card: negative prompt, CFG 5-7, under 30 steps, Euler a
CARD_NEGATIVE = ("nsfw, lowres, (bad), text, error, fewer, extra, missing, worst quality, jpeg artifacts, "
                 "low quality, watermark, unfinished, displeasing, oldest, early, chromatic aberration, signature, "
                 "extra digits, artistic error, username, scan, [abstract]")
DEFAULT_PROMPT = "1girl, solo, looking at viewer, upper body, masterpiece, best quality, very aesthetic, absurdres"


@dataclass(frozen=True)
class GridOptions:
    """What to render (each field as the `mergekit-sdxl grid` option of the same name).

    Attributes:
        models: checkpoints to compare (one per column, or along the first free axis); or give `recipe`.
        recipe: a merge recipe whose variants (recipe-parameter axes) are merged in memory.
        model_paths: with `recipe`, alias -> path overrides.
        x, y, z: axes "KIND=V1,V2,..." (several strings make a joint axis); see `mergekit-sdxl grid --help`.
        pinpoint: with `recipe`, "STEP.PARAM=V": one column per block with only that block set (replaces x).
        prompts: one prompt, or several (an axis); none: a default prompt.
        seeds: one seed, or several (an axis).
        size: "WIDTHxHEIGHT" or a bucket name (default: the architecture's size).
        device: where the recipe variants are merged and the images rendered.
    """

    models: tuple[PathLike, ...] = ()
    recipe: PathLike | None = None
    model_paths: Mapping[str, str] = field(default_factory=dict)
    x: tuple[str, ...] = ()
    y: tuple[str, ...] = ()
    z: tuple[str, ...] = ()
    pinpoint: str | None = None
    prompts: tuple[str, ...] = ()
    negative: str = CARD_NEGATIVE
    seeds: tuple[int, ...] = (1,)
    steps: int = 28
    cfg: float = 6.0
    sampler: str = "euler_a"
    schedule: str = "normal"
    rng: str = "cpu"
    size: str | None = None
    clip_skip: int = 1
    device: str = "auto"


@dataclass(frozen=True)
class GridJob:
    """A checked grid, ready to render: its plan (axes, cells), base settings, model source and title."""

    options: GridOptions
    plan: Any  # sampler.gridplan.GridPlan
    params: Any  # sampler.pipeline.GenParams
    source: Any  # sampler.gridmodels.FileModels | RecipeModels
    title: str

    def check(self) -> None:
        """Check every variant and cell setting without rendering (what `grid --dry-run` does)."""
        from mergekit_sdxl.sampler.grid import check_plan

        check_plan(self.plan, self.params, self.source)


def plan_grid(options: GridOptions) -> GridJob:
    """Check `options` and build the grid's plan; reads headers only (a recipe's inputs), renders nothing.

    Raises:
        UsageError: contradictory or malformed options. RecipeError: a bad recipe or pinpoint.
    """
    from mergekit_sdxl.sampler.pipeline import GenParams
    from mergekit_sdxl.sampler.sizes import parse_size

    files = [Path(m) for m in options.models]
    if files and options.recipe is not None:
        raise UsageError("give either model files or --recipe, not both")
    width, height = parse_size(options.size) if options.size else (0, 0)
    seeds = _seeds(options.seeds)
    prompts = options.prompts
    params = GenParams(prompts[0] if len(prompts) == 1 else DEFAULT_PROMPT, options.negative, options.steps,
                       options.cfg, options.sampler, options.schedule, width, height, options.clip_skip, options.rng)
    if options.rng == "gpu" and _device(options.device).type != "cuda":
        raise UsageError("--rng gpu draws noise with the CUDA generator and needs --device cuda; use --rng nv for "
                         "the same noise on the CPU")
    recipe = Path(options.recipe) if options.recipe is not None else None
    source, blocks = _source(files, recipe, options)
    plan = _plan(options, blocks, files, seeds)
    return GridJob(options, plan, params, source, _title(recipe, files, params, seeds[0], plan))


def grid(job: GridJob | GridOptions, out: PathLike = "grid-out", *, dtype: str = "auto", batch_size: int = 4,
         diff: bool = True, lora_dir: PathLike | None = None, embeddings_dir: PathLike | None = None,
         overwrite: bool = False, on_cell: Callable[[Any], None] | None = None,
         notify: Notify | None = None) -> GridResult:
    """Render the grid into the folder `out` (written under a temporary name, swapped in when complete).

    Args:
        job: from `plan_grid`, or options to plan now.
        dtype: UNet/text-encoder dtype ("auto", fp16, bf16, fp32).
        batch_size: seeds rendered together (an image does not depend on it).
        diff: add the block-diff heatmap of the model files involved to index.html.
        lora_dir, embeddings_dir: where `<lora:NAME:...>` and embedding names in prompts are found.
        overwrite: replace `out` if it is an earlier output folder of this tool (never anything else).
        on_cell: called with each `sampler.grid.CellEvent` (index, total, label, path).
        notify: receives status lines (timings, slow-dtype warnings); default: silent.

    Returns:
        grid.png (and pages), index.html and every cell's record (path, A1111 parameters, model, settings).
    """
    from mergekit_sdxl.sampler.grid import run_grid
    from mergekit_sdxl.sampler.report import REPORT, write_report

    job = job if isinstance(job, GridJob) else plan_grid(job)
    tell = notify or (lambda message: None)
    start, folder = time.perf_counter(), Path(out)

    def finish(staged: Any, staging: Path) -> None:  # inside the temporary folder: the report lands with the grid
        tell(f"{len(job.plan.cells)} cell(s): {staged.seconds_per_cell:.1f} s per cell; "
             f"{staged.seconds_loading:.1f} s loading/merging {len(staged.models)} model(s)")
        write_report(staged, staging, _diffs(staged.models, tell) if diff else [])

    result = run_grid(job.plan, job.params, _seeds(job.options.seeds)[0], job.source, folder,
                      render_slot(job.options.device, dtype, tell), batch_size=batch_size, title=job.title,
                      on_cell=on_cell, notify=tell, lora_dir=_path(lora_dir), embeddings_dir=_path(embeddings_dir),
                      overwrite=overwrite, finish=finish)
    return GridResult(out_dir=folder, grid=result.grid, pages=tuple(result.pages), report=folder / REPORT,
                      cells=tuple(result.cells), models=len(result.models), seconds_per_cell=result.seconds_per_cell,
                      seconds_loading=result.seconds_loading, seconds=time.perf_counter() - start)


def render(model: PathLike, out: PathLike, *, prompt: str = DEFAULT_PROMPT, negative: str = CARD_NEGATIVE,
           seed: int = 1, steps: int = 28, cfg: float = 6.0, sampler: str = "euler_a", schedule: str = "normal",
           size: str | None = None, device: str = "auto", dtype: str = "auto", overwrite: bool = False) -> GridResult:
    """One image of the checkpoint `model` into the folder `out` (a one-cell grid: `result.cells[0].path`)."""
    options = GridOptions(models=(model,), prompts=(prompt,), negative=negative, seeds=(seed,), steps=steps,
                          cfg=cfg, sampler=sampler, schedule=schedule, size=size, device=device)
    return grid(plan_grid(options), out, dtype=dtype, batch_size=1, diff=False, overwrite=overwrite)


def _path(path: PathLike | None) -> Path | None:
    return Path(path) if path is not None else None


def _device(device: str) -> Any:
    from mergekit_sdxl.engine.device import resolve_device

    return resolve_device(device, allow_mps=True)


def _seeds(seeds: Sequence[int]) -> list[int]:
    if not seeds or any(s < 0 or s >= 2**63 for s in seeds):
        raise UsageError(f"--seeds {','.join(map(str, seeds))!r}: expected non-negative integers below 2**63")
    return list(seeds)


def _source(files: list[Path], recipe: Path | None, options: GridOptions) -> tuple[Any, tuple[str, ...]]:
    """The model source, and the blocks a pinpoint runs over (empty without one)."""
    from mergekit_sdxl.sampler.gridmodels import FileModels, RecipeModels, recipe_arch

    if recipe is None:
        if options.pinpoint:
            raise UsageError("--pinpoint sets a recipe parameter: give --recipe")
        return FileModels(files[0] if len(files) == 1 else None), ()
    from mergekit_sdxl.api.merging import load

    loaded = load(recipe, options.model_paths)  # models named by hash found through the model index
    arch = recipe_arch(loaded)
    blocks = _pinpoint_blocks(loaded, options.pinpoint, arch) if options.pinpoint else ()
    return RecipeModels(recipe, loaded, arch, str(_device(options.device))), blocks


def _pinpoint_blocks(recipe: Any, pinpoint: str, arch: str | None) -> tuple[str, ...]:
    from mergekit_sdxl.arch.blocks import block_names
    from mergekit_sdxl.recipe.types import MethodStep

    step_name = pinpoint.partition("=")[0].strip().partition(".")[0]
    step = recipe.steps.get(step_name)
    if not isinstance(step, MethodStep):
        names = ", ".join(n for n, s in recipe.steps.items() if isinstance(s, MethodStep))
        raise RecipeError(f"--pinpoint {pinpoint}: {step_name!r} is not a method step of the recipe "
                          f"(method steps: {names})")
    if arch is None:
        raise RecipeError(f"--pinpoint {pinpoint}: cannot tell the architecture; set `arch:` in the recipe")
    return block_names(arch, step.convention)


def _plan(options: GridOptions, pin_blocks: tuple[str, ...], files: list[Path], seeds: list[int]) -> Any:
    from mergekit_sdxl.sampler.axes import ONE, Axis, Point, Setting, axis, pinpoint_axis, product_axis
    from mergekit_sdxl.sampler.gridplan import GridPlan

    if options.pinpoint and options.x:
        raise UsageError("--pinpoint makes the columns: drop --x")
    axes = [pinpoint_axis(options.pinpoint, pin_blocks) if options.pinpoint else axis(list(options.x), "--x"),
            axis(list(options.y), "--y"), axis(list(options.z), "--z")]
    extra = []
    if len(files) > 1:
        extra.append(Axis("model", tuple(Point(f.stem, (Setting("model", str(f)),)) for f in files)))
    if len(options.prompts) > 1:
        extra.append(Axis("prompt", tuple(Point(p, (Setting("prompt", p),)) for p in options.prompts)))
    if len(seeds) > 1:
        extra.append(Axis("seed", tuple(Point(str(s), (Setting("seed", s),)) for s in seeds)))
    for kind in (a.title for a in extra):
        if any(kind in a.kinds for a in axes):
            raise UsageError(f"{kind} is given both as an axis and by its own option; give it once")
    if extra and len(files) > 1 and axes[0] is ONE:  # models become the columns, the rest the rows
        axes[0], extra = extra[0], extra[1:]
    for i, ax in enumerate(axes):
        if ax is ONE and extra:
            axes[i], extra = product_axis(extra), []
    if extra:
        raise UsageError("every axis is taken: put the extra models, prompts or seeds on --x/--y/--z")
    return GridPlan.build(*axes)


def _title(recipe: Path | None, files: list[Path], params: Any, seed: int, plan: Any) -> str:
    from mergekit_sdxl.sampler.catalog import SAMPLER_NAMES
    from mergekit_sdxl.sampler.gridplan import fixed_values

    source = recipe.name if recipe else (files[0].name if len(files) == 1 else "")
    size = f"{params.width}x{params.height}" if params.width else ""
    fixed = fixed_values(plan, {"sampler": SAMPLER_NAMES[params.sampler].a1111,
                                "schedule": params.schedule, "steps": f"{params.steps} steps",
                                "cfg": f"CFG {params.cfg:g}", "seed": f"seed {seed}", "size": size,
                                "prompt": f"prompt: {params.prompt}"})
    return " · ".join(v for v in (source, *fixed.values()) if v)


def _diffs(models: list[Any], tell: Notify) -> list[Any]:
    """Block diffs of every model file involved against the first one."""
    from mergekit_sdxl.analysis.blockdiff import diff_checkpoints

    paths = list(dict.fromkeys(p for m in models for p in m.paths))
    if len(paths) < 2:
        return []
    tell(f"block diff of {len(paths) - 1} model(s) against {paths[0].name}")
    return [(paths[0], p, diff_checkpoints(paths[0], p)) for p in paths[1:]]


def render_slot(device: str, dtype: str, tell: Notify) -> ModelSlot:
    """The model slot the grid renders in (sampler.slots.make_slot), telling when fp16 on the CPU will be slow."""
    import torch

    from mergekit_sdxl.sampler.slots import make_slot

    slot = make_slot(device, dtype)
    if slot.dtype == torch.float16 and slot.device.type not in ("cuda", "mps"):
        tell("warning: fp16 on the CPU is slow; bf16 or fp32 are better there")
    return slot
