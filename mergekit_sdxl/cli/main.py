"""The `mergekit-sdxl` Click group. Subcommands live one per file and are imported only when used,
so `--help` never imports torch."""

from __future__ import annotations

import importlib
import importlib.util
import sys

import click

from mergekit_sdxl import __version__
from mergekit_sdxl.errors import MergekitError

# command name -> module under mergekit_sdxl.cli exposing `command`
COMMANDS: dict[str, tuple[str, str]] = {
    "inspect": ("inspect_cmd", "Show architecture, components, metadata, hashes and oddities of a checkpoint."),
    "hash": ("hash_cmd", "Print legacy A1111, AutoV2 and AutoV3 hashes of files (streamed)."),
    "convert": ("convert_cmd", "Convert a checkpoint's dtype (fp16/bf16/fp32/fp8), prune EMA, drop keys."),
    "make-test-checkpoint": ("make_test_cmd", "Write a synthetic SDXL/SD1.5 checkpoint with real key names."),
    "merge": ("merge_cmd", "Run a merge recipe (YAML) and write the merged checkpoint."),
    "extract-lora": ("extract_lora_cmd", "Extract a LoRA (tuned - base) as a kohya adapter."),
    "bake": ("bake_cmd", "Bake LoRA/LyCORIS adapters into a checkpoint."),
    "resize-lora": ("resize_lora_cmd", "Change the rank of a LoRA (fixed or dynamic)."),
    "merge-lora": ("merge_lora_cmd", "Merge several LoRAs into one (sum of deltas, re-factored)."),
    "grid": ("grid_cmd", "Render an A/B preview grid across checkpoints or a recipe sweep."),
    "diff": ("diff_cmd", "Per-block relative change and cosine similarity between two checkpoints."),
    "export": ("export_cmd", "Export a checkpoint as a diffusers folder or ONNX."),
    "recipe-from": ("recipe_from_cmd", "Rebuild the recipe a merged file carries (A1111, SuperMerger, ours)."),
    "index": ("index_cmd", "Index model folders by sha256/AutoV2/AutoV3/legacy hash (SQLite, incremental)."),
    "optimize": ("optimize_cmd", "Search a recipe's parameters (Optuna; Ray for many GPUs): best recipe + report."),
    "methods": ("methods_cmd", "Print the merge-method reference (formulas, parameters, peers' names)."),
    "presets": ("presets_cmd", "Print the MBW and LoRA Block Weight presets."),
}


class LazyGroup(click.Group):
    """A group whose subcommands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [name for name, (module, _) in COMMANDS.items() if _exists(module)]

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMANDS or not _exists(COMMANDS[cmd_name][0]):
            return None
        module = importlib.import_module(f"mergekit_sdxl.cli.{COMMANDS[cmd_name][0]}")
        return module.command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, COMMANDS[name][1]) for name in self.list_commands(ctx)]
        if not rows:
            return
        with formatter.section("Commands"):
            formatter.write_dl(rows)


def _exists(module: str) -> bool:
    return importlib.util.find_spec(f"mergekit_sdxl.cli.{module}") is not None


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mergekit-sdxl")
@click.option("-q", "--quiet", is_flag=True, help="No progress or status output.")
@click.option("-v", "--verbose", is_flag=True, help="More detail on stderr.")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
def cli(quiet: bool, verbose: bool, debug: bool) -> None:
    """Streaming, reproducible SDXL / SD1.5 checkpoint merges, LoRA extraction and preview grids."""
    from mergekit_sdxl.cli import console

    console.configure(quiet=quiet, verbose=verbose, debug=debug)


def main(argv: list[str] | None = None) -> None:
    """Entry point: runs the group and maps errors to one stderr line and an exit code.

    Every command runs with SIGINT/SIGTERM/SIGHUP (and Ctrl-Break on Windows) turned into a clean stop (temporary
    output removed, exit 128 + signal; 130 for the console's interrupt keys) and with one set of "everything this
    run reads" that no output may replace (io/signals.py, io/inputs.py).
    """
    from mergekit_sdxl.io import inputs, signals
    from mergekit_sdxl.platform.text import make_streams_safe

    make_streams_safe()  # a cp1252 or ASCII console gets ASCII stand-ins instead of UnicodeEncodeError
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    # the real process keeps recording (not raising) late signals until it exits: no "Exception ignored" at exit
    with signals.handling(restore=argv is not None), inputs.run_scope():
        code = _run(argv, debug)
    if argv is None and code in _STOPPED:
        _exit_now(code)
    sys.exit(code)


# the exit codes of a run a stop signal ended (SIGINT/Ctrl-Break 130, SIGTERM 143, SIGHUP 129)
_STOPPED = frozenset({130, 143, 129})


def _exit_now(code: int) -> None:
    """End a stopped run without the interpreter's finalization.

    The run's cleanup has happened (temporary output removed, message printed), but pipeline threads may still be
    inside a torch kernel: finalizing the interpreter under them tears down native thread pools and aborted the
    process ("terminate called without an active exception", exit -6) in about 1 of 7 stops of a multi-threaded
    merge. Nothing is left to flush but our own streams.
    """
    import os

    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def _run(argv: list[str] | None, debug: bool) -> int:
    from mergekit_sdxl.io.signals import Interrupted

    args = sys.argv[1:] if argv is None else list(argv)
    try:
        # not cli.main(): it turns every KeyboardInterrupt into a bare Abort (after printing a blank line), and the
        # signal that stopped the run decides the exit code here
        with cli.make_context("mergekit-sdxl", args) as ctx:
            cli.invoke(ctx)
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.Abort:
        return _fail("interrupted: no output was written", 130)
    except click.ClickException as exc:
        exc.show()
        return 2
    except MergekitError as exc:
        if debug:
            raise
        return _fail(f"error: {exc}", exc.exit_code)
    except Interrupted as exc:
        return _fail(f"interrupted ({exc.name}): no output was written", exc.exit_code)
    except KeyboardInterrupt:
        return _fail("interrupted: no output was written", 130)
    except Exception as exc:  # noqa: BLE001 - the last line of defence: one line, not a traceback
        if debug:
            raise
        if isinstance(exc, UnicodeEncodeError) and not _is_unicode(sys.getfilesystemencoding()):
            return _fail(f"error: a file name cannot be written in this system's file name encoding "
                         f"({sys.getfilesystemencoding()}): {exc.object[exc.start : exc.end]!a}; use a UTF-8 locale "
                         "(LANG=C.UTF-8) or set PYTHONUTF8=1", 2)
        return _fail(f"internal error: {type(exc).__name__}: {exc} (re-run with --debug for a traceback)", 1)
    return 0


def _is_unicode(encoding: str) -> bool:
    from mergekit_sdxl.platform.text import is_unicode

    return is_unicode(encoding)


def _fail(message: str, code: int) -> int:
    click.echo(message.replace("\n", " "), err=True)
    return code


if __name__ == "__main__":
    main()
