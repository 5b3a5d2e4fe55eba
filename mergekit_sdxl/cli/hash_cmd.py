"""`mergekit-sdxl hash FILE...`: the hashes A1111, Civitai and kohya show, one streaming pass per file."""

from __future__ import annotations

import json
from pathlib import Path

import click

from mergekit_sdxl.cli import console


@click.command("hash")
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list (one object per file) on stdout.")
@click.option("--no-cache", is_flag=True, help="Re-read every file even if the hash cache knows it.")
def command(files: tuple[Path, ...], as_json: bool, no_cache: bool) -> None:
    """Print legacy A1111, AutoV2 and AutoV3 hashes and the full sha256 of FILES.

    \b
    legacy   A1111 "Model hash" / Civitai AutoV1: sha256 of 64 KiB at offset 1 MiB, 8 hex
    AutoV2   sha256 of the whole file, 10 hex (Civitai's model page)
    AutoV3   sha256 of the safetensors tensor data (kohya sshs_model_hash), 12 hex; "-" for other formats
    sha256   the full file digest

    Each file is read once in 8 MiB chunks (constant memory); results are cached by path, size and mtime.
    JSON fields: file, size, legacy, autov2, autov3, autov3_full, sha256.
    """
    from mergekit_sdxl import api

    rows = []
    for path in files:
        with console.api_progress() as progress:  # one bar per file
            rows.append(api.hash_file(path, use_cache=not no_cache, progress=progress).as_dict())
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(f"{'legacy':<8}  {'AutoV2':<10}  {'AutoV3':<12}  {'sha256':<64}  file")
    for row in rows:
        click.echo(f"{row['legacy']:<8}  {row['autov2']:<10}  {row['autov3'] or '-':<12}  {row['sha256']}  "
                   f"{row['file']}")
