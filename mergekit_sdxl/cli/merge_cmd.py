"""`mergekit-sdxl merge RECIPE`: run a recipe and write the merged checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from mergekit_sdxl.cli import console
from mergekit_sdxl.cli.options import out_option
from mergekit_sdxl.dtypes import CHECKPOINT, choices

if TYPE_CHECKING:
    from mergekit_sdxl.api import MergePlanResult, MergeResult


@click.command("merge")
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-m", "--model", "models", multiple=True, metavar="ALIAS=PATH",
              help="Override a model path of the recipe (repeatable).")
@out_option("out", type=click.Path(dir_okay=False, path_type=Path),
              help="Output file (else output.path).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N or mps (macOS).")
@click.option("--dtype", type=click.Choice(choices(CHECKPOINT)), help="Output dtype (overrides the recipe's).")
@click.option("--threads", type=click.IntRange(1, 256), help="CPU threads for the arithmetic (default: all).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output file (never an input).")
@click.option("--dry-run", is_flag=True, help="Print the plan without reading any tensor data.")
@click.option("--no-input-hashes", is_flag=True, help="Do not hash inputs for the lineage metadata.")
@click.option("--models-dir", "models_dirs", multiple=True, type=click.Path(file_okay=False, path_type=Path),
              help="Index this folder first (incremental) and find models named by hash there (repeatable).")
@click.option("--db", type=click.Path(dir_okay=False, path_type=Path),
              help="Model index for models named by hash (default: the one `mergekit-sdxl index` uses).")
@click.option("--verify-against", "verify_against", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="After merging, compare with this (published) file tensor by tensor; exit 7 past the tolerance.")
@click.option("--tolerance-ulps", type=click.FloatRange(0), default=1.0, show_default=True,
              help="With --verify-against: the largest accepted difference, in units in the last place.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
def command(recipe: Path, models: tuple[str, ...], out: Path | None, device: str, dtype: str | None,
            threads: int | None, overwrite: bool, dry_run: bool, no_input_hashes: bool,
            models_dirs: tuple[Path, ...], db: Path | None, verify_against: Path | None, tolerance_ulps: float,
            as_json: bool) -> None:
    """Run RECIPE (YAML) and write the merged checkpoint atomically.

    Inputs are read tensor by tensor; memory stays bounded whatever the model size. An error or Ctrl-C leaves
    no output file and never touches an input.
    """
    from mergekit_sdxl import api
    from mergekit_sdxl.recipe.load import parse_model_overrides

    where: dict[str, Any] = {"models": parse_model_overrides(models), "models_dirs": models_dirs, "db": db,
                             "dtype": dtype, "threads": threads, "out": out,
                             "warn": lambda m: console.info(f"warning: {m}")}
    if dry_run:
        with console.api_progress() as progress:
            planned = api.plan_merge(recipe, progress=progress, **where)
        _describe(planned)
        return
    with console.api_progress() as progress:
        result = api.merge(recipe, device=device, overwrite=overwrite, hash_inputs=not no_input_hashes,
                           verify_against=verify_against, tolerance_ulps=tolerance_ulps, progress=progress, **where)
    if result.verified is not None:
        from mergekit_sdxl.provenance.verify import report_lines

        for line in report_lines(result.verified):
            console.info(line)
    _report(result, as_json)
    if result.verified is not None and not result.verified.passed:
        from mergekit_sdxl.errors import MismatchError

        raise MismatchError(f"{result.path} does not reproduce {verify_against} within {tolerance_ulps:g} ulps "
                            f"(the merged file is kept): {result.verified.verdict}")


def _describe(planned: MergePlanResult) -> None:
    for line in planned.lines:
        click.echo(line)
    for alias, known in planned.cached_hashes.items():
        click.echo(f"hash {alias}: " + (f"AutoV2 {known['autov2']}, AutoV3 {known['autov3']}" if known
                                        else "not cached (computed during the merge)"))
    click.echo(f"estimated peak memory: {planned.peak_memory / 2**30:.2f} GiB (independent of model size beyond the "
               "largest tensor)")


def _report(result: MergeResult, as_json: bool) -> None:
    for warning in result.warnings:
        console.info(f"warning: {warning}")
    if result.clamped:
        console.info(f"warning: {result.clamped} values were clamped to the output dtype's range")
    if as_json:
        click.echo(json.dumps(result.as_dict(), indent=2, sort_keys=True))
    else:
        rate = (result.bytes_read + result.bytes_written) / max(result.seconds, 1e-9) / 1e9
        click.echo(f"wrote {result.path} ({result.keys} tensors, {result.bytes_written / 1e9:.2f} GB) "
                   f"in {result.seconds:.1f} s ({rate:.2f} GB/s read+write)")
