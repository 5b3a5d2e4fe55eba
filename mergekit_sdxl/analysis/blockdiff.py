"""Per-block difference between two checkpoints: relative change ||B - A|| / ||A|| and cosine similarity.

Blocks are the MBW blocks of `arch.blocks.block_of` (BASE, IN00.., M00, OUT00..; "keep A" for keys no merge
touches), plus one summary row per component. Tensors are streamed one key at a time in float64 sums, so memory
stays at two tensors whatever the model size.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mergekit_sdxl.arch.blocks import DEFAULT_CONVENTION, block_names, block_of
from mergekit_sdxl.arch.detect import component_of, detect_arch
from mergekit_sdxl.errors import ArchError
from mergekit_sdxl.io.reader import open_checkpoint

KEEP_A_LABEL = "keep A"


@dataclass
class Sums:
    """Running float64 sums of one group of tensors."""

    keys: int = 0
    numel: int = 0
    aa: float = 0.0
    bb: float = 0.0
    ab: float = 0.0
    dd: float = 0.0

    def add(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Accumulate one pair of tensors (any float dtype)."""
        a, b = a.double().flatten(), b.double().flatten()
        self.keys += 1
        self.numel += a.numel()
        self.aa += float(a @ a)
        self.bb += float(b @ b)
        self.ab += float(a @ b)
        self.dd += float((b - a) @ (b - a))

    @property
    def relative_change(self) -> float:
        """||B - A|| / ||A|| (inf when A is all zero and B is not)."""
        if self.aa == 0:
            return 0.0 if self.dd == 0 else math.inf
        return math.sqrt(self.dd / self.aa)

    @property
    def cosine(self) -> float:
        """<A, B> / (||A|| ||B||) (1 when both are zero)."""
        if self.aa == 0 or self.bb == 0:
            return 1.0 if self.aa == self.bb else 0.0
        return self.ab / math.sqrt(self.aa * self.bb)


@dataclass
class DiffResult:
    """Sums per block and per component, and the keys that could not be compared."""

    arch: str
    blocks: dict[str, Sums]
    components: dict[str, Sums]
    only_in_a: list[str] = field(default_factory=list)
    only_in_b: list[str] = field(default_factory=list)
    shape_mismatch: list[str] = field(default_factory=list)

    def rows(self) -> list[dict]:
        """JSON-ready rows: group, kind (block/component), keys, params, relative_change, cosine."""
        out = []
        for kind, groups in (("block", self.blocks), ("component", self.components)):
            for name, s in groups.items():
                if s.keys:
                    out.append({"group": name, "kind": kind, "keys": s.keys, "params": s.numel,
                                "relative_change": s.relative_change, "cosine": s.cosine})
        return out


def diff_checkpoints(path_a: str | Path, path_b: str | Path, convention: str = DEFAULT_CONVENTION,
                     progress: Callable[[int, int], None] | None = None) -> DiffResult:
    """Compare B against A block by block, reading one key of each at a time."""
    with open_checkpoint(path_a) as a, open_checkpoint(path_b) as b:
        arch = detect_arch(a.keys(), str(path_a))
        arch_b = detect_arch(b.keys(), str(path_b))
        if arch != arch_b:
            raise ArchError(f"{path_a} is {arch} but {path_b} is {arch_b}: nothing to compare")
        order = [*block_names(arch, convention), KEEP_A_LABEL]
        result = DiffResult(arch, {name: Sums() for name in order}, {})
        keys_b = set(b.keys())
        result.only_in_b = sorted(keys_b - set(a.keys()))
        common = [k for k in a.keys() if k in keys_b]
        result.only_in_a = [k for k in a.keys() if k not in keys_b]
        for i, key in enumerate(common):
            _compare(result, arch, convention, key, a, b)
            if progress is not None:
                progress(i + 1, len(common))
    return result


def _compare(result: DiffResult, arch: str, convention: str, key: str, a: object, b: object) -> None:
    ia, ib = a.info(key), b.info(key)
    if tuple(ia.shape) != tuple(ib.shape):
        result.shape_mismatch.append(key)
        return
    ta, tb = a.read(key), b.read(key)
    if not (ta.is_floating_point() and tb.is_floating_point()) or ta.numel() == 0:
        return
    block = block_of(key, arch, convention) or KEEP_A_LABEL
    result.blocks.setdefault(block, Sums()).add(ta, tb)
    result.components.setdefault(component_of(key, arch), Sums()).add(ta, tb)


def heatmap(result: DiffResult, path: str | Path, cell: int = 46) -> Path:
    """A PNG heatmap: one column per block, rows "relative change" and "1 - cosine", colour from each row's
    minimum (white) to its maximum (dark red)."""
    from PIL import Image, ImageDraw, ImageFont

    names = [n for n, s in result.blocks.items() if s.keys]
    rows = [("rel. change", [result.blocks[n].relative_change for n in names]),
            ("1 - cosine", [1 - result.blocks[n].cosine for n in names])]
    font = ImageFont.load_default(size=11)
    label_w, top = 90, 50
    image = Image.new("RGB", (label_w + cell * len(names), top + cell * len(rows) + 10), "white")
    draw = ImageDraw.Draw(image)
    for c, name in enumerate(names):
        draw.text((label_w + c * cell + 2, top - 14), name[:7], font=font, fill="black")
    for r, (label, values) in enumerate(rows):
        y = top + r * cell
        draw.text((4, y + cell // 2 - 6), label, font=font, fill="black")
        finite = [v for v in values if math.isfinite(v)]
        low, high = min(finite, default=0.0), max(finite, default=0.0)
        span = (high - low) or 1.0
        for c, value in enumerate(values):
            x = label_w + c * cell
            t = (value - low) / span if math.isfinite(value) else 1.0
            draw.rectangle((x, y, x + cell - 1, y + cell - 1), fill=_colour(t))
            draw.text((x + 2, y + cell // 2 - 6), f"{value:.2g}", font=font, fill="black")
    draw.text((4, 4), f"{result.arch}: B vs A per MBW block (colour: each row's minimum to maximum)", font=font,
              fill="black")
    image.save(path)
    return Path(path)


def _colour(t: float) -> tuple[int, int, int]:
    """White (0) -> orange -> dark red (1)."""
    t = min(max(t, 0.0), 1.0)
    return (255 - int(40 * t), 255 - int(170 * t), 255 - int(200 * t))
