"""`mergekit-sdxl index DIR...`: a local index of checkpoints and adapters by sha256, AutoV2, AutoV3, legacy hash."""

from __future__ import annotations

import json
from pathlib import Path

import click

from mergekit_sdxl.cli import console


@click.command("index")
@click.argument("targets", nargs=-1, type=click.Path(path_type=Path))
@click.option("--db", type=click.Path(dir_okay=False, path_type=Path),
              help="Index database (default: index.sqlite3 in the user cache folder).")
@click.option("--list", "list_", is_flag=True, help="List the indexed files (those under DIRs, if given).")
@click.option("--find", "find", metavar="HASH", help="Find files by sha256/AutoV2, AutoV3 or legacy hash (prefix).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON on stdout.")
def command(targets: tuple[Path, ...], db: Path | None, list_: bool, find: str | None, as_json: bool) -> None:
    """Index the model files in DIRs (folders, or single files) by hash.

    \b
    Records sha256 (AutoV2 is its first 10 hex), AutoV3, the legacy A1111 hash, architecture, kind, dtype,
    size and the lineage the file carries (sd_merge_recipe / sd_merge_models). Only new or changed files
    (size, mtime, inode) are hashed; vanished files are forgotten. Two runs may share one database.
    Recipes then name models by hash ({sha256: ...}, {autov2: ...}, {autov3: ...}).
    """
    from mergekit_sdxl.errors import UsageError
    from mergekit_sdxl.index.store import ModelIndex

    if not targets and not list_ and not find:
        raise UsageError("index: give folders to index, --list or --find HASH")
    with ModelIndex(db) as index:
        report = _scan(index, targets) if targets else None
        if find:
            _print_find(index, find, as_json)
        elif list_:
            _print_list(index, targets, as_json)
        elif report is not None:
            _print_report(report, index.path, as_json)


def _scan(index, targets):  # noqa: ANN001, ANN202 - thin glue around the progress bar
    from mergekit_sdxl.index.scan import plan_scan, run_scan

    plan = plan_scan(index, targets)
    total = plan.bytes_to_hash
    label = f"indexing {len(plan.todo)} new or changed file(s) of {len(plan.found)}"
    with console.byte_progress(label, total) as advance:
        report = run_scan(index, plan, advance)
    for message in report.failed:
        console.info(f"warning: {message}")
    return report


def _print_report(report, db: Path, as_json: bool) -> None:  # noqa: ANN001
    if as_json:
        click.echo(json.dumps({"db": str(db), "roots": report.roots, "files": report.files,
                               "hashed": len(report.hashed), "unchanged": report.unchanged,
                               "renamed": report.renamed, "removed": report.removed, "failed": report.failed,
                               "bytes_hashed": report.bytes_hashed, "seconds": round(report.seconds, 3)}, indent=1))
        return
    rate = report.bytes_hashed / max(report.seconds, 1e-9) / 1e9
    click.echo(f"indexed {report.files} file(s) in {', '.join(report.roots) or 'the given files'}: "
               f"{len(report.hashed)} hashed ({report.bytes_hashed / 1e9:.2f} GB, {rate:.2f} GB/s), "
               f"{report.unchanged} unchanged, {report.renamed} renamed, {report.removed} removed, "
               f"{len(report.failed)} failed in {report.seconds:.2f} s ({db})")


def _print_list(index, targets: tuple[Path, ...], as_json: bool) -> None:  # noqa: ANN001
    import os

    if targets:
        rows = {e.path: e for t in targets for e in (index.under(os.path.realpath(t)) if Path(t).is_dir()
                                                     else [index.get(os.path.realpath(t))]) if e is not None}
        entries = [rows[p] for p in sorted(rows)]
    else:
        entries = index.entries()
    _print_entries(entries, as_json)


def _print_find(index, text: str, as_json: bool) -> None:  # noqa: ANN001
    from mergekit_sdxl.errors import UsageError

    found = index.find(text)
    if as_json:
        click.echo(json.dumps([{"matched": kind, **entry.as_dict()} for kind, entry in found], indent=1))
    else:
        _print_entries([entry for _, entry in found], False)
    if not found:
        roots = index.roots()
        raise UsageError(f"no indexed file has a hash starting with {text.strip().lower()}; indexed folders: "
                         f"{', '.join(roots) if roots else 'none yet (run mergekit-sdxl index DIR)'}")


def _print_entries(entries, as_json: bool) -> None:  # noqa: ANN001
    if as_json:
        click.echo(json.dumps([e.as_dict() for e in entries], indent=1))
        return
    click.echo(f"{'AutoV2':<10}  {'AutoV3':<12}  {'legacy':<8}  {'kind':<10}  {'arch':<5}  {'dtype':<7}  "
               f"{'GB':>6}  path")
    for e in entries:
        kind = e.kind + ("*" if e.merge_type else "")
        click.echo(f"{e.autov2 or '-':<10}  {(e.autov3 or '-')[:12]:<12}  {e.legacy or '-':<8}  {kind:<10}  "
                   f"{e.arch or '-':<5}  {e.dtype or '-':<7}  {e.size / 1e9:>6.2f}  {e.path}")
    if any(e.merge_type for e in entries):
        click.echo("* carries a merge recipe (see `mergekit-sdxl recipe-from FILE --tree`)")
