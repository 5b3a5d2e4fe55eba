"""User-given regular expressions (recipe `overrides` / `output.drop`, `convert --drop`), matched in linear time.

Python's `re` backtracks: a pattern like `(a+)+$` under the length limit spins for hours on a long key. Every
user pattern is therefore compiled with RE2 (the `google-re2` package), whose matching time is linear in the text
whatever the pattern; what RE2 cannot do in linear time (backreferences, lookaround) is refused with a one-line
error. Where google-re2 is not installed, patterns fall back to Python's `re` restricted to constructs that cannot
backtrack exponentially: no quantified groups, no backreferences, no lookaround (the error says so).

`compile_user` validates (raising the caller's error class with a message naming the field); `search` matches a
validated pattern (compiled once per pattern and cached).
"""

from __future__ import annotations

import functools
import re
from typing import Any

from mergekit_sdxl.errors import MergekitError, UsageError

try:  # the linear-time engine; optional only so that a platform without a wheel can still run the tool
    import re2 as _re2
except ImportError:  # pragma: no cover - google-re2 is a dependency; exercised by monkeypatching in the tests
    _re2 = None

MAX_PATTERN = 1000
_RE2_MEMORY = 8 << 20  # bytes RE2 may use per compiled pattern (its DFA cache); compile fails beyond
# the fallback's refusals: a quantifier applied to a group, backreferences, lookaround / conditionals
_GROUP_QUANTIFIED = re.compile(r"\)(?:[*+?]|\{\d*,?\d*\})")
_BACKTRACKING = re.compile(r"\\[1-9]|\\g<|\(\?(?:[=!<]|P=|\()")


def engine() -> str:
    """"re2" (linear time) or "re (restricted)"."""
    return "re2" if _re2 is not None else "re (restricted)"


def compile_user(pattern: Any, where: str, error: type[MergekitError] = UsageError) -> Any:
    """A compiled pattern whose matching time is linear in the text; `error` (naming `where`) otherwise."""
    if not isinstance(pattern, str) or not pattern:
        raise error(f"{where}: expected a regular expression, got {type(pattern).__name__}")
    if len(pattern) > MAX_PATTERN:
        raise error(f"{where}: regular expression longer than {MAX_PATTERN} characters")
    try:
        return _compiled(pattern)
    except (ValueError, re.error) as exc:
        raise error(f"{where}: invalid regular expression {pattern!r}: {exc}") from exc


def search(pattern: str, text: str) -> bool:
    """True if `pattern` (validated by compile_user) occurs in `text` (re.search semantics)."""
    return _compiled(pattern).search(text) is not None


@functools.lru_cache(maxsize=1024)
def _compiled(pattern: str) -> Any:
    if _re2 is not None:
        options = _re2.Options()
        options.max_mem = _RE2_MEMORY
        options.log_errors = False  # RE2 would print its own line on stderr; the error below is the one line
        try:
            return _re2.compile(pattern, options)
        except _re2.error as exc:
            raise ValueError(f"{_first_line(exc)} (patterns are matched in linear time by RE2: no backreferences "
                             "or lookaround)") from exc
    if _GROUP_QUANTIFIED.search(pattern) or _BACKTRACKING.search(pattern):
        raise ValueError("quantified groups, backreferences and lookaround are not allowed without the "
                         "google-re2 package (they can take exponential time)")
    return re.compile(pattern)


def _first_line(exc: BaseException) -> str:
    arg = exc.args[0] if exc.args else ""
    text = (arg.decode("utf-8", "replace") if isinstance(arg, bytes) else str(arg)).strip()
    return text.splitlines()[0] if text else type(exc).__name__
