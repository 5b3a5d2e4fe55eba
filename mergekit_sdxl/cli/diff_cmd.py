"""`mergekit-sdxl diff A B`: per-block relative change and cosine similarity between two checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import click

from mergekit_sdxl.cli import console
from mergekit_sdxl.cli.options import output_path

CONVENTIONS = ("supermerger", "supermerger-2023", "sd-mecha")


@click.command("diff")
@click.argument("model_a", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.argument("model_b", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON on stdout.")
@click.option("--heatmap", type=click.Path(dir_okay=False, path_type=Path), callback=output_path,
              help="Heatmap PNG path (default: diff-<A>-<B>.png in the current folder).")
@click.option("--no-heatmap", is_flag=True, help="Do not write the heatmap PNG.")
@click.option("--overwrite", is_flag=True, help="Replace an existing heatmap file.")
@click.option("--convention", type=click.Choice(CONVENTIONS), default="supermerger", show_default=True,
              help="Key -> MBW block rule.")
def command(model_a: Path, model_b: Path, as_json: bool, heatmap: Path | None, no_heatmap: bool,
            overwrite: bool, convention: str) -> None:
    """Compare MODEL_B against MODEL_A per MBW block: ||B - A|| / ||A|| and cosine similarity.

    Streams both files at disk speed, a few tensors at a time (memory stays small whatever the model size).
    Prints a table (or JSON with --json, which also has one row per part: UNet blocks, CLIP layers, VAE stages)
    and writes a heatmap PNG naming both files, one row per component, with a colour bar.
    """
    from mergekit_sdxl.analysis.blockdiff import diff_checkpoints
    from mergekit_sdxl.analysis.diffmap import heatmap as draw_heatmap

    target = None if no_heatmap else heatmap or Path(f"diff-{model_a.stem}-{model_b.stem}.png")
    if target is not None:  # an unusable heatmap path is refused before the comparison
        from mergekit_sdxl.io.commit import check_target

        check_target(target, overwrite=overwrite, inputs=(model_a, model_b))
    console.info(f"comparing {model_b.name} against {model_a.name}")
    result = diff_checkpoints(model_a, model_b, convention)
    console.info(f"read {result.bytes_read / 1e9:.2f} GB in {result.seconds:.1f} s ({result.cpu_seconds:.1f} CPU-s)")
    rows = [r for r in result.rows() if r["kind"] != "part"]
    image = None
    if target is not None:
        image = draw_heatmap(result, target, overwrite=overwrite)
    if as_json:
        click.echo(json.dumps({"arch": result.arch, "a": str(model_a), "b": str(model_b), "rows": result.rows(),
                               "only_in_a": result.only_in_a, "only_in_b": result.only_in_b,
                               "shape_mismatch": result.shape_mismatch,
                               "heatmap": str(image) if image else None, "bytes_read": result.bytes_read,
                               "seconds": result.seconds, "cpu_seconds": result.cpu_seconds}, indent=1))
        return
    click.echo(f"{'group':<10} {'keys':>6} {'params':>13} {'rel. change':>12} {'cosine':>10}")
    kind = "block"
    for row in rows:
        if row["kind"] != kind:
            kind = row["kind"]
            click.echo("-- per component")
        click.echo(f"{row['group']:<10} {row['keys']:>6} {row['params']:>13,} {row['relative_change']:>12.4g} "
                   f"{row['cosine']:>10.6f}")
    for label, keys in (("only in A", result.only_in_a), ("only in B", result.only_in_b),
                        ("shape differs", result.shape_mismatch)):
        if keys:
            console.info(f"{len(keys)} key(s) {label}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}")
    if image:
        console.info(f"heatmap: {image}")
