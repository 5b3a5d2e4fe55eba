"""`mergekit-sdxl merge RECIPE`: run a recipe and write the merged checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import click

from mergekit_sdxl.cli import console
from mergekit_sdxl.cli.options import out_option
from mergekit_sdxl.dtypes import CHECKPOINT, choices


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
    from mergekit_sdxl.dtypes import parse_dtype
    from mergekit_sdxl.engine.run import MergeOptions, headers_of, open_inputs, plan_recipe, run_merge
    from mergekit_sdxl.lora.bake import step_adapters
    from mergekit_sdxl.recipe.describe import describe_plan
    from mergekit_sdxl.recipe.load import load_recipe, parse_model_overrides

    parsed = _by_hash(load_recipe(recipe, parse_model_overrides(models)), models_dirs, db)
    code = parse_dtype(dtype, CHECKPOINT, "--dtype") if dtype else None
    options = MergeOptions(out=out, device=device, dtype=code, overwrite=overwrite, threads=threads,
                           hash_inputs=not no_input_hashes)
    if dry_run:
        from contextlib import ExitStack

        from mergekit_sdxl.engine.run import estimate_memory, open_adapters, resolve_output
        from mergekit_sdxl.io.hashes import cached_hashes

        with ExitStack() as stack:
            readers = open_inputs(parsed, stack)
            headers = headers_of(parsed, readers)
            adapters = open_adapters(parsed, headers, step_adapters, stack)
            plan = plan_recipe(parsed, headers, code, adapters)
            memory = estimate_memory(plan, readers, options)
        target = resolve_output(parsed, options) if out or parsed.output.path else None
        for line in describe_plan(plan, target):
            click.echo(line)
        for alias, path in plan.inputs.items():
            known = cached_hashes(path)
            click.echo(f"hash {alias}: " + (f"AutoV2 {known.autov2}, AutoV3 {known.autov3_short}" if known
                                            else "not cached (computed during the merge)"))
        click.echo(f"estimated peak memory: {memory / 2**30:.2f} GiB (independent of model size beyond the largest "
                   "tensor)")
        return
    result = _run(parsed, options, run_merge)
    verified = _verify(result.path, verify_against, tolerance_ulps) if verify_against else None
    _report(result, as_json, verified)
    if verified is not None and not verified.passed:
        from mergekit_sdxl.errors import MismatchError

        raise MismatchError(f"{result.path} does not reproduce {verify_against} within {tolerance_ulps:g} ulps "
                            f"(the merged file is kept): {verified.verdict}")


def _run(parsed, options, run_merge):  # noqa: ANN001, ANN202 - thin glue around the progress bar
    from mergekit_sdxl.lora.bake import step_adapters

    with console.key_progress("merging") as update:
        def progress(event) -> None:  # noqa: ANN001
            update(event.keys_done, event.keys_total, event.bytes_read + event.bytes_written)
        return run_merge(parsed, options, progress, step_adapters)


def _by_hash(recipe, dirs: tuple[Path, ...], db: Path | None):  # noqa: ANN001, ANN202 - a Recipe
    """The recipe with models named by hash resolved through the model index (after indexing `dirs`)."""
    from mergekit_sdxl.index.resolve import resolve_recipe

    return resolve_recipe(recipe, dirs, db, progress=index_progress, warn=lambda m: console.info(f"warning: {m}"))


def index_progress(plan):  # noqa: ANN001, ANN201 - a ScanPlan -> context manager yielding advance(n)
    """The progress bar of an on-the-fly index scan."""
    return console.byte_progress(f"indexing {len(plan.todo)} new or changed file(s)", plan.bytes_to_hash)


def _verify(path: Path, published: Path, tolerance: float):  # noqa: ANN202
    import os

    from mergekit_sdxl.provenance.verify import report_lines, verify

    with console.byte_progress(f"verifying against {published.name}", os.path.getsize(path)) as advance:
        report = verify(path, published, tolerance, advance)
    for line in report_lines(report):
        console.info(line)
    return report


def _report(result, as_json: bool, verified=None) -> None:  # noqa: ANN001
    stats = result.stats
    summary = {"output": str(result.path), "keys": stats.keys, "seconds": round(stats.seconds, 3),
               "bytes_read": stats.bytes_read, "bytes_written": stats.bytes_written, "clamped": stats.clamped,
               "warnings": result.plan.warnings,
               "inputs": {a: h.as_dict() for a, h in result.input_hashes.items()}}
    if verified is not None:
        summary["verify"] = verified.as_dict()
    for warning in result.plan.warnings:
        console.info(f"warning: {warning}")
    if stats.clamped:
        console.info(f"warning: {stats.clamped} values were clamped to the output dtype's range")
    if as_json:
        click.echo(json.dumps(summary, indent=2, sort_keys=True))
    else:
        rate = (stats.bytes_read + stats.bytes_written) / max(stats.seconds, 1e-9) / 1e9
        click.echo(f"wrote {result.path} ({stats.keys} tensors, {stats.bytes_written / 1e9:.2f} GB) "
                   f"in {stats.seconds:.1f} s ({rate:.2f} GB/s read+write)")
