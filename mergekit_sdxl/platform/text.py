"""Console text that never raises UnicodeEncodeError: ASCII fallbacks for symbols a stream cannot encode.

A Windows console or a redirected stream may use a legacy code page (cp1252, cp437, cp932 ...) where `Δ`, `→`
or a model's Japanese file name has no code. Python's default for stdout is then to raise UnicodeEncodeError
in the middle of a message. `make_streams_safe` gives the process's stdout and stderr an error handler that
writes a readable ASCII stand-in for the symbols this tool prints (`·` -> `*`, `Δ` -> `d`, `…` -> `...`) and a
backslash escape (`\\u30e2`) for anything else, so a message always arrives whole and no information is lost.
Bytes of a file name that the locale could not decode (surrogate-escaped, as under LANG=C) are written back as they
were. UTF-8 streams are left alone.
"""

from __future__ import annotations

import codecs
import io
import os
import sys

ERRORS = "mergekit-ascii"

# symbol -> ASCII stand-in (for characters this tool's messages and help texts use)
FALLBACKS = {
    "\u00b7": "*", "\u2022": "*", "\u00d7": "x", "\u2212": "-", "\u2013": "-", "\u2014": "--", "\u2026": "...",
    "\u2192": "->", "\u2190": "<-", "\u2194": "<->", "\u21d2": "=>", "\u2248": "~", "\u2264": "<=", "\u2265": ">=",
    "\u2260": "!=", "\u00b1": "+/-", "\u0394": "d", "\u03a3": "sum", "\u221a": "sqrt", "\u2016": "||",
    "\u2299": "*", "\u1d40": "^T", "\u2208": " in ",
    "\u03b8": "theta", "\u03c4": "tau", "\u03c1": "rho", "\u03b1": "alpha", "\u03b2": "beta", "\u03bb": "lambda",
    "\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u2713": "ok", "\u2717": "x", "\u2714": "ok",
    "\u2718": "x", "\u26a0": "!", "\u2500": "-", "\u2501": "-", "\u2502": "|", "\u2588": "#", "\u00a0": " ",
}
_LONGEST = max(len(k) for k in FALLBACKS)
# runs of superscripts and subscripts: 2⁻¹¹ -> 2^-11, s₁ -> s_1
_SUPER = dict(zip("\u2070\u00b9\u00b2\u00b3\u2074\u2075\u2076\u2077\u2078\u2079\u207b\u207a", "0123456789-+"))
_SUB = {chr(0x2080 + d): str(d) for d in range(10)}


def ascii_fallback(text: str) -> str:
    """`text` with every non-ASCII character replaced: a stand-in from FALLBACKS, else a backslash escape."""
    out, i = [], 0
    while i < len(text):
        for marks, prefix in ((_SUPER, "^"), (_SUB, "_")):
            end = i
            while end < len(text) and text[end] in marks:
                end += 1
            if end > i:
                out.append(prefix + "".join(marks[c] for c in text[i:end]))
                i = end
                break
        else:
            i = _one(text, i, out)
    return "".join(out)


def _one(text: str, i: int, out: list[str]) -> int:
    """Append the stand-in of the character (or FALLBACKS sequence) at `i`; returns the next index."""
    for width in range(_LONGEST, 0, -1):
        piece = text[i : i + width]
        if piece in FALLBACKS:
            out.append(FALLBACKS[piece])
            return i + width
    char = text[i]
    out.append(char if ord(char) < 128 else char.encode("ascii", "backslashreplace").decode("ascii"))
    return i + 1


def _handler(exc: UnicodeError) -> tuple[bytes, int]:
    """The codec error handler: ASCII stand-ins, and the original byte back for a surrogate-escaped one (a file
    name that was not valid in the locale's encoding, as `surrogateescape`, the C locale's default, does)."""
    if not isinstance(exc, UnicodeEncodeError):
        raise exc
    out = bytearray()
    for piece in _split_escaped(exc.object[exc.start : exc.end]):
        if len(piece) == 1 and 0xDC80 <= ord(piece) <= 0xDCFF:
            out.append(ord(piece) - 0xDC00)
        else:
            out += ascii_fallback(piece).encode("ascii")
    return bytes(out), exc.end


def _split_escaped(text: str) -> list[str]:
    """`text` cut into runs of ordinary characters and single surrogate-escaped bytes."""
    pieces: list[str] = []
    for char in text:
        escaped = 0xDC80 <= ord(char) <= 0xDCFF
        if escaped or not pieces or len(pieces[-1]) == 1 and 0xDC80 <= ord(pieces[-1]) <= 0xDCFF:
            pieces.append(char)
        else:
            pieces[-1] += char
    return pieces


codecs.register_error(ERRORS, _handler)


def _search(name: str) -> codecs.CodecInfo | None:
    """ASCII under another name: a stream that says "ascii" is rewrapped by click as UTF-8 with "?" for every
    character it cannot encode, which would bypass the handler above."""
    if name.replace("_", "-") != ASCII_ALIAS:
        return None
    ascii_info = codecs.lookup("ascii")
    return codecs.CodecInfo(ascii_info.encode, ascii_info.decode, ascii_info.streamreader, ascii_info.streamwriter,
                            ascii_info.incrementalencoder, ascii_info.incrementaldecoder, name=ASCII_ALIAS)


ASCII_ALIAS = "mergekit-ascii"
codecs.register(_search)


def is_unicode(encoding: str | None) -> bool:
    """Whether a stream of this encoding can write every character (UTF-8/16/32)."""
    if not encoding:
        return False
    return codecs.lookup(encoding).name.startswith("utf")


def make_safe(stream: object) -> bool:
    """Give a text stream the ASCII-fallback error handler unless it is UTF; returns whether it was changed."""
    if not isinstance(stream, io.TextIOWrapper) or is_unicode(stream.encoding):
        return False
    if codecs.lookup(stream.encoding).name == "ascii":
        stream.reconfigure(encoding=ASCII_ALIAS, errors=ERRORS)
    else:
        stream.reconfigure(errors=ERRORS)
    return True


def make_streams_safe() -> None:
    """Apply `make_safe` to sys.stdout and sys.stderr (the CLI calls this first)."""
    make_safe(sys.stdout)
    make_safe(sys.stderr)


def from_os(text: str) -> str:
    """Text that came from the OS (argv, a file name) with its undecodable bytes (surrogate-escaped, as under LANG=C
    without UTF-8 mode) decoded as UTF-8, for writing into a file's metadata or a prompt; unchanged otherwise.

    File paths themselves keep their escapes (they name the file's real bytes); this is for text *about* them.
    """
    if not any(0xDC80 <= ord(c) <= 0xDCFF for c in text):
        return text
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def to_os(path: str) -> str:
    """A path read from a UTF-8 text (a recipe) as the OS will accept it: where the file system encoding cannot
    encode it (LANG=C without UTF-8 mode), its UTF-8 bytes surrogate-escaped, which name the same file on a
    disk whose names are UTF-8 (the norm); unchanged everywhere else."""
    try:
        os.fsencode(path)
    except UnicodeEncodeError:
        return os.fsdecode(path.encode("utf-8", "surrogateescape"))
    return path


def file_name(path: str | os.PathLike[str]) -> str:
    """The last component of `path` as text for a file's metadata or a report (`from_os` applied)."""
    return from_os(os.path.basename(os.fspath(path)))
