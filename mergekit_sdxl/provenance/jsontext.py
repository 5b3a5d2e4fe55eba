"""Bounded parsing of the JSON strings merge tools leave in safetensors metadata (`sd_merge_recipe`,
`sd_merge_models`, `mergekit_sdxl.recipe`).

A downloaded file's metadata is untrusted: before `json.loads` touches a value, its length, nesting depth and
number of values are counted in one regex pass over the text (strings skipped), so a hostile value costs bounded
time and memory and fails with one line naming the file and the key.
"""

from __future__ import annotations

import json
import re
from typing import Any

from mergekit_sdxl.errors import CheckpointError

MAX_JSON_CHARS = 4 << 20  # 4 Mi characters: thousands of ancestors' recipes; far above anything real
MAX_JSON_DEPTH = 32
MAX_JSON_VALUES = 200_000

# After escaped backslashes and escaped quotes are removed (two C-speed replaces), a string is `"[^"]*"`. Tokens: a
# whole string (skipped), a structural character, or a quote that starts no complete string (invalid JSON: stop).
# One left-to-right pass: a string is consumed whole, so no position is scanned twice.
_TOKENS = re.compile(r'"[^"]*"|[\[\]{},]|"')


def load_metadata_json(text: str, where: str) -> Any:
    """Parse `text` (a metadata value) as JSON within the limits above.

    Args:
        text: the metadata string.
        where: "FILE: metadata KEY", the start of every error message.

    Raises:
        CheckpointError: too long, nested too deeply, too many values, or not JSON.
    """
    if not isinstance(text, str):
        raise CheckpointError(f"{where}: expected a JSON string, got {type(text).__name__}")
    if len(text) > MAX_JSON_CHARS:
        raise CheckpointError(f"{where}: {len(text):,} characters of JSON; the limit is {MAX_JSON_CHARS:,}")
    depth = deepest = values = 0
    for match in _TOKENS.finditer(text.replace("\\\\", "").replace('\\"', "")):
        char = match.group()
        if len(char) > 1:  # a complete string
            continue
        if char == '"':
            raise CheckpointError(f"{where}: not valid JSON (a string is never closed)")
        if char in "[{":
            depth += 1
            deepest = max(deepest, depth)
            values += 1
            if deepest > MAX_JSON_DEPTH:
                raise CheckpointError(f"{where}: JSON nested deeper than {MAX_JSON_DEPTH} levels")
        elif char in "]}":
            depth -= 1
        else:
            values += 1
        if values > MAX_JSON_VALUES:
            raise CheckpointError(f"{where}: more than {MAX_JSON_VALUES:,} JSON values")
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise CheckpointError(f"{where}: not valid JSON ({str(exc).splitlines()[0][:200]})") from None
