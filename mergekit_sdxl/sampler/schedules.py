"""The SD/SDXL discrete noise schedule and the sigma schedules samplers step through.

Conventions of k-diffusion (Katherine Crowson, MIT licence, https://github.com/crowsonkb/k-diffusion), which
AUTOMATIC1111 and ComfyUI use; re-implemented here on torch alone. `t <-> sigma` interpolates log-sigma
linearly between the 1000 training timesteps (not quantized, as in A1111).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from mergekit_sdxl.arch.registry import DEFAULT_ARCH, arch_spec
from mergekit_sdxl.sampler.catalog import schedule_name

BETA_START, BETA_END, TRAIN_STEPS = 0.00085, 0.012, 1000
ZTSNR_LAST_ALPHA_BAR = 4.8973451890853435e-08  # A1111 and ComfyUI: keeps the last sigma finite (~4500)


def alphas_cumprod(ztsnr: bool = False) -> torch.Tensor:
    """`scaled_linear` betas 0.00085 -> 0.012 over 1000 steps (computed in float64, as ldm does)."""
    betas = torch.linspace(BETA_START**0.5, BETA_END**0.5, TRAIN_STEPS, dtype=torch.float64) ** 2
    abar = torch.cumprod(1.0 - betas, dim=0)
    return rescale_zero_terminal_snr(abar) if ztsnr else abar


def rescale_zero_terminal_snr(abar: torch.Tensor) -> torch.Tensor:
    """Zero terminal SNR (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed")."""
    root = abar.sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * (first / (first - last))
    out = root**2
    out[-1] = ZTSNR_LAST_ALPHA_BAR
    return out


class DiscreteSchedule:
    """The model's 1000 training sigmas and the `t <-> sigma` maps between them."""

    def __init__(self, ztsnr: bool = False) -> None:
        abar = alphas_cumprod(ztsnr).float()  # a float32 buffer in ldm/sgm, so sigma_min is 0.0291675 there too
        self.sigmas = ((1 - abar) / abar).sqrt()
        self.log_sigmas = self.sigmas.log()
        self._on_device: dict[torch.device, torch.Tensor] = {}

    def _log_sigmas(self, device: torch.device) -> torch.Tensor:
        if device not in self._on_device:  # once per device, not once per step
            self._on_device[device] = self.log_sigmas.to(device)
        return self._on_device[device]

    @property
    def sigma_min(self) -> float:
        """Smallest training sigma (0.0291675 for SD/SDXL)."""
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        """Largest training sigma (14.614642 for SD/SDXL)."""
        return float(self.sigmas[-1])

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """Fractional timestep whose log-sigma interpolates to `sigma`."""
        log_sigmas = self._log_sigmas(sigma.device)
        log_sigma = sigma.float().log()
        dists = log_sigma - log_sigmas[:, None]
        low = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=log_sigmas.shape[0] - 2)
        lo, hi = log_sigmas[low], log_sigmas[low + 1]
        w = ((lo - log_sigma) / (lo - hi)).clamp(0, 1)
        return ((1 - w) * low + w * (low + 1)).view(sigma.shape)

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        """Sigma at fractional timestep `t` (log-linear interpolation)."""
        t = t.float()
        log_sigmas = self._log_sigmas(t.device)
        low, high, w = t.floor().long(), t.ceil().long(), t.frac()
        return ((1 - w) * log_sigmas[low] + w * log_sigmas[high]).exp()


def append_zero(x: torch.Tensor) -> torch.Tensor:
    """`x` followed by a final 0 (the end of sampling)."""
    return torch.cat([x, x.new_zeros([1])])


def get_sigmas_normal(n: int, schedule: DiscreteSchedule, device: str | torch.device = "cpu") -> torch.Tensor:
    """A1111 "Automatic"/k-diffusion `get_sigmas`: timesteps spaced evenly from 999 to 0."""
    t = torch.linspace(len(schedule.sigmas) - 1, 0, n)
    return append_zero(schedule.t_to_sigma(t)).to(device)


def get_sigmas_sgm_uniform(n: int, schedule: DiscreteSchedule, device: str | torch.device = "cpu") -> torch.Tensor:
    """SGM uniform (A1111 "SGM Uniform", ComfyUI `sgm_uniform`): n of n+1 even timesteps from sigma_max."""
    start = schedule.sigma_to_t(torch.tensor(schedule.sigma_max))
    end = schedule.sigma_to_t(torch.tensor(schedule.sigma_min))
    t = torch.linspace(float(start), float(end), n + 1)[:-1]
    return append_zero(schedule.t_to_sigma(t)).to(device)


def get_sigmas_karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0,
                      device: str | torch.device = "cpu") -> torch.Tensor:
    """Karras et al. (2022) schedule, rho = 7."""
    ramp = torch.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return append_zero((hi + ramp * (lo - hi)) ** rho).to(device)


def get_sigmas_exponential(n: int, sigma_min: float, sigma_max: float,
                           device: str | torch.device = "cpu") -> torch.Tensor:
    """Sigmas evenly spaced in log space."""
    return append_zero(torch.linspace(math.log(sigma_max), math.log(sigma_min), n).exp()).to(device)


def get_sigmas_polyexponential(n: int, sigma_min: float, sigma_max: float, rho: float = 1.0,
                               device: str | torch.device = "cpu") -> torch.Tensor:
    """log sigma a polynomial (degree rho) of the step; rho = 1 is the exponential schedule."""
    ramp = torch.linspace(1, 0, n) ** rho
    return append_zero(torch.exp(ramp * (math.log(sigma_max) - math.log(sigma_min)) + math.log(sigma_min))).to(device)


