"""Grid labels are legible at every cell size: measured in the rendered pixels, not in the layout's numbers."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from mergekit_sdxl.sampler.layout import MIN_FONT, render_page, stack_pages

LONG_NAMES = ["kohaku-xl-gamma-rev2-final-merged-v3 [86bea8223d]", "animagine-xl-3.1 [e3c47aedb0]",
              "anxl3-x-kxl-beta7-weighted-sum-0.35"]


def _cells(rows: int, cols: int, size: int) -> list[list[Image.Image]]:
    rng = np.random.default_rng(0)
    return [[Image.fromarray(rng.integers(140, 255, (size, size, 3), dtype=np.uint8)) for _ in range(cols)]
            for _ in range(rows)]


def _ink(image: Image.Image, box) -> np.ndarray:
    """Rows x columns of dark pixels (text) inside `box`."""
    return np.asarray(image.convert("L").crop(box)) < 110


def _extent(mask: np.ndarray, axis: int) -> int:
    """Pixels from the first to the last inked line along `axis` (0 = height)."""
    lines = np.flatnonzero(mask.any(axis=1 - axis))
    return int(lines[-1] - lines[0] + 1) if lines.size else 0


def test_column_values_are_legible_at_64_px():
    image, layout = render_page(_cells(2, 4, 64), ["0", "0.25", "0.5", "1"], ["seed 1", "seed 2"],
                                title="weighted_sum · Euler a · 28 steps", x_title="output.alpha[IN04]",
                                y_title="seed")
    assert not layout.vertical_columns and layout.font_size >= MIN_FONT
    for box in layout.columns:
        digits = _ink(image, box)
        assert _extent(digits, 0) >= 11  # digit height in pixels: a 16-px font, readable on screen and print
    for box in layout.rows:
        assert _extent(_ink(image, box), 0) >= 11
    assert _extent(_ink(image, layout.x_title), 0) >= 11 and _extent(_ink(image, layout.title), 0) >= 13


def test_long_model_names_turn_vertical_in_full_without_overlap():
    image, layout = render_page(_cells(1, 3, 64), LONG_NAMES, ["seed 1"], x_title="model")
    assert layout.vertical_columns
    header = _ink(image, (0, layout.columns[0][1], image.width, layout.columns[0][3]))
    inked = np.flatnonzero(header.any(axis=0))
    boxes = layout.columns
    assert all(any(b[0] <= x < b[2] for b in boxes) for x in inked)  # no label runs into a neighbour or the gap
    for box, name in zip(boxes, LONG_NAMES):
        drawn = int(_ink(image, box).sum())
        assert drawn >= 0.9 * _ink_of(name, layout.font_size)  # every character is there (nothing cut short)


def _ink_of(text: str, size: int) -> int:
    """Dark pixels of `text` set on one line at `size` px."""
    from PIL import ImageDraw, ImageFont

    font = ImageFont.load_default(size=size)
    scratch = Image.new("RGB", (int(font.getlength(text)) + 20, 3 * size), "white")
    ImageDraw.Draw(scratch).text((10, size // 2), text, font=font, fill=(20, 20, 20))
    return int((np.asarray(scratch.convert("L")) < 110).sum())


@pytest.mark.parametrize("size", [64, 256, 1024])
def test_text_does_not_shrink_with_the_cells(size):
    image, layout = render_page(_cells(1, 2, size), ["0", "1"], ["a prompt"], x_title="output.alpha")
    assert _extent(_ink(image, layout.columns[0]), 0) >= 11
    assert layout.font_size == max(MIN_FONT, min(32, size // 24))


def test_pages_stack():
    one, _ = render_page(_cells(1, 1, 64), ["a"], ["b"])
    two, _ = render_page(_cells(1, 1, 64), ["c"], ["d"])
    stacked = stack_pages([one, two])
    assert stacked.height >= one.height + two.height and stack_pages([one]) is one
