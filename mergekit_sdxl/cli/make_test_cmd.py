"""`mergekit-sdxl make-test-checkpoint`: write a synthetic SDXL / SD1.5 checkpoint with the real key names."""

from __future__ import annotations

import time
from pathlib import Path

import click

from mergekit_sdxl.arch.registry import ARCHS, DEFAULT_ARCH
from mergekit_sdxl.cli import console
from mergekit_sdxl.cli.options import out_option
from mergekit_sdxl.dtypes import CHECKPOINT, choices

GROUPS = ("scheduler", "ema", "markers")


@click.command("make-test-checkpoint")
@click.option("--arch", type=click.Choice(ARCHS), default=None,
              help=f"Architecture [default: {DEFAULT_ARCH}, or that of --like].")
@click.option("--size", type=click.Choice(["tiny", "full"]), default=None,
              help="tiny: every key, small consistent shapes (a few tens of MB); full: the real shapes "
                   "(SDXL 6.94 GB in fp16) [default: tiny, or that of --like].")
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds every value (with --like: the delta).")
@out_option("output", old_spelling=True, type=click.Path(path_type=Path),
              required=True, help="Output .safetensors file.")
@click.option("--dtype", type=click.Choice(choices(CHECKPOINT)), default="fp16", show_default=True,
              help="Storage dtype of the float tensors.")
@click.option("--like", type=click.Path(path_type=Path), default=None,
              help="Base checkpoint: copy its keys, shapes and values, then apply --delta.")
@click.option("--delta", default=None, metavar="lowrank:RANK|noise:SCALE",
              help="With --like: add a rank-RANK delta (||delta|| = 0.05 ||W||) or SCALE * std(W) noise.")
@click.option("--components", default=None, metavar="LIST",
              help="With --delta: comma-separated components it changes [default: unet,clip_l,clip_g].")
@click.option("--with-optional", is_flag=True,
              help="Also write every optional key of the table (scheduler buffers, SD1 EMA, v-pred markers).")
@click.option("--with", "groups", type=click.Choice(GROUPS), multiple=True,
              help="Also write one group of optional keys (repeatable).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output file.")
def command(arch: str | None, size: str | None, seed: int, output: Path, dtype: str, like: Path | None,
            delta: str | None, components: str | None, with_optional: bool, groups: tuple[str, ...],
            overwrite: bool) -> None:
    """Write a synthetic SDXL/SD1.5 checkpoint with real key names, seeded and streamed.

    Without --like: every key a real fp16 release has (SDXL 2,515 keys, SD1.5 1,131), deterministic values per
    (seed, key). With --like FILE --delta: a model with a known relation to FILE, e.g. "fine-tune of A" (noise)
    or "A + LoRA" (lowrank). The same arguments always give a byte-identical file.

    \b
    Examples:
      mergekit-sdxl make-test-checkpoint -o a.safetensors --seed 1
      mergekit-sdxl make-test-checkpoint -o b.safetensors --seed 2 --like a.safetensors --delta lowrank:8
      mergekit-sdxl make-test-checkpoint --size full --arch sdxl -o real_size.safetensors
    """
    from mergekit_sdxl.errors import UsageError
    from mergekit_sdxl.synth import plan_test_checkpoint, write_test_checkpoint

    include: bool | tuple[str, ...] = True if with_optional else groups
    if like is None and components is not None:
        raise UsageError("--components applies to --delta, which needs --like")
    parts = tuple(p.strip() for p in components.split(",") if p.strip()) if components else None
    specs = plan_test_checkpoint(arch, size, dtype, include, like)
    total = sum(s.nbytes for s in specs)
    start = time.perf_counter()
    with console.byte_progress(f"writing {output.name}", total if total >= 64 << 20 else 0) as advance:
        write_test_checkpoint(output, arch=arch, size=size, seed=seed, dtype=dtype, like=like, delta=delta,
                              include_optional=include, components=parts, overwrite=overwrite, progress=advance)
    seconds = time.perf_counter() - start
    console.info(f"wrote {output}: {len(specs)} tensors, {total / 1e6:.1f} MB in {seconds:.1f} s "
                 f"({total / 1e6 / max(seconds, 1e-9):.0f} MB/s)")
    click.echo(str(output))
