"""`mergekit-sdxl presets`: MBW and LoRA Block Weight presets, generated from their registries (no torch import)."""

from __future__ import annotations

import json

import click


@click.command("presets")
@click.option("--markdown", is_flag=True, help="Print Markdown (the text of docs/presets.md).")
@click.option("--json", "as_json", is_flag=True, help="Print the presets as JSON.")
def command(markdown: bool, as_json: bool) -> None:
    """Print the MBW presets (as read on SDXL and SD1.x) and the LoRA Block Weight presets."""
    from mergekit_sdxl.arch import preset_reference as reference

    if markdown and as_json:
        raise click.UsageError("--markdown and --json exclude each other")
    if as_json:
        click.echo(json.dumps(reference.preset_reference(), indent=2, ensure_ascii=False))
    else:
        click.echo(reference.presets_markdown() if markdown else reference.presets_text(), nl=False)
