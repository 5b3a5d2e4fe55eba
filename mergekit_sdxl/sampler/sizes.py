"""Image sizes: `WxH` or a named SDXL bucket (the Animagine XL 3.1 / SDXL resolution table)."""

from __future__ import annotations

import re

from mergekit_sdxl.arch.registry import arch_spec
from mergekit_sdxl.errors import UsageError

# name -> (width, height); the ratio names are those of the Animagine XL 3.1 model card
BUCKETS: dict[str, tuple[int, int]] = {
    "1:1": (1024, 1024), "9:7": (1152, 896), "7:9": (896, 1152), "19:13": (1216, 832), "13:19": (832, 1216),
    "7:4": (1344, 768), "4:7": (768, 1344), "12:5": (1536, 640), "5:12": (640, 1536),
}
NAMED: dict[str, str] = {
    "square": "1:1", "portrait": "13:19", "landscape": "19:13", "portrait-mild": "7:9", "landscape-mild": "9:7",
    "tall": "4:7", "wide": "7:4", "ultratall": "5:12", "ultrawide": "12:5",
}
_WXH = re.compile(r"(\d+)\s*[x×*]\s*(\d+)")


def parse_size(text: str) -> tuple[int, int]:
    """(width, height) from `"832x1216"`, a ratio (`"13:19"`) or a name (`"portrait"`); UsageError otherwise."""
    text = text.strip().lower()
    key = NAMED.get(text, text)
    if key in BUCKETS:
        return BUCKETS[key]
    match = _WXH.fullmatch(text)
    if not match:
        names = ", ".join([*NAMED, *BUCKETS])
        raise UsageError(f"--size {text!r}: expected WIDTHxHEIGHT (e.g. 832x1216) or one of {names}")
    width, height = int(match.group(1)), int(match.group(2))
    if width < 64 or height < 64 or width % 8 or height % 8:
        raise UsageError(f"--size {width}x{height}: both sides must be multiples of 8 and at least 64")
    return width, height


def size_warning(arch: str, width: int, height: int) -> str | None:
    """A sentence when (width, height) lies outside what the model cards recommend for `arch`, else None."""
    low, high = arch_spec(arch).sampler.pixel_range  # what the model cards recommend
    if low <= width * height <= high:
        return None
    return (f"{width}x{height} is {width * height:,} pixels, outside the {low:,}-{high:,} the {arch.upper()} model "
            "cards recommend; expect duplicated or cropped subjects")
