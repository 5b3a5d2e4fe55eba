"""Noise as A1111 draws it: one generator per image, seeded with the image's seed, from one of three sources.

- `cpu` (A1111 "CPU"): a `torch.Generator` on the CPU; an image does not depend on the device or the batch.
- `gpu` (A1111's default "GPU"): a CUDA `torch.Generator` (CUDA devices only).
- `nv` (A1111 "NV"): CUDA's Philox stream reproduced on the CPU (`philox.py`), so a CPU-only machine gets the
  noise an NVIDIA GPU would draw.

The first draw is the initial latent (times the first sigma); later draws feed ancestral steps. SDE samplers take
their noise from a Brownian tree per image (torchsde, as k-diffusion's `BrownianTreeNoiseSampler`) between the
smallest positive and the largest sigma, seeded with the image seed; the tree's own normal draws come from the
same source (A1111 replaces torchsde's `_randn` the same way), so "DPM++ 2M SDE" matches A1111 for a given RNG.
"""

from __future__ import annotations

import contextlib
import contextvars
import warnings
from collections.abc import Callable, Iterator

import torch

from mergekit_sdxl.sampler.catalog import RNG_MODES
from mergekit_sdxl.sampler.philox import PhiloxGenerator


class _Source:
    """One image's generator for `rng` on `device`."""

    def __init__(self, seed: int, rng: str, device: torch.device) -> None:
        self.rng, self.device = rng, device
        if rng == "nv":
            self.generator: PhiloxGenerator | torch.Generator = PhiloxGenerator(seed)
        elif rng == "gpu":
            self.generator = torch.Generator(device).manual_seed(int(seed))
        else:
            self.generator = torch.Generator("cpu").manual_seed(int(seed))

    def randn(self, shape: tuple[int, ...]) -> torch.Tensor:
        generator = self.generator
        if isinstance(generator, PhiloxGenerator):  # rng "nv"
            return torch.from_numpy(generator.randn(shape))
        if self.rng == "gpu":
            return torch.randn(shape, generator=generator, device=self.device, dtype=torch.float32)
        return torch.randn(shape, generator=generator, dtype=torch.float32)


def check_rng(rng: str, device: torch.device | str) -> None:
    """ValueError when `rng` is unknown, or `gpu` on a device that is not CUDA."""
    if rng not in RNG_MODES:
        raise ValueError(f"unknown RNG {rng!r}; choose one of {', '.join(RNG_MODES)}")
    if rng == "gpu" and torch.device(device).type != "cuda":
        raise ValueError("--rng gpu draws noise with the CUDA generator and needs a CUDA device; use --rng nv for "
                         "the same noise on the CPU, or --rng cpu")


def randn_local(seed: int, shape: tuple[int, ...], rng: str, device: torch.device | str) -> torch.Tensor:
    """The first float32 draw of a fresh generator seeded with `seed` (A1111's `randn_local`)."""
    return _Source(seed, rng, torch.device(device)).randn(tuple(shape)).to(device)


class ImageNoise:
    """Noise source for a batch of images with seeds `seeds` and latent shape `shape` (C, h, w)."""

    def __init__(self, seeds: list[int], shape: tuple[int, int, int], device: torch.device | str = "cpu",
                 rng: str = "cpu") -> None:
        check_rng(rng, device)
        self.shape, self.device, self.rng = tuple(shape), torch.device(device), rng
        self.seeds = [int(s) for s in seeds]
        self.sources = [_Source(s, rng, self.device) for s in self.seeds]

    def draw(self) -> torch.Tensor:
        """The next [B, C, h, w] float32 draw, one row per image's generator."""
        return torch.stack([src.randn(self.shape).to(self.device) for src in self.sources])

    def __call__(self, sigma: torch.Tensor | None = None, sigma_next: torch.Tensor | None = None) -> torch.Tensor:
        """k-diffusion noise-sampler signature."""
        return self.draw()

    def brownian(self, sigmas: torch.Tensor) -> BrownianNoise:
        """A Brownian-tree noise sampler for these images over the range of `sigmas`."""
        return BrownianNoise(self.seeds, self.shape, sigmas, self.device, self.rng)


_TREE_RNG: contextvars.ContextVar[tuple[str, torch.device] | None] = contextvars.ContextVar("tree_rng", default=None)
_original_randn: Callable[..., torch.Tensor] | None = None


def _tree_randn(size: tuple[int, ...], dtype: torch.dtype, device: torch.device, seed: int) -> torch.Tensor:
    """torchsde's draw for a tree node: from our RNG source while a `BrownianNoise` is active, else torchsde's."""
    active = _TREE_RNG.get()
    if active is None:
        assert _original_randn is not None  # saved before this hook was installed
        return _original_randn(size, dtype, device, seed)
    rng, _ = active
    return randn_local(int(seed), tuple(size), rng, device).to(device=device, dtype=dtype)


def _install_tree_randn() -> None:
    """Route torchsde's node draws through `_tree_randn` (once; other torchsde users see no change)."""
    global _original_randn
    from torchsde._brownian import brownian_interval

    if _original_randn is None:
        _original_randn = brownian_interval._randn
        brownian_interval._randn = _tree_randn


@contextlib.contextmanager
def _tree_source(rng: str, device: torch.device) -> Iterator[None]:
    token = _TREE_RNG.set((rng, device))
    try:
        yield
    finally:
        _TREE_RNG.reset(token)


class BrownianNoise:
    """k-diffusion's `BrownianTreeNoiseSampler` with one tree per image seed (A1111's batch-independent form).

    Calling it with (sigma, sigma_next) returns the tree's increment over that interval divided by its standard
    deviation sqrt(|sigma - sigma_next|), with k-diffusion's sign convention.
    """

    def __init__(self, seeds: list[int], shape: tuple[int, ...], sigmas: torch.Tensor,
                 device: torch.device | str = "cpu", rng: str = "cpu") -> None:
        import torchsde

        _install_tree_randn()
        self.rng, self.device = rng, torch.device(device)
        positive = sigmas[sigmas > 0]
        self.t0, self.t1 = positive.min(), sigmas.max()
        w0 = torch.zeros(shape, dtype=torch.float32, device=self.device)
        with _tree_source(rng, self.device):
            self.trees = [torchsde.BrownianTree(self.t0, w0, self.t1, entropy=int(s)) for s in seeds]

    def __call__(self, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        lo, hi, sign = (sigma, sigma_next, 1) if sigma < sigma_next else (sigma_next, sigma, -1)
        with _tree_source(self.rng, self.device), warnings.catch_warnings():
            # torchsde rounds the tree's ends to its tolerance and then warns about float32 sigma_max itself
            warnings.filterwarnings("ignore", message="Should have (ta|tb)", category=UserWarning)
            w = torch.stack([tree(lo, hi) for tree in self.trees]) * sign
        return w / (hi - lo).abs().sqrt()
