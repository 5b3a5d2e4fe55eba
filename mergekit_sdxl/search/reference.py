"""The `reference` scorer: how close a trial's images are to reference images of the same payload.

Image i of the payload (prompts x seeds, prompt-major) is compared with reference i (files sorted by name), or
every image with the one reference given. With a CLIP (`--clip`) the score is the mean cosine of CLIP image
embeddings; without one it is the mean SSIM (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1 0.01,
K2 0.03, per RGB channel, averaged), which needs no weights. Both are higher for closer images, at most 1.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from mergekit_sdxl.errors import UsageError
from mergekit_sdxl.search.scoring import ScoredImage, existing_file

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
REFERENCE_HINT = "reference images: --reference DIR (one image per payload image, sorted by name) or FILE"


class ReferenceScorer:
    """Mean similarity of each image to its reference (CLIP cosine with `clip`, else SSIM)."""

    def __init__(self, options: Mapping[str, Any], device: str = "cpu") -> None:
        from PIL import Image

        location = existing_file(options, "reference", "reference", REFERENCE_HINT)
        files = reference_files(location)
        self.references = [Image.open(f).convert("RGB") for f in files]
        self.files = files
        self.clip = None
        if options.get("clip"):
            from mergekit_sdxl.search.clipscore import ClipModel

            self.clip = ClipModel(existing_file(options, "clip", "reference", "a CLIP"), device)
            self.embeds = self.clip.image_embeds(self.references)

    def __call__(self, images: Sequence[ScoredImage], context: Mapping[str, Any]) -> float:
        total = int(context.get("payload_images", len(images)))
        if len(self.references) not in (1, total):
            raise UsageError(f"reference: {len(self.references)} reference images for {total} payload images; give "
                             f"one per payload image (prompts x seeds) or a single one")
        which = [0 if len(self.references) == 1 else i.index for i in images]
        if self.clip is not None:
            embeds = self.clip.image_embeds([i.image for i in images])
            return float((embeds * self.embeds[which].to(embeds.device)).sum(-1).mean())
        values = [ssim(_tensor(i.image), _tensor(self.references[r]), f"{self.files[r]}") for i, r in
                  zip(images, which)]
        return float(sum(values) / len(values))


def reference_files(location: Path) -> list[Path]:
    """The reference images: a folder's images sorted by name, or the one file."""
    if location.is_dir():
        files = sorted(p for p in location.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise UsageError(f"reference: {location} holds no {'/'.join(IMAGE_SUFFIXES)} images")
        return files
    return [location]


def ssim(x: torch.Tensor, y: torch.Tensor, where: str = "reference") -> float:
    """Mean SSIM of two float images [3, H, W] in 0..1 (channels averaged)."""
    if x.shape != y.shape:
        raise UsageError(f"{where}: reference is {y.shape[2]}x{y.shape[1]}, the image {x.shape[2]}x{x.shape[1]}; "
                         "render the references at the payload's size")
    window = _gaussian_window(11, 1.5, x.shape[0]).to(x.dtype)
    c1, c2 = 0.01**2, 0.03**2
    x, y = x[None], y[None]

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, window, groups=t.shape[1])

    mx, my = blur(x), blur(y)
    sxx, syy, sxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    index = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return float(index.mean())


def _gaussian_window(size: int, sigma: float, channels: int) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, size, size).contiguous()


def _tensor(image: Any) -> torch.Tensor:
    import numpy as np

    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0).permute(2, 0, 1)
