"""The labelled grid image: a title line, axis titles, column and row values outside the cells, one page per Z value.

Text is set at a fixed legible size whatever the cell size (64-px cells get the same 16-px labels as 1024-px
ones, which get larger text); long values wrap, and column values too long for narrow columns are set vertically.
Nothing is cut short: model names appear in full. `render_page` also returns where every label and cell went, so
tests (and the HTML report) can check them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

Box = tuple[int, int, int, int]  # left, top, right, bottom (exclusive)

MIN_FONT = 16
MAX_FONT = 32
MAX_HEADER_LINES = 3  # more lines than this in a column and the column values are set vertically
MAX_ROW_LABEL = 360  # px
GAP = 2
INK = (20, 20, 20)
MUTED = (90, 90, 90)


@dataclass
class PageLayout:
    """Where things are on one page (pixel boxes)."""

    size: tuple[int, int]
    title: Box | None = None
    x_title: Box | None = None
    y_title: Box | None = None
    columns: list[Box] = field(default_factory=list)
    rows: list[Box] = field(default_factory=list)
    cells: list[list[Box]] = field(default_factory=list)
    vertical_columns: bool = False
    font_size: int = MIN_FONT


def font_size_for(cell_width: int) -> int:
    """Label size: 16 px up to 384-px cells, growing to 32 px at 768 px and above."""
    return max(MIN_FONT, min(MAX_FONT, cell_width // 24))


def _font(size: int) -> Any:
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def wrap(text: str, font: Any, width: int) -> list[str]:
    """Greedy word wrap to `width` px; a word wider than a line breaks after a `-`, `_`, `/` or `.` where it can,
    else between characters."""
    lines: list[str] = []
    for paragraph in str(text).split("\n"):
        line = ""
        for word in paragraph.split(" "):
            candidate = f"{line} {word}" if line else word
            if font.getlength(candidate) <= width:
                line = candidate
                continue
            if line:
                lines.append(line)
            line = ""
            while font.getlength(word) > width:
                cut = _cut(word, font, width)
                lines.append(word[:cut])
                word = word[cut:]
            line = word
        lines.append(line)
    return lines


def _cut(word: str, font: Any, width: int) -> int:
    """Where to break a word too wide for a line: after the last separator that fits, else the last character."""
    fits = max(1, next((i for i in range(len(word), 0, -1) if font.getlength(word[:i]) <= width), 1))
    separator = max((word.rfind(c, 0, fits) for c in "-_/."), default=-1)
    return separator + 1 if separator > 0 else fits


def _line_height(font: Any) -> int:
    top, bottom = font.getbbox("Ag")[1], font.getbbox("Ag")[3]
    return int(bottom - top) + max(2, font.size // 4)


def _text_block(lines: Sequence[str], font: Any) -> tuple[int, int]:
    width = max((int(font.getlength(line)) for line in lines), default=0)
    return width, _line_height(font) * len(lines)


def _draw_lines(draw: Any, xy: tuple[int, int], lines: Sequence[str], font: Any, width: int | None = None,
                fill: tuple[int, int, int] = INK) -> None:
    x, y = xy
    step = _line_height(font)
    for i, line in enumerate(lines):
        dx = 0 if width is None else max(0, (width - int(font.getlength(line))) // 2)
        draw.text((x + dx, y + i * step - font.getbbox("Ag")[1]), line, font=font, fill=fill)


def _length_for(text: str, font: Any, lines: int) -> int:
    """The shortest line length (px) at which `text` wraps into at most `lines` lines."""
    length = max(font.size, int(font.getlength(text)) // lines)
    while len(wrap(text, font, length)) > lines:
        length += font.size
    return length


def _vertical_label(text: str, font: Any, length: int, thickness: int) -> Any:
    """`text` wrapped to `length` px, drawn on a transparent strip and turned 90 degrees (reads bottom to top)."""
    from PIL import Image, ImageDraw

    lines = wrap(text, font, length)
    strip = Image.new("RGBA", (length, max(thickness, _text_block(lines, font)[1])), (255, 255, 255, 0))
    _draw_lines(ImageDraw.Draw(strip), (0, 0), lines, font)
    return strip.rotate(90, expand=True)


def render_page(cells: Sequence[Sequence[Any]], col_labels: Sequence[str], row_labels: Sequence[str], *,
                title: str = "", x_title: str = "", y_title: str = "") -> tuple[Any, PageLayout]:
    """One labelled page: `cells[r][c]` are PIL images (None for an empty cell); returns (image, layout)."""
    from PIL import Image, ImageDraw

    cw = max((c.size[0] for row in cells for c in row if c is not None), default=64)
    ch = max((c.size[1] for row in cells for c in row if c is not None), default=64)
    n_rows, n_cols = len(row_labels), len(col_labels)
    font = _font(font_size_for(cw))
    small_title = _font(round(font.size * 1.25))
    pad = max(4, font.size // 3)
    line_h = _line_height(font)

    col_lines = [wrap(label, font, cw - 2 * pad) for label in col_labels]
    vertical = any(len(lines) > MAX_HEADER_LINES for lines in col_lines)
    if vertical:
        across = max(1, (cw - 2) // line_h)  # lines that fit side by side in a column once turned
        header_h = max(_length_for(label, font, across) for label in col_labels) + 2 * pad
    else:
        header_h = max((len(lines) for lines in col_lines), default=1) * line_h + 2 * pad
    widest = max((int(font.getlength(t)) for t in (*row_labels, y_title)), default=0)
    row_w = min(MAX_ROW_LABEL, widest + 2 * pad)
    row_w = max(row_w, 4 * font.size) if any(row_labels) or y_title else 0
    row_lines = [wrap(label, font, row_w - 2 * pad) if row_w else [] for label in row_labels]
    y_lines = wrap(y_title, font, row_w - 2 * pad) if y_title else []
    header_h = max(header_h, len(y_lines) * line_h + 2 * pad)

    grid_w = n_cols * cw + (n_cols - 1) * GAP
    width = row_w + grid_w + pad
    title_lines = wrap(title, small_title, width - 2 * pad) if title else []
    title_h = _text_block(title_lines, small_title)[1] + 2 * pad if title_lines else 0
    x_lines = wrap(x_title, font, grid_w - 2 * pad) if x_title else []
    x_title_h = len(x_lines) * line_h + pad if x_lines else 0
    rows_h = [max(ch, len(lines) * line_h + 2 * pad) for lines in row_lines] or [ch]
    top = title_h + x_title_h + header_h
    height = top + sum(rows_h) + GAP * (n_rows - 1) + pad

    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    layout = PageLayout((width, height), vertical_columns=vertical, font_size=font.size)
    if title_lines:
        _draw_lines(draw, (pad, pad), title_lines, small_title)
        layout.title = (pad, pad, width - pad, title_h - pad)
    left = row_w
    if x_lines:
        _draw_lines(draw, (left + pad, title_h), x_lines, font, grid_w - 2 * pad, MUTED)
        layout.x_title = (left, title_h, left + grid_w, title_h + x_title_h)
    header_top = title_h + x_title_h
    for c, (label, lines) in enumerate(zip(col_labels, col_lines)):
        x = left + c * (cw + GAP)
        box = (x, header_top, x + cw, header_top + header_h)
        if vertical:
            strip = _vertical_label(label, font, header_h - 2 * pad, line_h)
            image.paste(strip, (x + max(0, (cw - strip.width) // 2), header_top + pad), strip)
        else:
            block_h = len(lines) * line_h
            _draw_lines(draw, (x + pad, header_top + header_h - pad - block_h), lines, font, cw - 2 * pad)
        layout.columns.append(box)
    y = top
    for r, (lines, row_h) in enumerate(zip(row_lines, rows_h)):
        if row_w:
            _draw_lines(draw, (pad, y + pad), lines, font)
        layout.rows.append((0, y, row_w, y + row_h))
        boxes = []
        for c in range(n_cols):
            x = left + c * (cw + GAP)
            cell = cells[r][c] if c < len(cells[r]) else None
            if cell is not None:
                image.paste(cell, (x, y))
            boxes.append((x, y, x + cw, y + ch))
        layout.cells.append(boxes)
        y += row_h + GAP
    if y_lines:  # the Y axis title sits over the row values, in the header band, level with the column values
        y0 = header_top + header_h - pad - len(y_lines) * line_h
        _draw_lines(draw, (pad, y0), y_lines, font, fill=MUTED)
        layout.y_title = (0, y0, row_w, header_top + header_h)
    return image, layout


def stack_pages(pages: Sequence[Any]) -> Any:
    """Pages one under the other (one page is returned as it is)."""
    from PIL import Image

    if len(pages) == 1:
        return pages[0]
    width = max(p.width for p in pages)
    out = Image.new("RGB", (width, sum(p.height for p in pages) + 4 * GAP * (len(pages) - 1)), "white")
    y = 0
    for page in pages:
        out.paste(page, (0, y))
        y += page.height + 4 * GAP
    return out
