"""Bounded parsing of the JSON strings merge tools leave in safetensors metadata (`sd_merge_recipe`,
`sd_merge_models`, `mergekit_sdxl.recipe`).

A downloaded file's metadata is untrusted: before `json.loads` touches a value, its length, nesting depth and
number of values are counted in one regex pass over the text (strings skipped; io/jsonio.py, the one home for
reading untrusted JSON), so a hostile value costs bounded time and memory and fails with one line naming the file
and the key.
"""

from __future__ import annotations

from typing import Any

from mergekit_sdxl.errors import CheckpointError
from mergekit_sdxl.io import jsonio

MAX_JSON_CHARS = 4 << 20  # 4 Mi characters: thousands of ancestors' recipes; far above anything real
MAX_JSON_DEPTH = 32
MAX_JSON_VALUES = 200_000


def load_metadata_json(text: str, where: str) -> Any:
    """Parse `text` (a metadata value) as JSON within the limits above (io/jsonio.py does the counting).

    Args:
        text: the metadata string.
        where: "FILE: metadata KEY", the start of every error message.

    Raises:
        CheckpointError: too long, nested too deeply, too many values, or not JSON.
    """
    if not isinstance(text, str):
        raise CheckpointError(f"{where}: expected a JSON string, got {type(text).__name__}")
    return jsonio.loads(text, where, max_bytes=MAX_JSON_CHARS, max_depth=MAX_JSON_DEPTH, max_values=MAX_JSON_VALUES)
