"""`mergekit-sdxl convert IN OUT --dtype ...`: change a checkpoint's storage dtype (engine: `engine/convert.py`)."""

from __future__ import annotations

from pathlib import Path

import click

from mergekit_sdxl.cli import console
from mergekit_sdxl.cli.options import one_output, out_option, output_path
from mergekit_sdxl.dtypes import CHECKPOINT, choices


@click.command("convert")
@click.argument("src", metavar="IN", type=click.Path(exists=True, path_type=Path))
@click.argument("dst", metavar="[OUT]", required=False, type=click.Path(path_type=Path), callback=output_path)
@out_option("out", type=click.Path(path_type=Path), help="Output file (the same as OUT).")
@click.option("--dtype", required=True, type=click.Choice(choices(CHECKPOINT)),
              help="Storage dtype for float tensors (integer tensors such as position_ids keep theirs).")
@click.option("--scaled-fp8", is_flag=True,
              help="ComfyUI's scaled-fp8 layout (needs --dtype fp8_e4m3fn): the UNet's Linear weights in fp8 "
                   "with a float32 scale each, every other float tensor in fp16. Loaders that ignore the scales "
                   "(A1111) read wrong UNet weights, so use it for ComfyUI only.")
@click.option("--prune-ema", is_flag=True, help="Drop the EMA copy (model_ema.*).")
@click.option("--drop", multiple=True, metavar="REGEX", help="Drop keys matching REGEX (re.search); repeatable.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists (never an input).")
def command(src: Path, dst: Path | None, out: Path | None, dtype: str, scaled_fp8: bool, prune_ema: bool,
            drop: tuple[str, ...], overwrite: bool) -> None:
    """Convert checkpoint IN to a safetensors file OUT (or -o/--out) with another storage dtype.

    Streams tensor by tensor (peak memory about twice the largest tensor), keeps the metadata and adds a
    `mergekit.convert` entry saying what was done. Values beyond the fp16/fp8 range are clamped to it and
    counted in a warning. Scaled-fp8 inputs are dequantized first. IN may be .safetensors, .ckpt/.pt/.pth
    (weights only) or a diffusers folder.
    """
    target = one_output(dst, out)
    from mergekit_sdxl import api

    with console.api_progress() as progress:
        report = api.convert(src, target, dtype, scaled_fp8=scaled_fp8, prune_ema=prune_ema, drop=drop,
                             overwrite=overwrite, progress=progress)
    if report.clamped:
        worst = max(report.clamped, key=report.clamped.__getitem__)
        console.console.print(f"warning: {sum(report.clamped.values())} values in {len(report.clamped)} tensors "
                              f"were outside the {dtype} range and were clamped (most in {worst}: "
                              f"{report.clamped[worst]})")
    extra = f", {report.scaled} scaled" if scaled_fp8 else ""
    dropped = f", dropped {len(report.dropped)}" if report.dropped else ""
    console.info(f"wrote {target}: {report.tensors} tensors ({report.cast} cast{extra}{dropped}), "
                 f"{report.bytes_in / 1e9:.2f} GB -> {report.bytes_out / 1e9:.2f} GB")
