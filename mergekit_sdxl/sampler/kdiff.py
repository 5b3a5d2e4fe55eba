"""What every sampler shares: the k-diffusion calling convention and its small helpers.

`model(x, sigma)` returns the denoised prediction for latents `x` at per-image `sigma`; `noise(sigma, sigma_next)`
returns fresh noise shaped like `x`; `callback(i, x, denoised)` is called once per step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Noise = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Callback = Callable[[int, torch.Tensor, torch.Tensor], None] | None


def sigma_batch(sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """`sigma` repeated once per image of `x`."""
    return sigma * x.new_ones([x.shape[0]])


def to_d(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """Karras ODE derivative dx/dsigma."""
    return (x - denoised) / sigma


def get_ancestral_step(sigma_from: torch.Tensor, sigma_to: torch.Tensor, eta: float = 1.0) -> tuple:
    """(sigma_down, sigma_up) of an ancestral step from sigma_from to sigma_to."""
    if not eta:
        return sigma_to, sigma_to * 0
    sigma_up = torch.minimum(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    return (sigma_to**2 - sigma_up**2) ** 0.5, sigma_up


def report(callback: Callback, i: int, x: torch.Tensor, denoised: torch.Tensor) -> None:
    """Call `callback` if there is one."""
    if callback is not None:
        callback(i, x, denoised)
