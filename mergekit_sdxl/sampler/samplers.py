"""Samplers in k-diffusion form: `sample_<name>(model, x, sigmas, noise, callback)`.

Re-implemented on torch alone after k-diffusion's `sampling.py` (Katherine Crowson, MIT licence,
https://github.com/crowsonkb/k-diffusion), the code AUTOMATIC1111 and ComfyUI run. `model(x, sigma)` returns the
denoised prediction; `noise(sigma, sigma_next)` draws fresh noise shaped like `x` (per-image generators, so an
image does not depend on its batch). `callback(i, x, denoised)` is called once per step.

DPM++ 2M SDE draws its noise from the same per-image generators; A1111 and ComfyUI use a Brownian tree
(torchsde) there, so that sampler matches them in distribution, not bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Noise = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Callback = Callable[[int, torch.Tensor, torch.Tensor], None] | None


def _sigma_batch(sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
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


def _report(callback: Callback, i: int, x: torch.Tensor, denoised: torch.Tensor) -> None:
    if callback is not None:
        callback(i, x, denoised)


def sample_euler(model: Model, x: torch.Tensor, sigmas: torch.Tensor, noise: Noise | None = None,
                 callback: Callback = None) -> torch.Tensor:
    """Euler method (Karras et al. 2022, Algorithm 2 without churn)."""
    for i in range(len(sigmas) - 1):
        denoised = model(x, _sigma_batch(sigmas[i], x))
        x = x + to_d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
        _report(callback, i, x, denoised)
    return x


def sample_euler_ancestral(model: Model, x: torch.Tensor, sigmas: torch.Tensor, noise: Noise,
                           callback: Callback = None, eta: float = 1.0) -> torch.Tensor:
    """Ancestral Euler ("Euler a")."""
    for i in range(len(sigmas) - 1):
        denoised = model(x, _sigma_batch(sigmas[i], x))
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta)
        x = x + to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        if sigmas[i + 1] > 0:
            x = x + noise(sigmas[i], sigmas[i + 1]) * sigma_up
        _report(callback, i, x, denoised)
    return x


def sample_heun(model: Model, x: torch.Tensor, sigmas: torch.Tensor, noise: Noise | None = None,
                callback: Callback = None) -> torch.Tensor:
    """Heun's method (Karras et al. 2022, Algorithm 2 without churn); two model calls per step but the last."""
    for i in range(len(sigmas) - 1):
        denoised = model(x, _sigma_batch(sigmas[i], x))
        d = to_d(x, sigmas[i], denoised)
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = to_d(x_2, sigmas[i + 1], model(x_2, _sigma_batch(sigmas[i + 1], x)))
            x = x + (d + d_2) / 2 * dt
        _report(callback, i, x, denoised)
    return x


def sample_dpmpp_2m(model: Model, x: torch.Tensor, sigmas: torch.Tensor, noise: Noise | None = None,
                    callback: Callback = None) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022)."""
    old_denoised = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, _sigma_batch(sigmas[i], x))
        t, t_next = -sigmas[i].log(), -sigmas[i + 1].log()
        h = t_next - t
        if old_denoised is None or sigmas[i + 1] == 0:
            mixed = denoised
        else:
            r = (t - (-sigmas[i - 1].log())) / h
            mixed = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
        x = (sigmas[i + 1] / sigmas[i]) * x - (-h).expm1() * mixed
        old_denoised = denoised
        _report(callback, i, x, denoised)
    return x


def sample_dpmpp_2m_sde(model: Model, x: torch.Tensor, sigmas: torch.Tensor, noise: Noise,
                        callback: Callback = None, eta: float = 1.0) -> torch.Tensor:
    """DPM-Solver++(2M) SDE, midpoint variant (Lu et al. 2022)."""
    old_denoised, h_last = None, None
    for i in range(len(sigmas) - 1):
        denoised = model(x, _sigma_batch(sigmas[i], x))
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            h = sigmas[i].log() - sigmas[i + 1].log()
            eta_h = eta * h
            x = sigmas[i + 1] / sigmas[i] * (-eta_h).exp() * x + (-h - eta_h).expm1().neg() * denoised
            if old_denoised is not None:
                x = x + 0.5 * (-h - eta_h).expm1().neg() * (h_last / h) * (denoised - old_denoised)
            if eta:
                x = x + noise(sigmas[i], sigmas[i + 1]) * sigmas[i + 1] * (-2 * eta_h).expm1().neg().sqrt()
            h_last = h
        old_denoised = denoised
        _report(callback, i, x, denoised)
    return x


SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "euler": sample_euler,
    "euler_a": sample_euler_ancestral,
    "heun": sample_heun,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
}
