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

from mergekit_sdxl.sampler.catalog import SAMPLER_NAMES, SCHEDULE_NAMES, SamplerName, ScheduleName

RECIPE_CHUNK = "mergekit_recipe"


def quote(value: object) -> str:
    """A1111's `quote`: JSON-quote a value that holds a comma, colon or newline."""
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def _number(value: float) -> str:
    return f"{value:g}"


def _a1111(row: SamplerName | ScheduleName | None, name: str) -> str:
    return row.a1111 if row is not None else name


def parameters_text(prompt: str, negative: str, steps: int, sampler: str, schedule: str, cfg: float, seed: int,
                    width: int, height: int, model_hash: str | None = None, model_name: str | None = None,
                    clip_skip: int = 1, recipe: str | None = None, extra: Mapping[str, object] | None = None,
                    ) -> str:
    """The `parameters` text of one image (sampler and schedule are this package's names)."""
    fields: dict[str, object] = {
        "Steps": steps, "Sampler": _a1111(SAMPLER_NAMES.get(sampler), sampler),
        "Schedule type": _a1111(SCHEDULE_NAMES.get(schedule), schedule), "CFG scale": _number(cfg), "Seed": seed,
        "Size": f"{width}x{height}",
    }
    if model_hash:
        fields["Model hash"] = model_hash
    if model_name:
        fields["Model"] = model_name
    if clip_skip > 1:
        fields["Clip skip"] = clip_skip
    fields.update(extra or {})
    if recipe:
        fields["Merge recipe"] = recipe
    lines = [prompt]
    if negative:
        lines.append(f"Negative prompt: {negative}")
    lines.append(", ".join(f"{k}: {quote(v)}" for k, v in fields.items()))
    return "\n".join(lines)


def png_info(parameters: str, recipe: str | None = None) -> object:
    """A PIL `PngInfo` with the `parameters` chunk (and the recipe chunk when given)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", parameters)  # falls back to iTXt for text outside Latin-1
    if recipe:
        info.add_text(RECIPE_CHUNK, recipe)
    return info
