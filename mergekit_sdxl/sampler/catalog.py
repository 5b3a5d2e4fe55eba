"""The names of every sampler and schedule, with how A1111 and ComfyUI spell them: torch-free, so the CLI's
choices and help, PNG `parameters` text and docs read one table without importing the sampler.

Adding a sampler: its function in `samplers.py` (`SAMPLERS`) plus one `SamplerName` row here; adding a schedule:
its sigma function in `schedules.py` (`get_sigmas`) plus one `ScheduleName` row. `tests/test_sampler_catalog.py`
checks that the rows and the implementations name the same set.

Each sampler row also carries the traits that decide how A1111 runs it (from its `sd_samplers_kdiffusion.py`):
`second_order` (A1111 counts prompt-editing steps over twice the steps), `brownian` (noise from a Brownian tree
seeded with the image seeds), `discard_penultimate` (one step more, then the next-to-last sigma dropped), and the
published source of its update rule. Sources: k-diffusion's `sampling.py` (Katherine Crowson, MIT), A1111's
`sd_samplers_kdiffusion.py` / `sd_schedulers.py`, ComfyUI's `comfy/samplers.py`, and the papers named.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TypeVar

from mergekit_sdxl.errors import UsageError

_Row = TypeVar("_Row")


@dataclass(frozen=True)
class SamplerName:
    """One sampler: our name (CLI, API), A1111's `Sampler:` value, ComfyUI's KSampler `sampler_name`, traits."""

    name: str
    a1111: str
    comfyui: str
    model_calls_per_step: int = 1  # denoiser evaluations per step (Heun: 2)
    stochastic: bool = False  # draws fresh noise every step (ancestral, SDE): the result depends on the noise RNG
    second_order: bool = False
    brownian: bool = False
    discard_penultimate: bool = False
    source: str = ""
    aliases: tuple[str, ...] = ()


@dataclass(frozen=True)
class ScheduleName:
    """One sigma schedule: our name, A1111's `Schedule type:` value, ComfyUI's KSampler `scheduler`, source."""

    name: str
    a1111: str
    comfyui: str
    source: str = ""
    aliases: tuple[str, ...] = ()


SAMPLER_NAMES: dict[str, SamplerName] = {s.name: s for s in (
    SamplerName("euler", "Euler", "euler", source="Karras et al. 2022, Algorithm 2 (no churn)"),
    SamplerName("euler_a", "Euler a", "euler_ancestral", stochastic=True, aliases=("euler_ancestral",),
                source="k-diffusion sample_euler_ancestral"),
    SamplerName("heun", "Heun", "heun", model_calls_per_step=2, second_order=True,
                source="Karras et al. 2022, Algorithm 2 (no churn)"),
    SamplerName("dpm_2", "DPM2", "dpm_2", model_calls_per_step=2, second_order=True, discard_penultimate=True,
                source="k-diffusion sample_dpm_2 (DPM-Solver-2, midpoint in log sigma)"),
    SamplerName("dpm_2_a", "DPM2 a", "dpm_2_ancestral", model_calls_per_step=2, stochastic=True, second_order=True,
                discard_penultimate=True, aliases=("dpm_2_ancestral",), source="k-diffusion sample_dpm_2_ancestral"),
    SamplerName("lms", "LMS", "lms", source="k-diffusion sample_lms (linear multistep in sigma, order 4)"),
    SamplerName("dpmpp_2s_a", "DPM++ 2S a", "dpmpp_2s_ancestral", model_calls_per_step=2, stochastic=True,
                second_order=True, aliases=("dpmpp_2s_ancestral",),
                source="Lu et al. 2022, DPM-Solver++(2S), k-diffusion ancestral form"),
    SamplerName("dpmpp_sde", "DPM++ SDE", "dpmpp_sde", model_calls_per_step=2, stochastic=True, second_order=True,
                brownian=True, source="k-diffusion sample_dpmpp_sde (stochastic DPM-Solver++, r = 1/2)"),
    SamplerName("dpmpp_2m", "DPM++ 2M", "dpmpp_2m", source="Lu et al. 2022, DPM-Solver++(2M)"),
    SamplerName("dpmpp_2m_sde", "DPM++ 2M SDE", "dpmpp_2m_sde", stochastic=True, brownian=True,
                source="Lu et al. 2022, SDE-DPM-Solver++(2M), midpoint"),
    SamplerName("dpmpp_2m_sde_heun", "DPM++ 2M SDE Heun", "dpmpp_2m_sde_heun", stochastic=True, brownian=True,
                source="Lu et al. 2022, SDE-DPM-Solver++(2M), Heun"),
    SamplerName("dpmpp_3m_sde", "DPM++ 3M SDE", "dpmpp_3m_sde", stochastic=True, brownian=True,
                discard_penultimate=True, source="k-diffusion sample_dpmpp_3m_sde"),
    SamplerName("ddim", "DDIM", "ddim", source="Song et al. 2021 (DDIM, eta 0) in k-diffusion's sigma form"),
    SamplerName("uni_pc", "UniPC", "uni_pc", discard_penultimate=True,
                source="Zhao et al. 2023 (UniPC, B(h) = h, order 3), as ComfyUI runs it"),
    SamplerName("uni_pc_bh2", "UniPC BH2", "uni_pc_bh2", discard_penultimate=True,
                source="Zhao et al. 2023 (UniPC, B(h) = e^h - 1, order 3), as ComfyUI runs it"),
    SamplerName("lcm", "LCM", "lcm", stochastic=True, source="Luo et al. 2023 (latent consistency, multistep)"),
)}
# A1111's "Uniform" is k-diffusion's `get_sigmas` of the discrete model (ComfyUI's "normal"); A1111's own "Normal"
# is a different rounding of the same idea and is not offered here.
SCHEDULE_NAMES: dict[str, ScheduleName] = {s.name: s for s in (
    ScheduleName("normal", "Uniform", "normal", "k-diffusion get_sigmas: timesteps evenly from 999 to 0",
                 aliases=("uniform",)),
    ScheduleName("karras", "Karras", "karras", "Karras et al. 2022, rho = 7"),
    ScheduleName("exponential", "Exponential", "exponential", "k-diffusion get_sigmas_exponential"),
    ScheduleName("sgm_uniform", "SGM Uniform", "sgm_uniform", "n of n + 1 even timesteps from sigma_max"),
    ScheduleName("polyexponential", "Polyexponential", "PolyexponentialScheduler",
                 "k-diffusion get_sigmas_polyexponential, rho = 1"),
    ScheduleName("simple", "Simple", "simple", "every (1000 / n)-th training sigma from the top"),
    ScheduleName("ddim", "DDIM", "ddim_uniform", "training sigmas at timesteps 1, 1 + k, ... (k = 1000 // n)",
                 aliases=("ddim_uniform",)),
    ScheduleName("kl_optimal", "KL Optimal", "kl_optimal",
                 "Sabour et al. 2024, A1111's form (n + 1 values ending at sigma_min)"),
    ScheduleName("align_your_steps", "Align Your Steps", "AlignYourStepsScheduler",
                 "NVIDIA's published SDXL / SD1.5 tables, log-linearly resampled as A1111"),
    ScheduleName("beta", "Beta", "beta", "Lee et al. 2024, A1111's form (alpha = beta = 0.6)"),
)}

RNG_MODES = ("cpu", "gpu", "nv")
RNG_LABELS = {"cpu": "CPU", "gpu": "GPU", "nv": "NV"}  # A1111 writes `RNG:` only when it is not GPU

_SAMPLER_ALIASES = {a: s.name for s in SAMPLER_NAMES.values() for a in s.aliases}
_SCHEDULE_ALIASES = {a: s.name for s in SCHEDULE_NAMES.values() for a in s.aliases}


def sampler_name(name: str) -> SamplerName:
    """The row of sampler `name` (or an alias); UsageError with the known names (and a close match) otherwise."""
    return _get(SAMPLER_NAMES, _SAMPLER_ALIASES.get(name, name), "sampler")


def schedule_name(name: str) -> ScheduleName:
    """The row of schedule `name` (or an alias); UsageError with the known names (and a close match) otherwise."""
    return _get(SCHEDULE_NAMES, _SCHEDULE_ALIASES.get(name, name), "schedule")


def _get(table: Mapping[str, _Row], name: str, what: str) -> _Row:
    if name in table:
        return table[name]
    close = difflib.get_close_matches(str(name), table, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise UsageError(f"unknown {what} {name!r}{hint} (known: {', '.join(table)})")
