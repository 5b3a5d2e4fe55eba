"""Click callbacks shared by several commands."""

from __future__ import annotations

from pathlib import Path

import click

from mergekit_sdxl.platform.names import check_output_name


def output_path(ctx: click.Context, param: click.Parameter, value: Path | None) -> Path | None:
    """Refuse an output name Windows cannot store (NUL, CON.safetensors, `a:b`, a trailing dot) before any work,
    on every OS; raises OutputError (exit code 6)."""
    if value is not None:
        check_output_name(value)
    return value
