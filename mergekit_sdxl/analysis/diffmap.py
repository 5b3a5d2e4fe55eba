"""The block-diff heatmap PNG: one row per component (UNet blocks, CLIP-L layers, CLIP-G layers, VAE stages),
colour = relative change ||B - A|| / ||A|| on one scale for the whole image, shown by a colour bar with its units;
the title names both files."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

from mergekit_sdxl.arch.parts import COMPONENT_TITLES, part_order
from mergekit_sdxl.io.commit import write_file

ROWS = ("unet", "clip_l", "clip_g", "vae")
STOPS = ((255, 255, 255), (253, 174, 97), (215, 25, 28), (103, 0, 31))  # white -> orange -> red -> dark red
CELL = 34
FONT = 13


def colour(t: float) -> tuple[int, int, int]:
    """The colour of `t` in 0..1 along STOPS (values outside are clamped; NaN is the top colour)."""
    t = 1.0 if math.isnan(t) else min(max(t, 0.0), 1.0)
    scaled = t * (len(STOPS) - 1)
    i = min(len(STOPS) - 2, int(scaled))
    f = scaled - i
    red, green, blue = (round(lo + (hi - lo) * f) for lo, hi in zip(STOPS[i], STOPS[i + 1]))
    return red, green, blue


def heatmap(result: Any, path: str | Path, overwrite: bool = False) -> Path:
    """Draw `result` (a DiffResult) to `path` and return it; written like every output (io/commit.py: atomic,
    never onto an input, no clobbering without `overwrite`)."""
    from PIL import Image, ImageDraw, ImageFont

    font, small = ImageFont.load_default(size=FONT), ImageFont.load_default(size=FONT - 2)
    rows = _rows(result)
    top_value = max((v for _, cells in rows for _, v in cells if math.isfinite(v)), default=0.0) or 1e-12
    label_w = 70
    name_h = max((int(small.getlength(p)) for _, cells in rows for p, _ in cells), default=20) + 6
    width = label_w + CELL * max((len(cells) for _, cells in rows), default=1) + 20
    title_h, bar_h = 3 * (FONT + 6), 5 * FONT
    height = title_h + len(rows) * (name_h + CELL + 8) + bar_h + 10
    image = Image.new("RGB", (max(width, 560), height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((8, 6), f"B: {Path(result.path_b).name}", font=font, fill="black")
    draw.text((8, 6 + FONT + 6), f"A: {Path(result.path_a).name}", font=font, fill="black")
    draw.text((8, 6 + 2 * (FONT + 6)), f"{result.arch}, blocks by the {result.convention} rule; colour: relative "
              "change ||B - A|| / ||A|| per part", font=small, fill=(80, 80, 80))
    y = title_h
    for component, cells in rows:
        _draw_row(image, draw, y, component, cells, top_value, font, small, label_w, name_h)
        y += name_h + CELL + 8
    _colour_bar(draw, 8, y + 4, min(360, image.width - 16), top_value, small)
    png = io.BytesIO()
    image.save(png, format="PNG", pnginfo=_info(result, top_value))
    write_file(path, png.getvalue(), overwrite=overwrite)
    return Path(path)


def _info(result: Any, top: float) -> Any:
    """PNG text: which files, and the scale (a viewer's "properties" shows them; tests read them)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("Title", f"block diff: B = {Path(result.path_b).name} vs A = {Path(result.path_a).name}")
    info.add_text("Description", f"colour: relative change ||B - A|| / ||A|| from 0 (white) to {top:.6g} "
                                 f"(dark red); rows: {', '.join(c for c, _ in _rows(result))}")
    return info


def _rows(result: Any) -> list[tuple[str, list[tuple[str, float]]]]:
    rows = []
    for component in ROWS:
        cells = [(part, result.parts[component, part].relative_change)
                 for part in part_order(component, result.arch, result.convention)
                 if (component, part) in result.parts and result.parts[component, part].keys]
        if cells:
            rows.append((component, cells))
    return rows


def _draw_row(image: Any, draw: Any, y: int, component: str, cells: list[tuple[str, float]], top: float,
              font: Any, small: Any, label_w: int, name_h: int) -> None:
    from PIL import Image, ImageDraw

    draw.text((8, y + name_h + CELL // 2 - FONT // 2), COMPONENT_TITLES[component], font=font, fill="black")
    for i, (part, value) in enumerate(cells):
        x = label_w + i * CELL
        strip = Image.new("RGBA", (name_h, CELL), (255, 255, 255, 0))
        ImageDraw.Draw(strip).text((2, CELL // 2 - FONT // 2), part, font=small, fill=(40, 40, 40))
        turned = strip.rotate(90, expand=True)
        image.paste(turned, (x, y), turned)
        fill = colour(value / top if math.isfinite(value) else 1.0)
        draw.rectangle((x, y + name_h, x + CELL - 2, y + name_h + CELL - 2), fill=fill, outline=(200, 200, 200))
        text = _short(value)
        ink = "white" if sum(fill) < 380 else "black"
        draw.text((x + max(1, (CELL - 2 - int(small.getlength(text))) // 2), y + name_h + CELL // 2 - FONT // 2),
                  text, font=small, fill=ink)


def _short(value: float) -> str:
    """Relative change in percent, compact enough for one cell."""
    if not math.isfinite(value):
        return "inf"
    percent = value * 100
    if percent == 0:
        return "0"
    return f"{percent:.1f}" if percent < 10 else f"{percent:.0f}"


def _colour_bar(draw: Any, x: int, y: int, width: int, top: float, font: Any) -> None:
    for i in range(width):
        draw.line((x + i, y, x + i, y + 12), fill=colour(i / max(1, width - 1)))
    draw.rectangle((x, y, x + width, y + 12), outline=(120, 120, 120))
    for t in (0.0, 0.5, 1.0):
        tick = x + round(t * width)
        draw.line((tick, y + 12, tick, y + 16), fill="black")
        label = f"{t * top * 100:.3g} %"
        draw.text((min(tick, x + width - int(font.getlength(label))), y + 18), label, font=font, fill="black")
    draw.text((x, y + 20 + font.size), "colour: relative change ||B - A|| / ||A|| in % (the numbers in the cells)",
              font=font, fill="black")
