"""`mergekit-sdxl grid`: an A/B preview grid across checkpoints (columns) x prompts x seeds (rows)."""

from __future__ import annotations

from pathlib import Path

import click

from mergekit_sdxl.cli import console
from mergekit_sdxl.dtypes import WEIGHTS, choices
from mergekit_sdxl.sampler.catalog import SAMPLER_NAMES, SCHEDULE_NAMES

# Animagine XL 3.1 model card: negative prompt, CFG 5-7, under 30 steps, Euler a
CARD_NEGATIVE = ("nsfw, lowres, (bad), text, error, fewer, extra, missing, worst quality, jpeg artifacts, "
                 "low quality, watermark, unfinished, displeasing, oldest, early, chromatic aberration, signature, "
                 "extra digits, artistic error, username, scan, [abstract]")
DEFAULT_PROMPT = "1girl, solo, looking at viewer, upper body, masterpiece, best quality, very aesthetic, absurdres"
DTYPES = ("auto", *choices(WEIGHTS))


@click.command("grid")
@click.argument("more_models", nargs=-1, type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option("--models", "models", multiple=True, type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="Checkpoints, one column each: --models A.safetensors B.safetensors merged.safetensors.")
@click.option("--recipe", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="A merge recipe whose variants (--sweep) are merged in memory, one column each.")
@click.option("--sweep", metavar="STEP.PARAM=V1,V2,...", help="With --recipe: e.g. out.alpha=0,0.25,0.5,0.75,1.")
@click.option("-m", "--model", "model_paths", multiple=True, metavar="ALIAS=PATH",
              help="With --recipe: override a model path of the recipe (repeatable).")
@click.option("-p", "--prompt", "prompts", multiple=True, help="A prompt (repeatable; A1111 syntax).")
@click.option("-n", "--negative", default=CARD_NEGATIVE, help="Negative prompt (default: the Animagine XL 3.1 "
              "card's); '' for none (zeros on SDXL, as A1111).")
@click.option("--seeds", default="1", show_default=True, help="Comma-separated seeds, one row per prompt and seed.")
@click.option("--steps", type=click.IntRange(1, 500), default=28, show_default=True)
@click.option("--cfg", type=float, default=6.0, show_default=True, help="CFG scale.")
@click.option("--sampler", type=click.Choice(tuple(SAMPLER_NAMES)), default="euler_a", show_default=True)
@click.option("--schedule", type=click.Choice(tuple(SCHEDULE_NAMES)), default="normal", show_default=True)
@click.option("--size", help="WIDTHxHEIGHT (multiples of 8) or a bucket name: square, portrait, landscape, "
              "tall, wide, 13:19, ... (default: 1024x1024 SDXL, 512x512 SD1.5).")
@click.option("--clip-skip", type=click.IntRange(1, 12), default=1, show_default=True, help="SD1.5 only.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--dtype", type=click.Choice(DTYPES), default="auto", show_default=True,
              help="UNet/text-encoder dtype (auto: fp16 on CUDA; on the CPU bf16 where it has native bf16 "
                   "instructions, else fp32); the VAE runs in bf16/fp32.")
@click.option("--batch-size", type=click.IntRange(1, 64), default=4, show_default=True,
              help="Seeds rendered together (an image does not depend on it).")
@click.option("-o", "--out", type=click.Path(file_okay=False, path_type=Path), default=Path("grid-out"),
              show_default=True, help="Output folder: grid.png and one PNG per cell.")
def command(more_models: tuple[Path, ...], models: tuple[Path, ...], recipe: Path | None, sweep: str | None,
            model_paths: tuple[str, ...], prompts: tuple[str, ...], negative: str, seeds: str, steps: int,
            cfg: float, sampler: str, schedule: str, size: str | None, clip_skip: int, device: str, dtype: str,
            batch_size: int, out: Path) -> None:
    """Render a preview grid: checkpoints (or recipe variants) as columns, prompt x seed as rows.

    Every cell is also written as its own PNG whose `parameters` text (prompt, negative, steps, sampler, CFG,
    seed, size, model hash, merge recipe) A1111's PNG Info and sd-parsers read. Defaults follow the Animagine
    XL 3.1 model card (Euler a, 28 steps, CFG 6, its negative prompt).
    """
    from mergekit_sdxl.errors import UsageError
    from mergekit_sdxl.sampler import grid as grid_mod
    from mergekit_sdxl.sampler.pipeline import GenParams
    from mergekit_sdxl.sampler.sizes import parse_size

    files = [*models, *more_models]
    if bool(files) == bool(recipe):
        raise UsageError("give either --models FILE... or --recipe R.yaml --sweep STEP.PARAM=V1,V2,...")
    if recipe is not None and not sweep:
        raise UsageError("--recipe needs --sweep STEP.PARAM=V1,V2,... (one column per value)")
    width, height = parse_size(size) if size else (0, 0)
    params = GenParams("", negative, steps, cfg, sampler, schedule, width, height, clip_skip)
    seed_list = _seeds(seeds)
    slot = _slot(device, dtype)
    if recipe is not None:
        from mergekit_sdxl.recipe.load import parse_model_overrides

        columns = grid_mod.weights_from_recipe(recipe, sweep, parse_model_overrides(model_paths),
                                               device=str(slot.device))
    else:
        console.info(f"hashing {len(files)} model file(s) (cached after the first time)")
        columns = [grid_mod.file_column(f) for f in files]
    path = grid_mod.run_grid(columns, list(prompts) or [DEFAULT_PROMPT], seed_list, params, out, slot,
                             batch_size=batch_size, on_cell=_report, notify=console.info)
    console.info(f"grid: {path}")
    click.echo(str(path))


def _seeds(text: str) -> list[int]:
    from mergekit_sdxl.errors import UsageError

    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UsageError(f"--seeds {text!r}: expected comma-separated integers, e.g. 1,2,3") from None
    if not seeds or any(s < 0 or s >= 2**63 for s in seeds):
        raise UsageError(f"--seeds {text!r}: expected non-negative integers below 2**63")
    return seeds


def _slot(device: str, dtype: str) -> object:
    import torch

    from mergekit_sdxl.engine.device import resolve_device
    from mergekit_sdxl.sampler.models import ModelSlot

    dev = resolve_device(device)
    names = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    cuda = dev.type == "cuda"
    auto = torch.float16 if cuda else (torch.bfloat16 if _cpu_has_bf16() else torch.float32)
    compute = names[dtype] if dtype != "auto" else auto
    if compute == torch.float16 and not cuda:
        console.info("warning: fp16 on the CPU is slow; bf16 or fp32 are better there")
    vae = torch.bfloat16 if cuda and compute != torch.float32 else torch.float32
    return ModelSlot(dev, compute, vae)


def _cpu_has_bf16() -> bool:
    """Native bf16 on this CPU (AVX512-BF16 or AMX): there bf16 matmuls measured 2.6x and 3x3 convs 1.8x faster than
    fp32 on the development machine; without it bf16 is emulated and slower, so auto stays fp32."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def _report(event: object) -> None:
    console.info(f"[{event.index}/{event.total}] {event.column} | prompt {event.prompt_index + 1} | "
                 f"seed {event.seed} | {event.seconds:.1f} s -> {event.path.name}")
