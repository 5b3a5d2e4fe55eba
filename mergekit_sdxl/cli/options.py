"""Click callbacks and options shared by several commands."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import click

from mergekit_sdxl.platform.names import check_output_name

F = TypeVar("F", bound=Callable[..., Any])
# spellings of the output option that earlier releases had; still parsed so old scripts keep working, never shown
OLD_OUT_SPELLINGS = ("--output",)


def output_path(ctx: click.Context, param: click.Parameter, value: Path | None) -> Path | None:
    """Refuse an output name Windows cannot store (NUL, CON.safetensors, `a:b`, a trailing dot) before any work,
    on every OS; raises OutputError (exit code 6)."""
    if value is not None:
        check_output_name(value)
    return value


class OutOption(click.Option):
    """The output option, `-o/--out` on every command; old spellings stay accepted but out of --help and errors."""

    def __init__(self, *args: Any, hidden_aliases: tuple[str, ...] = (), **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.hidden_aliases = hidden_aliases

    @contextlib.contextmanager
    def _shown(self) -> Iterator[None]:
        opts = self.opts
        self.opts = [opt for opt in opts if opt not in self.hidden_aliases]
        try:
            yield
        finally:
            self.opts = opts

    def get_help_record(self, ctx: click.Context) -> tuple[str, str] | None:
        with self._shown():
            return super().get_help_record(ctx)

    def get_error_hint(self, ctx: click.Context | None) -> str:
        with self._shown():
            return super().get_error_hint(ctx)  # type: ignore[arg-type, unused-ignore]  # click < 8.4: ctx required


def out_option(dest: str = "out", *, old_spelling: bool = False, **kwargs: Any) -> Callable[[F], F]:
    """`-o/--out` (value in parameter `dest`), checked by `output_path`; `old_spelling` also accepts `--output`,
    which the command had before, without showing it."""
    hidden = OLD_OUT_SPELLINGS if old_spelling else ()
    kwargs.setdefault("callback", output_path)
    return click.option("-o", "--out", *hidden, dest, cls=OutOption, hidden_aliases=hidden, **kwargs)


def one_output(positional: Path | None, out: Path | None) -> Path:
    """The output of a command that takes it as a trailing OUT argument or as -o/--out, given exactly once."""
    if positional is not None and out is not None:
        raise click.UsageError(f"the output is given twice ({positional} and -o {out}); give OUT or -o/--out")
    if positional is not None:
        return positional
    if out is None:
        raise click.UsageError("no output given: give OUT or -o/--out")
    return out
