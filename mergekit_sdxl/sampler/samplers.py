"""Samplers in k-diffusion form: `sample_<name>(model, x, sigmas, noise, callback)`.

Re-implemented on torch alone after the update rules k-diffusion's `sampling.py` publishes (Katherine Crowson,
MIT licence, https://github.com/crowsonkb/k-diffusion), the code AUTOMATIC1111 and ComfyUI run; the same control
flow, so noise is drawn in the same order. `model(x, sigma)` returns the denoised prediction; `noise(sigma,
sigma_next)` returns fresh noise shaped like `x` (per-image generators, or a Brownian tree for SDE samplers).
`callback(i, x, denoised)` is called once per step with the state after the step.

This module holds the Euler/Heun family, LMS, DDIM and LCM; `samplers_dpmpp.py` the DPM-Solver++ family,
`unipc.py` UniPC; `SAMPLERS` maps every name of `catalog.SAMPLER_NAMES` to its function.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from mergekit_sdxl.sampler import samplers_dpmpp as dpmpp
from mergekit_sdxl.sampler import unipc
from mergekit_sdxl.sampler.kdiff import (  # noqa: F401 - re-exported: the helpers samplers are written with
    Callback,
    Model,
    Noise,
    get_ancestral_step,
    report,
    sigma_batch,
    to_d,
)


def sample_euler(model: Model, x: torch.Tensor, sigmas: torch.Tensor, noise: Noise | None = None,
                 callback: Callback = None) -> torch.Tensor:
    """Euler method (Karras et al. 2022, Algorithm 2 without churn)."""
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigma_batch(sigmas[i], x))
        x = x + to_d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
        report(callback, i, x, denoised)
    return x


def sample_euler_a(model: Model, x: torch.Tensor, sigmas: torch.Tensor, noise: Noise,
                   callback: Callback = None, eta: float = 1.0) -> torch.Tensor:
    """Ancestral Euler ("Euler a"): an Euler step down to sigma_down, then fresh noise up to sigma_next."""
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigma_batch(sigmas[i], x))
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta)
        x = x + to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        if sigmas[i + 1] > 0:
            x = x + noise(sigmas[i], sigmas[i + 1]) * sigma_up
        report(callback, i, x, denoised)
    return x


def sample_heun(model: Model, x: torch.Tensor, sigmas: torch.Tensor, noise: Noise | None = None,
                callback: Callback = None) -> torch.Tensor:
    """Heun's method (Karras et al. 2022, Algorithm 2 without churn); two model calls per step but the last."""
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigma_batch(sigmas[i], x))
        d = to_d(x, sigmas[i], denoised)
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = to_d(x_2, sigmas[i + 1], model(x_2, sigma_batch(sigmas[i + 1], x)))
            x = x + (d + d_2) / 2 * dt
        report(callback, i, x, denoised)
    return x


def _dpm_2_step(model: Model, x: torch.Tensor, d: torch.Tensor, sigma: torch.Tensor,
                sigma_to: torch.Tensor) -> torch.Tensor:
    """DPM-Solver-2 from sigma to sigma_to: the slope at the log-midpoint, applied over the whole step."""
    sigma_mid = sigma.log().lerp(sigma_to.log(), 0.5).exp()
    x_2 = x + d * (sigma_mid - sigma)
    d_2 = to_d(x_2, sigma_mid, model(x_2, sigma_batch(sigma_mid, x)))
    return x + d_2 * (sigma_to - sigma)


def sample_dpm_2(model: Model, x: torch.Tensor, sigmas: torch.Tensor, noise: Noise | None = None,
                 callback: Callback = None) -> torch.Tensor:
    """DPM2: k-diffusion's DPM-Solver-2 sampler (midpoint in log sigma); Euler for the last step."""
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigma_batch(sigmas[i], x))
        d = to_d(x, sigmas[i], denoised)
        if sigmas[i + 1] == 0:
            x = x + d * (sigmas[i + 1] - sigmas[i])
        else:
            x = _dpm_2_step(model, x, d, sigmas[i], sigmas[i + 1])
        report(callback, i, x, denoised)
    return x


def sample_dpm_2_a(model: Model, x: torch.Tensor, sigmas: torch.Tensor, noise: Noise,
                   callback: Callback = None, eta: float = 1.0) -> torch.Tensor:
    """DPM2 a: a DPM-Solver-2 step down to sigma_down, then fresh noise (not after an Euler last step)."""
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigma_batch(sigmas[i], x))
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta)
        d = to_d(x, sigmas[i], denoised)
        if sigma_down == 0:
            x = x + d * (sigma_down - sigmas[i])
        else:
            x = _dpm_2_step(model, x, d, sigmas[i], sigma_down)
            x = x + noise(sigmas[i], sigmas[i + 1]) * sigma_up
        report(callback, i, x, denoised)
    return x


