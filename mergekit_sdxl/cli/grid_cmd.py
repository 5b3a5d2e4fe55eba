"""`mergekit-sdxl grid`: XY(Z) preview grids over models, seeds, prompts, sampler settings and recipe parameters."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from mergekit_sdxl.cli import console
from mergekit_sdxl.cli.options import out_option
from mergekit_sdxl.dtypes import WEIGHTS, choices
from mergekit_sdxl.sampler.catalog import RNG_MODES, SAMPLER_NAMES, SCHEDULE_NAMES

if TYPE_CHECKING:
    from mergekit_sdxl.sampler.models import ModelSlot  # imports torch: for the type checker only

# Animagine XL 3.1 model card: negative prompt, CFG 5-7, under 30 steps, Euler a
CARD_NEGATIVE = ("nsfw, lowres, (bad), text, error, fewer, extra, missing, worst quality, jpeg artifacts, "
                 "low quality, watermark, unfinished, displeasing, oldest, early, chromatic aberration, signature, "
                 "extra digits, artistic error, username, scan, [abstract]")
DEFAULT_PROMPT = "1girl, solo, looking at viewer, upper body, masterpiece, best quality, very aesthetic, absurdres"
DTYPES = ("auto", *choices(WEIGHTS))
AXIS_HELP = ("KIND=V1,V2,... (';' between values that hold commas). KIND: model, seed, prompt, negative, steps, "
             "cfg, sampler, schedule, or a recipe parameter: STEP.PARAM (a number, a whole MBW vector, a preset), "
             "STEP.PARAM[IN04] or STEP.PARAM[OUT00..OUT02] (those blocks only), STEP.coef[N] (the N-th number of a "
             "formula step), LORASTEP.strength / .blocks. Repeat for a joint axis (values go together).")


@click.command("grid")
@click.argument("more_models", nargs=-1, type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option("--models", "models", multiple=True, type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="Checkpoints to compare (one per column, or along the first free axis).")
@click.option("--recipe", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="A merge recipe: its variants (recipe-parameter axes) are merged in memory.")
@click.option("--x", "x_axis", multiple=True, metavar="KIND=V1,V2", help="The columns. " + AXIS_HELP)
@click.option("--y", "y_axis", multiple=True, metavar="KIND=V1,V2", help="The rows (as --x).")
@click.option("--z", "z_axis", multiple=True, metavar="KIND=V1,V2", help="One page per value (as --x).")
@click.option("--pinpoint", metavar="STEP.PARAM=V", help="With --recipe: one column per block with only that "
              "block set to V (SuperMerger's pinpoint), e.g. output.alpha=1; replaces --x.")
@click.option("--sweep", metavar="STEP.PARAM=V1,V2", hidden=True, help="Old name of --x for a recipe parameter.")
@click.option("-m", "--model", "model_paths", multiple=True, metavar="ALIAS=PATH",
              help="With --recipe: override a model path of the recipe (repeatable).")
@click.option("-p", "--prompt", "prompts", multiple=True,
              help="A prompt; several make an axis. A1111 >= 1.6 syntax: (x:1.2), [x], [a:b:when], [a|b], AND, "
                   "BREAK, embedding names, <lora:NAME:TE:UNET>.")
@click.option("-n", "--negative", default=CARD_NEGATIVE, help="Negative prompt (default: the Animagine XL 3.1 "
              "card's); '' for none (zeros on SDXL, as A1111).")
@click.option("--seeds", default="1", show_default=True, help="Comma-separated seeds; several make an axis.")
@click.option("--steps", type=click.IntRange(1, 500), default=28, show_default=True)
@click.option("--cfg", type=float, default=6.0, show_default=True, help="CFG scale.")
@click.option("--sampler", type=click.Choice(tuple(SAMPLER_NAMES)), default="euler_a", show_default=True)
@click.option("--schedule", type=click.Choice(tuple(SCHEDULE_NAMES)), default="normal", show_default=True)
@click.option("--rng", type=click.Choice(RNG_MODES), default="cpu", show_default=True,
              help="Noise source as A1111's setting: cpu, gpu (CUDA generator, CUDA only) or nv (the CUDA "
                   "stream emulated on the CPU: the same noise as A1111's default GPU noise on NVIDIA).")
@click.option("--embeddings", "embeddings_dir", type=click.Path(file_okay=False, exists=True, path_type=Path),
              help="Folder of textual-inversion embeddings, used by file name in prompts (as A1111's embeddings/).")
@click.option("--lora-dir", type=click.Path(file_okay=False, exists=True, path_type=Path),
              help="Folder of LoRA files for <lora:NAME:TE:UNET> in prompts (as A1111's models/Lora).")
@click.option("--size", help="WIDTHxHEIGHT (multiples of 8) or a bucket name: square, portrait, landscape, "
              "tall, wide, 13:19, ... (default: 1024x1024 SDXL, 512x512 SD1.5).")
@click.option("--clip-skip", type=click.IntRange(1, 12), default=1, show_default=True, help="SD1.5 only.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N or mps (macOS).")
@click.option("--dtype", type=click.Choice(DTYPES), default="auto", show_default=True,
              help="UNet/text-encoder dtype (auto: fp16 on CUDA; on the CPU bf16 where it has native bf16 "
                   "instructions, else fp32); the VAE runs in bf16/fp32.")
@click.option("--batch-size", type=click.IntRange(1, 64), default=4, show_default=True,
              help="Seeds rendered together (an image does not depend on it).")
@click.option("--diff/--no-diff", default=True, show_default=True,
              help="Add the block-diff heatmap of the model files involved to index.html (reads them once more).")
@click.option("--dry-run", is_flag=True, help="Check every variant and setting, print the axes and models, render "
              "nothing.")
@out_option("out", type=click.Path(file_okay=False, path_type=Path),
              default=Path("grid-out"),
              show_default=True, help="Output folder: grid.png, index.html and one PNG per cell.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it is an earlier output folder of this tool.")
def command(more_models: tuple[Path, ...], models: tuple[Path, ...], recipe: Path | None, x_axis: tuple[str, ...],
            y_axis: tuple[str, ...], z_axis: tuple[str, ...], pinpoint: str | None, sweep: str | None,
            model_paths: tuple[str, ...], prompts: tuple[str, ...], negative: str, seeds: str, steps: int,
            cfg: float, sampler: str, schedule: str, rng: str, embeddings_dir: Path | None, lora_dir: Path | None,
            size: str | None, clip_skip: int, device: str, dtype: str, batch_size: int, diff: bool, dry_run: bool,
            out: Path, overwrite: bool) -> None:
    """Render an XY(Z) preview grid, SuperMerger-style: any recipe parameter, single blocks, models, seeds,
    prompts or sampler settings along --x (columns), --y (rows) and --z (pages).

    \b
      mergekit-sdxl grid --recipe rev2.yaml -m ... --x "output.alpha[IN04]=0,0.5,1" --y seed=1,2
      mergekit-sdxl grid --recipe rev2.yaml --x "output.alpha=GRAD_V;GRAD_A;FLAT_25" --y cfg=4,7
      mergekit-sdxl grid --recipe rev2.yaml --pinpoint output.alpha=1 --y seed=1,2
      mergekit-sdxl grid a.safetensors b.safetensors --y sampler=euler_a,dpmpp_2m --z steps=20,28

    Variants are merged in memory, each once (cells are rendered grouped by model). Every cell is written as a
    PNG whose `parameters` (prompt, negative, steps, sampler, CFG, seed, size, model hash, merge recipe and the
    cell's settings) A1111's PNG Info reads; grid.png holds the whole grid's parameters; index.html is a static
    report (hover or click a cell for its parameters, zoom, A/B blink between two cells, block-diff heatmap).
    Defaults follow the Animagine XL 3.1 card (Euler a, 28 steps, CFG 6, its negative prompt).
    """
    from mergekit_sdxl.platform.text import from_os
    from mergekit_sdxl.sampler.pipeline import GenParams
    from mergekit_sdxl.sampler.sizes import parse_size

    files = [*models, *more_models]
    if files and recipe:
        raise _usage("give either model files or --recipe, not both")
    width, height = parse_size(size) if size else (0, 0)
    seed_list = _seeds(seeds)
    prompts, negative = tuple(from_os(p) for p in prompts), from_os(negative)  # LANG=C: argv bytes -> UTF-8 text
    params = GenParams(prompts[0] if len(prompts) == 1 else DEFAULT_PROMPT, negative, steps, cfg, sampler,
                       schedule, width, height, clip_skip, rng)
    if rng == "gpu" and _device_type(device) != "cuda":
        raise _usage("--rng gpu draws noise with the CUDA generator and needs --device cuda; use --rng nv for the "
                     "same noise on the CPU")
    source, arch_blocks = _source(files, recipe, model_paths, device, pinpoint)
    plan = _plan(x_axis, y_axis, z_axis, sweep, pinpoint, arch_blocks, files, prompts, seed_list)
    title = _title(recipe, files, params, seed_list[0], plan)
    if dry_run:
        _dry_run(plan, source, params)
        return
    _render(plan, params, seed_list[0], source, out, device, dtype, batch_size, title, diff, lora_dir, embeddings_dir,
            overwrite)


def _device_type(device: str) -> str:
    from mergekit_sdxl.engine.device import resolve_device

    return resolve_device(device, allow_mps=True).type


def _usage(message: str) -> Exception:
    from mergekit_sdxl.errors import UsageError

    return UsageError(message)


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise _usage(f"--seeds {text!r}: expected comma-separated integers, e.g. 1,2,3") from None
    if not seeds or any(s < 0 or s >= 2**63 for s in seeds):
        raise _usage(f"--seeds {text!r}: expected non-negative integers below 2**63")
    return seeds


def _source(files: list[Path], recipe: Path | None, model_paths: tuple[str, ...], device: str,
            pinpoint: str | None) -> tuple[Any, tuple[str, ...]]:
    """The model source, and the blocks a --pinpoint runs over (empty without one)."""
    from mergekit_sdxl.sampler.gridmodels import FileModels, RecipeModels, recipe_arch

    if recipe is None:
        if pinpoint:
            raise _usage("--pinpoint sets a recipe parameter: give --recipe")
        return FileModels(files[0] if len(files) == 1 else None), ()
    from mergekit_sdxl.index.resolve import resolve_recipe
    from mergekit_sdxl.recipe.load import load_recipe, parse_model_overrides

    loaded = resolve_recipe(load_recipe(recipe, parse_model_overrides(model_paths)))  # models named by hash
    arch = recipe_arch(loaded)
    blocks: tuple[str, ...] = ()
    if pinpoint:
        blocks = _pinpoint_blocks(loaded, pinpoint, arch)
    return RecipeModels(recipe, loaded, arch, _merge_device(device)), blocks


def _pinpoint_blocks(recipe: Any, pinpoint: str, arch: str | None) -> tuple[str, ...]:
    from mergekit_sdxl.arch.blocks import block_names
    from mergekit_sdxl.errors import RecipeError
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


def _plan(x_flags: tuple[str, ...], y_flags: tuple[str, ...], z_flags: tuple[str, ...], sweep: str | None,
          pinpoint: str | None, pin_blocks: tuple[str, ...], files: list[Path], prompts: tuple[str, ...],
          seeds: list[int]) -> Any:
    from mergekit_sdxl.sampler.axes import ONE, Axis, Point, Setting, axis, pinpoint_axis, product_axis
    from mergekit_sdxl.sampler.gridplan import GridPlan

    x_list = [*x_flags, *([sweep] if sweep else [])]
    if pinpoint and x_list:
        raise _usage("--pinpoint makes the columns: drop --x")
    axes = [pinpoint_axis(pinpoint, pin_blocks) if pinpoint else axis(x_list, "--x"), axis(list(y_flags), "--y"),
            axis(list(z_flags), "--z")]
    extra = []
    if len(files) > 1:
        points = tuple(Point(f.stem, (Setting("model", str(f)),)) for f in files)
        extra.append(Axis("model", points))
    if len(prompts) > 1:
        extra.append(Axis("prompt", tuple(Point(p, (Setting("prompt", p),)) for p in prompts)))
    if len(seeds) > 1:
        extra.append(Axis("seed", tuple(Point(str(s), (Setting("seed", s),)) for s in seeds)))
    for kind in (a.title for a in extra):
        if any(kind in a.kinds for a in axes):
            raise _usage(f"{kind} is given both as an axis and by its own option; give it once")
    if extra and len(files) > 1 and axes[0] is ONE:  # models become the columns, the rest the rows
        axes[0], extra = extra[0], extra[1:]
    for i, ax in enumerate(axes):
        if ax is ONE and extra:
            axes[i], extra = product_axis(extra), []
    if extra:
        raise _usage("every axis is taken: put the extra models, prompts or seeds on --x/--y/--z")
    return GridPlan.build(*axes)


def _title(recipe: Path | None, files: list[Path], params: Any, seed: int, plan: Any) -> str:
    from mergekit_sdxl.sampler.gridplan import fixed_values

    source = recipe.name if recipe else (files[0].name if len(files) == 1 else "")
    size = f"{params.width}x{params.height}" if params.width else ""
    fixed = fixed_values(plan, {"sampler": SAMPLER_NAMES[params.sampler].a1111,
                                "schedule": params.schedule, "steps": f"{params.steps} steps",
                                "cfg": f"CFG {params.cfg:g}", "seed": f"seed {seed}", "size": size,
                                "prompt": f"prompt: {params.prompt}"})
    return " · ".join(v for v in (source, *fixed.values()) if v)


def _dry_run(plan: Any, source: Any, params: Any) -> None:
    from mergekit_sdxl.sampler.grid import check_plan

    check_plan(plan, params, source)
    for name in ("x", "y", "z"):
        ax = getattr(plan, name)
        if ax.title:
            click.echo(f"{name}: {ax.title} ({len(ax.points)} values): {', '.join(p.label for p in ax.points)}")
    groups = plan.by_model()
    click.echo(f"{len(plan.cells)} cell(s), {len(groups)} model(s)")
    for i, (key, cells) in enumerate(groups, start=1):
        what = ", ".join(f"{k}={v}" for k, v in key) or "as given"
        click.echo(f"model {i}: {what} ({len(cells)} cell(s))")


def _render(plan: Any, params: Any, seed: int, source: Any, out: Path, device: str, dtype: str, batch_size: int,
            title: str, diff: bool, lora_dir: Path | None = None, embeddings_dir: Path | None = None,
            overwrite: bool = False) -> None:
    from mergekit_sdxl.sampler.grid import run_grid
    from mergekit_sdxl.sampler.report import REPORT, write_report

    total = len(plan.cells)
    console.info(f"{total} cell(s), {len(plan.by_model())} model(s)")

    def report(event: Any) -> None:
        console.info(f"[{event.index}/{event.total}] {event.label} -> {event.path.name}")

    def finish(staged: Any, folder: Path) -> None:  # inside the temporary folder: the report lands with the grid
        console.info(f"{total} cell(s): {staged.seconds_per_cell:.1f} s per cell; {staged.seconds_loading:.1f} s "
                     f"loading/merging {len(staged.models)} model(s)")
        write_report(staged, folder, _diffs(staged.models) if diff else [])

    result = run_grid(plan, params, seed, source, out, _slot(device, dtype), batch_size=batch_size, title=title,
                      on_cell=report, notify=console.info, lora_dir=lora_dir, embeddings_dir=embeddings_dir,
                      overwrite=overwrite, finish=finish)
    console.info(f"grid: {result.grid}; report: {out / REPORT}")
    click.echo(str(result.grid))


def _diffs(models: list[Any]) -> list[Any]:
    """Block diffs of every model file involved against the first one."""
    from mergekit_sdxl.analysis.blockdiff import diff_checkpoints

    paths = list(dict.fromkeys(p for m in models for p in m.paths))
    if len(paths) < 2:
        return []
    console.info(f"block diff of {len(paths) - 1} model(s) against {paths[0].name}")
    return [(paths[0], p, diff_checkpoints(paths[0], p)) for p in paths[1:]]


def _merge_device(device: str) -> str:
    from mergekit_sdxl.engine.device import resolve_device

    return str(resolve_device(device, allow_mps=True))


def _slot(device: str, dtype: str) -> ModelSlot:
    import torch

    from mergekit_sdxl.sampler.slots import make_slot

    slot = make_slot(device, dtype)
    if slot.dtype == torch.float16 and slot.device.type not in ("cuda", "mps"):
        console.info("warning: fp16 on the CPU is slow; bf16 or fp32 are better there")
    return slot
