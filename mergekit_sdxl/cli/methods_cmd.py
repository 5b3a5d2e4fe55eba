"""`mergekit-sdxl methods`: the merge-method reference, generated from the method registry (no torch import)."""

from __future__ import annotations

import json

import click


@click.command("methods")
@click.option("--markdown", is_flag=True, help="Print Markdown (the text of docs/methods.md).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list, one object per method.")
def command(markdown: bool, as_json: bool) -> None:
    """Print every merge method: formula, inputs, parameters (type, range, default) and the names peer tools
    (A1111, SuperMerger, sd-mecha, mergekit) give it."""
    from mergekit_sdxl.methods import reference

    if markdown and as_json:
        raise click.UsageError("--markdown and --json exclude each other")
    if as_json:
        click.echo(json.dumps(reference.method_reference(), indent=2, ensure_ascii=False))
    else:
        click.echo(reference.methods_markdown() if markdown else reference.methods_text(), nl=False)
