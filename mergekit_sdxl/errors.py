"""Exception classes. Each carries the process exit code the CLI returns for it.

Exit codes (documented in README): 1 internal error, 2 usage, 3 recipe, 4 checkpoint / architecture,
5 device, 6 output (disk full, refusing to overwrite), 7 mismatch (`merge --verify-against`), 128 + signal
number when interrupted (130 SIGINT, 143 SIGTERM, 129 SIGHUP; io/signals.py).
"""

from __future__ import annotations


class MergekitError(Exception):
    """Base class: a one-line message meant for the user, and an exit code."""

    exit_code = 1


class UsageError(MergekitError):
    """Bad command-line arguments or options."""

    exit_code = 2


class PromptError(UsageError):
    """A prompt A1111 would reject (e.g. a malformed weight `(x:1.2.3)`); the message names the position."""


class RecipeError(MergekitError):
    """A recipe (YAML, formula, MBW vector, parameters) is invalid; the message names the step or term."""

    exit_code = 3


class CheckpointError(MergekitError):
    """A checkpoint or adapter file is unreadable, malformed, unsafe or inconsistent; names the file (and key)."""

    exit_code = 4


class ArchError(CheckpointError):
    """Unknown architecture, or inputs of different architectures in one job."""

    exit_code = 4


class DeviceError(MergekitError):
    """The requested device is unavailable or failed."""

    exit_code = 5


class OutputError(MergekitError):
    """The output cannot be written: exists without --overwrite, equals an input, disk full."""

    exit_code = 6


class MismatchError(MergekitError):
    """The merged output does not reproduce the file given with --verify-against (beyond the tolerance)."""

    exit_code = 7
