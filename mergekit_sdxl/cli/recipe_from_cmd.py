"""`mergekit-sdxl recipe-from FILE`: the recipe a merged file carries, as a runnable recipe with inputs by hash."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import click

from mergekit_sdxl.cli import console
from mergekit_sdxl.cli.options import out_option

_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


@click.command("recipe-from")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@out_option("out", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the recipe here (default: print it).")
@click.option("--tree", is_flag=True, help="Print the whole lineage (sd_merge_models) instead of the recipe.")
@click.option("--date", metavar="YYYY-MM-DD",
              help="When the merge was made, if the file does not say (picks SuperMerger's block rule).")
@click.option("--db", type=click.Path(dir_okay=False, path_type=Path),
              help="Model index to look inputs up in (default: the one `mergekit-sdxl index` uses).")
@click.option("--overwrite", is_flag=True, help="Replace an existing -o file.")
@click.option("--json", "as_json", is_flag=True, help="With --tree: print the tree as JSON.")
def command(file: Path, out: Path | None, tree: bool, date: str | None, db: Path | None, overwrite: bool,
            as_json: bool) -> None:
    """Read the merge recipe recorded in FILE and write an equivalent recipe.

    \b
    Reads the recipes A1111's checkpoint merger, SuperMerger and mergekit-sdxl record in a file's metadata.
    Inputs are named by hash; each value carries a comment saying where it came from and which convention
    was assumed. Run it with `mergekit-sdxl merge RECIPE --models-dir DIR --verify-against FILE`.
    With --tree: the lineage from sd_merge_models, with each model present (local path) or absent.
    """
    from mergekit_sdxl.errors import UsageError
    from mergekit_sdxl.provenance.published import Assumptions, read_published

    if date is not None and not _DATE.match(date):
        raise UsageError(f"--date {date!r}: expected YYYY-MM-DD")
    pub = read_published(file)
    with _Lookup(db) as lookup:
        if tree:
            _print_tree(pub, lookup, as_json)
            if out is None:
                return
        from mergekit_sdxl.provenance.reconstruct import recipe_text, reconstruct

        rebuilt = reconstruct(pub, Assumptions(date=date, input_dtype=lookup.dtype))
    target = str(out) if out else "recipe.yaml"
    text = recipe_text(rebuilt, f"mergekit-sdxl merge {target} --models-dir DIR --verify-against {file}")
    for warning in rebuilt.warnings:
        console.info(f"warning: {warning}")
    if out is None:
        click.echo(text, nl=False)
        return
    _write_text(out, text, overwrite, file)
    console.info(f"wrote {out} ({rebuilt.tool} recipe, {len(rebuilt.inputs)} input(s))")


class _Lookup:
    """Index lookups by sha256 when an index exists (none is created just to look things up)."""

    def __init__(self, db: Path | None) -> None:
        from mergekit_sdxl.index.store import ModelIndex, default_db_path

        path = db or default_db_path()
        if db is not None and not path.exists():
            from mergekit_sdxl.errors import UsageError

            raise UsageError(f"--db {db}: no such index; create it with `mergekit-sdxl index DIR --db {db}`")
        self.index = ModelIndex(path) if path.exists() else None

    def __enter__(self) -> _Lookup:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.index is not None:
            self.index.close()

    def _entry(self, sha256: str):  # noqa: ANN202
        if self.index is None:
            return None
        from mergekit_sdxl.index.store import Identity

        for _, entry in self.index.find(sha256, ("sha256",)):
            try:
                if Identity.of(os.stat(entry.path)) == entry.identity:
                    return entry
            except OSError:
                continue
        return None

    def locate(self, sha256: str) -> str | None:
        entry = self._entry(sha256)
        return entry.path if entry else None

    def dtype(self, sha256: str) -> str | None:
        entry = self._entry(sha256)
        return entry.dtype if entry else None


def _print_tree(pub, lookup: _Lookup, as_json: bool) -> None:  # noqa: ANN001
    from mergekit_sdxl.provenance.lineage import build_tree, render_tree, tree_dict

    root = build_tree(pub, lookup.locate)
    if as_json:
        click.echo(json.dumps(tree_dict(root), indent=1))
        return
    for line in render_tree(root):
        click.echo(line)
    if lookup.index is None:
        console.info("note: no model index yet, so every model shows as absent; run `mergekit-sdxl index DIR`")


def _write_text(out: Path, text: str, overwrite: bool, source: Path) -> None:
    """Write `text` to `out` like every output (io/commit.py): atomically, never onto the source or any other input,
    never replacing an existing file without --overwrite."""
    from mergekit_sdxl.io.commit import write_file

    write_file(out, text.encode("utf-8"), overwrite=overwrite, inputs=[source])
