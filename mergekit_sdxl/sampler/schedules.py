"""The SD/SDXL discrete noise schedule and the sigma schedules samplers step through.

Conventions of k-diffusion (Katherine Crowson, MIT licence, https://github.com/crowsonkb/k-diffusion), which
AUTOMATIC1111 and ComfyUI use; re-implemented here on torch alone. `t <-> sigma` interpolates log-sigma
linearly between the 1000 training timesteps (not quantized, as in A1111).
"""

from __future__ import annotations

import math

import torch

from mergekit_sdxl.sampler.catalog import SCHEDULE_NAMES

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


def get_sigmas_normal(n: int, schedule: DiscreteSchedule, device: str = "cpu") -> torch.Tensor:
    """A1111 "Automatic"/k-diffusion `get_sigmas`: timesteps spaced evenly from 999 to 0."""
    t = torch.linspace(len(schedule.sigmas) - 1, 0, n)
    return append_zero(schedule.t_to_sigma(t)).to(device)


def get_sigmas_sgm_uniform(n: int, schedule: DiscreteSchedule, device: str = "cpu") -> torch.Tensor:
    """SGM uniform (A1111 "SGM Uniform", ComfyUI `sgm_uniform`): n of n+1 even timesteps from sigma_max."""
    start = schedule.sigma_to_t(torch.tensor(schedule.sigma_max))
    end = schedule.sigma_to_t(torch.tensor(schedule.sigma_min))
    t = torch.linspace(float(start), float(end), n + 1)[:-1]
    return append_zero(schedule.t_to_sigma(t)).to(device)


def get_sigmas_karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0,
                      device: str = "cpu") -> torch.Tensor:
    """Karras et al. (2022) schedule, rho = 7."""
    ramp = torch.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return append_zero((hi + ramp * (lo - hi)) ** rho).to(device)


def get_sigmas_exponential(n: int, sigma_min: float, sigma_max: float, device: str = "cpu") -> torch.Tensor:
    """Sigmas evenly spaced in log space."""
    return append_zero(torch.linspace(math.log(sigma_max), math.log(sigma_min), n).exp()).to(device)


SCHEDULES = tuple(SCHEDULE_NAMES)  # the names and their A1111/ComfyUI spellings live in catalog.py


def get_sigmas(name: str, n: int, schedule: DiscreteSchedule, device: str = "cpu") -> torch.Tensor:
    """Sigmas (n + 1 values ending in 0) of schedule `name` for an n-step run."""
    if n < 1:
        raise ValueError("steps must be at least 1")
    if name == "normal":
        return get_sigmas_normal(n, schedule, device)
    if name == "sgm_uniform":
        return get_sigmas_sgm_uniform(n, schedule, device)
    if name == "karras":
        return get_sigmas_karras(n, schedule.sigma_min, schedule.sigma_max, device=device)
    if name == "exponential":
        return get_sigmas_exponential(n, schedule.sigma_min, schedule.sigma_max, device=device)
    raise ValueError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
