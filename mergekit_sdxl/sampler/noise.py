"""Per-image CPU noise, as A1111 draws it: one `torch.Generator` per image seeded with its own seed.

The first draw is the initial latent (times sigma_max); later draws feed ancestral/SDE steps. Drawing on the CPU
and per image makes an image independent of the device and of the batch it was rendered in.
"""

from __future__ import annotations

import torch


class ImageNoise:
    """Noise source for a batch of images with seeds `seeds` and latent shape `shape` (C, h, w)."""

    def __init__(self, seeds: list[int], shape: tuple[int, int, int], device: torch.device | str = "cpu") -> None:
        self.shape, self.device = tuple(shape), device
        self.generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]

    def draw(self) -> torch.Tensor:
        """The next [B, C, h, w] float32 draw, one row per image's generator."""
        rows = [torch.randn(self.shape, generator=g, dtype=torch.float32) for g in self.generators]
        return torch.stack(rows).to(self.device)

    def __call__(self, sigma: torch.Tensor | None = None, sigma_next: torch.Tensor | None = None) -> torch.Tensor:
        """k-diffusion noise-sampler signature."""
        return self.draw()
