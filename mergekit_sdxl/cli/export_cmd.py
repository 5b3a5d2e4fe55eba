"""`mergekit-sdxl export CKPT --format diffusers|onnx -o DIR`: a diffusers pipeline folder or an ONNX (optimum)
folder from a single-file SDXL / SD1.5 checkpoint, with no network."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from mergekit_sdxl.cli import console
from mergekit_sdxl.cli.options import out_option
from mergekit_sdxl.dtypes import WEIGHTS, choices


@click.command("export")
@click.argument("src", metavar="CKPT", type=click.Path(exists=True, path_type=Path))
@click.option("--format", "fmt", type=click.Choice(("diffusers", "onnx")), default="diffusers", show_default=True,
              help="diffusers: StableDiffusion(XL)Pipeline.from_pretrained folder; onnx: optimum's "
                   "ORTStableDiffusion(XL)Pipeline folder (needs the [onnx] extra).")
@out_option("out", old_spelling=True, required=True, type=click.Path(path_type=Path),
              help="Output folder.")
@click.option("--dtype", type=click.Choice(choices(WEIGHTS)), default=None,
              help="Weight dtype [diffusers: fp16; onnx: fp32 (fp16 is for GPU execution providers)].")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it is an earlier export (has model_index.json).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
def command(src: Path, fmt: str, out: Path, dtype: str | None, overwrite: bool, as_json: bool) -> None:
    """Export CKPT (single-file SDXL / SD1.5) as a diffusers or ONNX pipeline folder.

    Configs are derived from the weights' shapes and the shipped reference configs, tokenizers are shipped, so
    nothing is downloaded. The diffusers export streams tensor by tensor (memory about one tensor); the ONNX export
    builds one component at a time.
    """
    if fmt == "diffusers":
        from mergekit_sdxl.export.diffusers import export_diffusers

        with console.byte_progress(f"exporting {src.name}", os.path.getsize(src) if src.is_file() else 0) as step:
            report = export_diffusers(src, out, dtype or "fp16", overwrite=overwrite, progress=step)
    else:
        if dtype == "bf16":
            raise click.UsageError("--format onnx supports --dtype fp32 or fp16")
        from mergekit_sdxl.export.onnx import export_onnx

        report = export_onnx(src, out, dtype or "fp32", overwrite=overwrite,
                             on_part=lambda part: console.info(f"exporting {part} to ONNX"))
    if report.clamped:
        console.console.print(f"warning: {report.clamped} values were outside the {report.dtype} range and clamped")
    size = sum(report.files.values())
    console.info(f"wrote {report.path} ({report.format}, {report.arch}, {report.dtype}): {report.tensors} tensors, "
                 f"{size / 1e9:.2f} GB in {report.seconds:.1f} s; {len(report.unmapped)} key(s) without a "
                 f"diffusers equivalent left out")
    if report.unmapped:
        console.verbose("left out: " + ", ".join(report.unmapped))
    if report.filled:
        console.info("filled by rule (absent from the file): " + ", ".join(report.filled))
    if as_json:
        click.echo(json.dumps({"path": str(report.path), "format": report.format, "arch": report.arch,
                               "dtype": report.dtype, "tensors": report.tensors, "files": report.files,
                               "unmapped": report.unmapped, "filled": report.filled, "clamped": report.clamped,
                               "markers": list(report.markers), "seconds": round(report.seconds, 3)}, indent=2))
