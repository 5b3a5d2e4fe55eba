"""DPM-Solver++ samplers (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
Probabilistic Models") in k-diffusion's form and control flow (see `samplers.py`).

Time is t = -log(sigma) (lambda in the paper, for the scaled latent x / sqrt(alpha_bar)); h = t_next - t.
The multistep SDE samplers take their noise from a Brownian tree so that results do not depend on the step count
in distribution only but match A1111/ComfyUI for the same seeds.
"""

from __future__ import annotations

import torch

from mergekit_sdxl.sampler.kdiff import (
    Callback,
    Model,
    Noise,
    get_ancestral_step,
    report,
    sigma_batch,
    to_d,
)


def _t(sigma: torch.Tensor) -> torch.Tensor:
    return sigma.log().neg()


def _sigma(t: torch.Tensor) -> torch.Tensor:
    return t.neg().exp()


def sample_dpmpp_2s_a(model: Model, x: torch.Tensor, sigmas: torch.Tensor, noise: Noise,
                      callback: Callback = None, eta: float = 1.0) -> torch.Tensor:
    """DPM++ 2S a: a single-step DPM-Solver++(2S) step (midpoint r = 1/2) down to sigma_down, then fresh noise."""
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigma_batch(sigmas[i], x))
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta)
        if sigma_down == 0:
            x = x + to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        else:
            t, t_next = _t(sigmas[i]), _t(sigma_down)
            h = t_next - t
            s = t + 0.5 * h
            x_2 = (_sigma(s) / _sigma(t)) * x - (-0.5 * h).expm1() * denoised
            denoised_2 = model(x_2, sigma_batch(_sigma(s), x))
            x = (_sigma(t_next) / _sigma(t)) * x - (-h).expm1() * denoised_2
        if sigmas[i + 1] > 0:
            x = x + noise(sigmas[i], sigmas[i + 1]) * sigma_up
        report(callback, i, x, denoised)
    return x


def sample_dpmpp_sde(model: Model, x: torch.Tensor, sigmas: torch.Tensor, noise: Noise,
                     callback: Callback = None, eta: float = 1.0, r: float = 0.5) -> torch.Tensor:
    """DPM++ SDE: stochastic DPM-Solver++ with an intermediate point at t + r h; two ancestral sub-steps."""
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigma_batch(sigmas[i], x))
        if sigmas[i + 1] == 0:
            x = x + to_d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
        else:
            t, t_next = _t(sigmas[i]), _t(sigmas[i + 1])
            h = t_next - t
            s = t + h * r
            fac = 1 / (2 * r)
            sd, su = get_ancestral_step(_sigma(t), _sigma(s), eta)
            s_ = _t(sd)
            x_2 = (_sigma(s_) / _sigma(t)) * x - (t - s_).expm1() * denoised
            x_2 = x_2 + noise(_sigma(t), _sigma(s)) * su
            denoised_2 = model(x_2, sigma_batch(_sigma(s), x))
            sd, su = get_ancestral_step(_sigma(t), _sigma(t_next), eta)
            t_next_ = _t(sd)
            denoised_d = (1 - fac) * denoised + fac * denoised_2
            x = (_sigma(t_next_) / _sigma(t)) * x - (t - t_next_).expm1() * denoised_d
            x = x + noise(_sigma(t), _sigma(t_next)) * su
        report(callback, i, x, denoised)
    return x


def sample_dpmpp_2m(model: Model, x: torch.Tensor, sigmas: torch.Tensor, noise: Noise | None = None,
                    callback: Callback = None) -> torch.Tensor:
    """DPM-Solver++(2M): second-order multistep with the previous prediction; first-order first and last step."""
    old_denoised = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigma_batch(sigmas[i], x))
        t, t_next = _t(sigmas[i]), _t(sigmas[i + 1])
        h = t_next - t
        if old_denoised is None or sigmas[i + 1] == 0:
            mixed = denoised
        else:
            r = (t - _t(sigmas[i - 1])) / h  # h_last / h
            mixed = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
        x = (_sigma(t_next) / _sigma(t)) * x - (-h).expm1() * mixed
        old_denoised = denoised
        report(callback, i, x, denoised)
    return x


