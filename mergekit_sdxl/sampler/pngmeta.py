"""A1111-style `parameters` text for PNG files, which A1111's PNG Info, sd-parsers and sd-prompt-reader read.

Format (one prompt line or more, an optional negative line, then one line of `Key: value` pairs):

    masterpiece, 1girl
    Negative prompt: lowres
    Steps: 28, Sampler: Euler a, Schedule type: Uniform, CFG scale: 6, Seed: 1, Size: 832x1216,
    Model hash: 86bea8223d, Model: animagine-xl-3.1, Merge recipe: "{...}"

(the last two lines are one line in the file). Values holding a comma, colon or newline are JSON-quoted, as A1111
does. The merge recipe is also stored verbatim in its own `mergekit_recipe` text chunk.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import TYPE_CHECKING

from mergekit_sdxl.platform.text import from_os
from mergekit_sdxl.sampler.catalog import RNG_LABELS, sampler_name, schedule_name

if TYPE_CHECKING:
    from PIL.PngImagePlugin import PngInfo

RECIPE_CHUNK = "mergekit_recipe"


def quote(value: object) -> str:
    """A1111's `quote`: JSON-quote a value that holds a comma, colon or newline."""
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def _number(value: float) -> str:
    return f"{value:g}"


def parameters_text(prompt: str, negative: str, steps: int, sampler: str, schedule: str, cfg: float, seed: int,
                    width: int, height: int, model_hash: str | None = None, model_name: str | None = None,
                    clip_skip: int = 1, recipe: str | None = None, extra: Mapping[str, object] | None = None,
                    rng: str = "cpu") -> str:
    """The `parameters` text of one image (sampler and schedule are this package's names).

    A1111 reads back `Sampler`, `Schedule type` (its labels) and `RNG` (written, as A1111 does, only when the
    noise is not its default GPU noise); `extra` adds fields such as `TI hashes` and `Lora hashes`.
    """
    fields: dict[str, object] = {
        "Steps": steps, "Sampler": sampler_name(sampler).a1111, "Schedule type": schedule_name(schedule).a1111,
        "CFG scale": _number(cfg), "Seed": seed, "Size": f"{width}x{height}",
    }
    if model_hash:
        fields["Model hash"] = model_hash
    if model_name:
        fields["Model"] = model_name
    if clip_skip > 1:
        fields["Clip skip"] = clip_skip
    if rng != "gpu":
        fields["RNG"] = RNG_LABELS[rng]
    fields.update(extra or {})
    if recipe:
        fields["Merge recipe"] = recipe
    lines = [prompt]
    if negative:
        lines.append(f"Negative prompt: {negative}")
    lines.append(", ".join(f"{k}: {quote(v)}" for k, v in fields.items()))
    return "\n".join(lines)


def png_info(parameters: str, recipe: str | None = None) -> PngInfo:
    """A PIL `PngInfo` with the `parameters` chunk (and the recipe chunk when given)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    parameters, recipe = from_os(parameters), from_os(recipe) if recipe is not None else None  # LANG=C names
    info.add_text("parameters", parameters)  # falls back to iTXt for text outside Latin-1
    if recipe:
        info.add_text(RECIPE_CHUNK, recipe)
    return info
