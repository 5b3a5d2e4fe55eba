"""`mergekit-sdxl grid`: XY(Z) preview grids over models, seeds, prompts, sampler settings and recipe parameters."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from mergekit_sdxl.api.grids import CARD_NEGATIVE
from mergekit_sdxl.cli import console
from mergekit_sdxl.cli.options import out_option
from mergekit_sdxl.dtypes import WEIGHTS, choices
from mergekit_sdxl.sampler.catalog import RNG_MODES, SAMPLER_NAMES, SCHEDULE_NAMES

if TYPE_CHECKING:
    from mergekit_sdxl.sampler.models import ModelSlot  # imports torch: for the type checker only

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
    from mergekit_sdxl import api
    from mergekit_sdxl.platform.text import from_os
    from mergekit_sdxl.recipe.load import parse_model_overrides

    files = (*models, *more_models)
    options = api.GridOptions(
        models=files, recipe=recipe, model_paths=parse_model_overrides(model_paths) if recipe else {},
        x=(*x_axis, *([sweep] if sweep else [])), y=y_axis, z=z_axis, pinpoint=pinpoint,
        prompts=tuple(from_os(p) for p in prompts), negative=from_os(negative),  # LANG=C: argv bytes -> UTF-8 text
        seeds=_seeds(seeds), steps=steps, cfg=cfg, sampler=sampler, schedule=schedule, rng=rng, size=size,
        clip_skip=clip_skip, device=device)
    job = api.plan_grid(options)
    if dry_run:
        _dry_run(job)
        return
    console.info(f"{len(job.plan.cells)} cell(s), {len(job.plan.by_model())} model(s)")

    def report(event: Any) -> None:
        console.info(f"[{event.index}/{event.total}] {event.label} -> {event.path.name}")

    result = api.grid(job, out, dtype=dtype, batch_size=batch_size, diff=diff, lora_dir=lora_dir,
                      embeddings_dir=embeddings_dir, overwrite=overwrite, on_cell=report, notify=console.info)
    console.info(f"grid: {result.grid}; report: {result.report}")
    click.echo(str(result.grid))


def _seeds(text: str) -> tuple[int, ...]:
    from mergekit_sdxl.errors import UsageError

    try:
        seeds = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise UsageError(f"--seeds {text!r}: expected comma-separated integers, e.g. 1,2,3") from None
    if not seeds or any(s < 0 or s >= 2**63 for s in seeds):  # checked here too: the message quotes the text
        raise UsageError(f"--seeds {text!r}: expected non-negative integers below 2**63")
    return seeds


def _dry_run(job: Any) -> None:
    job.check()
    plan = job.plan
    for name in ("x", "y", "z"):
        ax = getattr(plan, name)
        if ax.title:
            click.echo(f"{name}: {ax.title} ({len(ax.points)} values): {', '.join(p.label for p in ax.points)}")
    groups = plan.by_model()
    click.echo(f"{len(plan.cells)} cell(s), {len(groups)} model(s)")
    for i, (key, cells) in enumerate(groups, start=1):
        what = ", ".join(f"{k}={v}" for k, v in key) or "as given"
        click.echo(f"model {i}: {what} ({len(cells)} cell(s))")


def _slot(device: str, dtype: str) -> ModelSlot:
    from mergekit_sdxl.api.grids import render_slot

    return render_slot(device, dtype, console.info)