def sample_dpmpp_2m_sde(model: Model, x: torch.Tensor, sigmas: torch.Tensor, noise: Noise,
                        callback: Callback = None, eta: float = 1.0, solver_type: str = "midpoint",
                        ) -> torch.Tensor:
    """DPM-Solver++(2M) SDE; `solver_type` "midpoint" (A1111 "DPM++ 2M SDE") or "heun" ("... SDE Heun").

    The second-order correction scales the change of prediction by 1 / r = h / h_last (the step ratio).
    """
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"solver_type must be 'midpoint' or 'heun', not {solver_type!r}")
    old_denoised: torch.Tensor | None = None
    h_last: torch.Tensor | None = None
    h: torch.Tensor | None = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigma_batch(sigmas[i], x))
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            h = sigmas[i].log() - sigmas[i + 1].log()
            eta_h = eta * h
            phi_1 = (-h - eta_h).expm1().neg()
            x = sigmas[i + 1] / sigmas[i] * (-eta_h).exp() * x + phi_1 * denoised
            if old_denoised is not None and h_last is not None:  # both come from the previous step
                ratio = h / h_last  # 1 / r
                if solver_type == "heun":
                    x = x + (phi_1 / (-h - eta_h) + 1) * ratio * (denoised - old_denoised)
                else:
                    x = x + 0.5 * phi_1 * ratio * (denoised - old_denoised)
            if eta:
                x = x + noise(sigmas[i], sigmas[i + 1]) * sigmas[i + 1] * (-2 * eta_h).expm1().neg().sqrt()
        old_denoised, h_last = denoised, h
        report(callback, i, x, denoised)
    return x


def sample_dpmpp_2m_sde_heun(model: Model, x: torch.Tensor, sigmas: torch.Tensor, noise: Noise,
                             callback: Callback = None, eta: float = 1.0) -> torch.Tensor:
    """DPM++ 2M SDE with the Heun form of the second-order term."""
    return sample_dpmpp_2m_sde(model, x, sigmas, noise, callback, eta, solver_type="heun")


def sample_dpmpp_3m_sde(model: Model, x: torch.Tensor, sigmas: torch.Tensor, noise: Noise,
                        callback: Callback = None, eta: float = 1.0) -> torch.Tensor:
    """DPM-Solver++(3M) SDE: third-order multistep from the two previous predictions and step sizes."""
    denoised_1: torch.Tensor | None = None
    denoised_2: torch.Tensor | None = None
    h_1: torch.Tensor | None = None
    h_2: torch.Tensor | None = None
    h: torch.Tensor | None = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigma_batch(sigmas[i], x))
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            h = sigmas[i].log() - sigmas[i + 1].log()
            h_eta = h * (eta + 1)
            x = torch.exp(-h_eta) * x + (-h_eta).expm1().neg() * denoised
            phi_2 = h_eta.neg().expm1() / h_eta + 1
            if h_2 is not None and h_1 is not None and denoised_1 is not None and denoised_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (denoised - denoised_1) / r0
                d1_1 = (denoised_1 - denoised_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_3 = phi_2 / h_eta - 0.5
                x = x + phi_2 * d1 - phi_3 * d2
            elif h_1 is not None and denoised_1 is not None:
                x = x + phi_2 * ((denoised - denoised_1) / (h_1 / h))
            if eta:
                x = x + noise(sigmas[i], sigmas[i + 1]) * sigmas[i + 1] * (-2 * h * eta).expm1().neg().sqrt()
        denoised_1, denoised_2 = denoised, denoised_1
        h_1, h_2 = h, h_1
        report(callback, i, x, denoised)
    return x