def lms_coefficient(order: int, t: list[float], i: int, j: int) -> float:
    """Integral over [t[i], t[i+1]] of the Lagrange basis polynomial of node t[i-j] among t[i], ..., t[i-order+1].

    Exact (polynomial integration in float64); k-diffusion evaluates the same integral by quadrature.
    """
    others = [t[i - k] for k in range(order) if k != j]
    scale = math.prod(t[i - j] - o for o in others)
    coefficients = [1.0]  # of prod(tau - o), highest power first
    for o in others:
        coefficients = [c - o * p for c, p in zip([*coefficients, 0.0], [0.0, *coefficients])]
    degree = len(coefficients) - 1

    def antiderivative(tau: float) -> float:
        return sum(c * tau ** (degree - n + 1) / (degree - n + 1) for n, c in enumerate(coefficients))

    return (antiderivative(t[i + 1]) - antiderivative(t[i])) / scale


def sample_lms(model: Model, x: torch.Tensor, sigmas: torch.Tensor, noise: Noise | None = None,
               callback: Callback = None, order: int = 4) -> torch.Tensor:
    """Linear multistep in sigma (k-diffusion sample_lms): up to `order` past derivatives."""
    nodes = [float(s) for s in sigmas.double().cpu()]
    ds: list[torch.Tensor] = []
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigma_batch(sigmas[i], x))
        ds.append(to_d(x, sigmas[i], denoised))
        if len(ds) > order:
            ds.pop(0)
        cur_order = min(i + 1, order)
        coeffs = [lms_coefficient(cur_order, nodes, i, j) for j in range(cur_order)]
        x = x + sum(c * d for c, d in zip(coeffs, reversed(ds)))
        report(callback, i, x, denoised)
    return x


def sample_ddim(model: Model, x: torch.Tensor, sigmas: torch.Tensor, noise: Noise | None = None,
                callback: Callback = None) -> torch.Tensor:
    """DDIM with eta = 0 (Song et al. 2021) on the scaled latent x / sqrt(alpha_bar).

    With alpha_bar = 1 / (1 + sigma^2), DDIM's update x_next = sqrt(a_next) x0 + sqrt(1 - a_next) eps becomes
    x_next = denoised + sigma_next * (x - denoised) / sigma, which is the Euler step (as ComfyUI runs it).
    """
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigma_batch(sigmas[i], x))
        eps = (x - denoised) / sigmas[i]
        x = denoised + eps * sigmas[i + 1]
        report(callback, i, x, denoised)
    return x


def sample_lcm(model: Model, x: torch.Tensor, sigmas: torch.Tensor, noise: Noise,
               callback: Callback = None) -> torch.Tensor:
    """Latent consistency sampling: jump to the prediction, then re-noise to the next sigma with fresh noise."""
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigma_batch(sigmas[i], x))
        x = denoised
        if sigmas[i + 1] > 0:
            x = x + sigmas[i + 1] * noise(sigmas[i], sigmas[i + 1])
        report(callback, i, x, denoised)
    return x


SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "euler": sample_euler, "euler_a": sample_euler_a, "heun": sample_heun, "dpm_2": sample_dpm_2,
    "dpm_2_a": sample_dpm_2_a, "lms": sample_lms, "ddim": sample_ddim, "lcm": sample_lcm,
    "dpmpp_2s_a": dpmpp.sample_dpmpp_2s_a, "dpmpp_sde": dpmpp.sample_dpmpp_sde,
    "dpmpp_2m": dpmpp.sample_dpmpp_2m, "dpmpp_2m_sde": dpmpp.sample_dpmpp_2m_sde,
    "dpmpp_2m_sde_heun": dpmpp.sample_dpmpp_2m_sde_heun, "dpmpp_3m_sde": dpmpp.sample_dpmpp_3m_sde,
    "uni_pc": unipc.sample_uni_pc, "uni_pc_bh2": unipc.sample_uni_pc_bh2,
}


def sampler_function(name: str) -> Callable[..., torch.Tensor]:
    """The sampling function of sampler `name` (a canonical name of `catalog.SAMPLER_NAMES`)."""
    return SAMPLERS[name]