def get_sigmas_simple(n: int, schedule: DiscreteSchedule, device: str | torch.device = "cpu") -> torch.Tensor:
    """Every (1000 / n)-th training sigma counted from the top (A1111 "Simple", ComfyUI `simple`)."""
    stride = len(schedule.sigmas) / n
    picked = [float(schedule.sigmas[-(1 + int(k * stride))]) for k in range(n)]
    return torch.tensor([*picked, 0.0], dtype=torch.float32, device=device)


def get_sigmas_ddim(n: int, schedule: DiscreteSchedule, device: str | torch.device = "cpu") -> torch.Tensor:
    """Training sigmas at timesteps 1, 1 + k, 1 + 2k, ... (k = 1000 // n), highest first, then 0.

    As A1111's "DDIM" schedule (ComfyUI `ddim_uniform`): when k does not divide 999 evenly this gives more than
    n steps (28 steps -> 29), and A1111 samples them all.
    """
    stride = max(len(schedule.sigmas) // n, 1)
    picked = [float(schedule.sigmas[t]) for t in range(1, len(schedule.sigmas), stride)]
    return torch.tensor([*picked[::-1], 0.0], dtype=torch.float32, device=device)


def get_sigmas_kl_optimal(n: int, sigma_min: float, sigma_max: float,
                          device: str | torch.device = "cpu") -> torch.Tensor:
    """KL-optimal schedule (Sabour et al. 2024): even in arctan(sigma). A1111's form: n + 1 values from sigma_max
    down to sigma_min, with no final 0, so sampling stops at sigma_min."""
    a_min, a_max = torch.arctan(torch.tensor(sigma_min)), torch.arctan(torch.tensor(sigma_max))
    k = torch.arange(n + 1)
    return torch.tan(k / n * a_min + (1.0 - k / n) * a_max).to(device)


def get_sigmas_align_your_steps(n: int, arch: str, device: str | torch.device = "cpu") -> torch.Tensor:
    """Align Your Steps (Sabour et al. 2024): the published table for `arch`, log-linearly resampled to n sigmas
    (used as is for n = 11), then 0, as A1111 does."""
    table = np.array(arch_spec(arch).sampler.ays_sigmas, dtype=np.float64)  # NVIDIA's 10-step table, 11 sigmas
    if n == len(table):
        values = table
    else:
        log_increasing = np.log(table[::-1])
        values = np.exp(np.interp(np.linspace(0, 1, n), np.linspace(0, 1, len(table)), log_increasing))[::-1]
    return torch.tensor([*values.tolist(), 0.0], dtype=torch.float32, device=device)


BETA_ALPHA, BETA_BETA = 0.6, 0.6  # A1111's defaults (`beta_dist_alpha`, `beta_dist_beta`)


def get_sigmas_beta(n: int, sigma_min: float, sigma_max: float, device: str | torch.device = "cpu") -> torch.Tensor:
    """Beta schedule (Lee et al. 2024), A1111's form: sigma_min + ppf(u) (sigma_max - sigma_min) for u from 1
    down to 0 with the Beta(0.6, 0.6) quantile function, then 0. (ComfyUI's `beta` picks training sigmas at
    those quantiles instead.)"""
    from scipy import stats

    quantiles = [float(stats.beta.ppf(u, BETA_ALPHA, BETA_BETA)) for u in 1 - np.linspace(0, 1, n)]
    return torch.tensor([*(sigma_min + q * (sigma_max - sigma_min) for q in quantiles), 0.0],
                        dtype=torch.float32, device=device)


def get_sigmas(name: str, n: int, schedule: DiscreteSchedule, device: str | torch.device = "cpu",
               arch: str = DEFAULT_ARCH,
               discard_penultimate: bool = False) -> torch.Tensor:
    """Sigmas of schedule `name` (or an alias) for an n-step run, as A1111 computes them.

    `discard_penultimate` (A1111's DPM2 / DPM2 a / DPM++ 3M SDE): ask for n + 1 steps and drop the next-to-last
    sigma. Most schedules give n + 1 values ending in 0; `kl_optimal` ends at sigma_min, `ddim` may give more.
    """
    if n < 1:
        raise ValueError("steps must be at least 1")
    canonical = schedule_name(name).name
    steps = n + 1 if discard_penultimate else n
    lo, hi = schedule.sigma_min, schedule.sigma_max
    builders = {
        "normal": lambda: get_sigmas_normal(steps, schedule),
        "sgm_uniform": lambda: get_sigmas_sgm_uniform(steps, schedule),
        "karras": lambda: get_sigmas_karras(steps, lo, hi),
        "exponential": lambda: get_sigmas_exponential(steps, lo, hi),
        "polyexponential": lambda: get_sigmas_polyexponential(steps, lo, hi),
        "simple": lambda: get_sigmas_simple(steps, schedule),
        "ddim": lambda: get_sigmas_ddim(steps, schedule),
        "kl_optimal": lambda: get_sigmas_kl_optimal(steps, lo, hi),
        "align_your_steps": lambda: get_sigmas_align_your_steps(steps, arch),
        "beta": lambda: get_sigmas_beta(steps, lo, hi),
    }
    sigmas = builders[canonical]()
    if discard_penultimate:
        sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])
    return sigmas.to(device)
