"""The names of every sampler and schedule, with how A1111 and ComfyUI spell them: torch-free, so the CLI's
choices and help, PNG `parameters` text and docs read one table without importing the sampler.

Adding a sampler: its function in `samplers.py` (`SAMPLERS`) plus one `SamplerName` row here; adding a schedule:
its sigma function in `schedules.py` (`get_sigmas`) plus one `ScheduleName` row. `tests/test_sampler_catalog.py`
checks that the rows and the implementations name the same set.
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
    """One sampler: our name (CLI, API), A1111's `Sampler:` value, ComfyUI's KSampler `sampler_name`."""

    name: str
    a1111: str
    comfyui: str
    model_calls_per_step: int = 1  # denoiser evaluations per step (Heun: 2)
    stochastic: bool = False  # draws fresh noise every step (ancestral, SDE): the result depends on the noise RNG


@dataclass(frozen=True)
class ScheduleName:
    """One sigma schedule: our name, A1111's `Schedule type:` value, ComfyUI's KSampler `scheduler`."""

    name: str
    a1111: str
    comfyui: str


SAMPLER_NAMES: dict[str, SamplerName] = {s.name: s for s in (
    SamplerName("euler", "Euler", "euler"),
    SamplerName("euler_a", "Euler a", "euler_ancestral", stochastic=True),
    SamplerName("heun", "Heun", "heun", model_calls_per_step=2),
    SamplerName("dpmpp_2m", "DPM++ 2M", "dpmpp_2m"),
    SamplerName("dpmpp_2m_sde", "DPM++ 2M SDE", "dpmpp_2m_sde", stochastic=True),
)}
# A1111's "Uniform" is k-diffusion's `get_sigmas` of the discrete model (ComfyUI's "normal"); A1111's own "Normal"
# is a different rounding of the same idea and is not offered here.
SCHEDULE_NAMES: dict[str, ScheduleName] = {s.name: s for s in (
    ScheduleName("normal", "Uniform", "normal"),
    ScheduleName("karras", "Karras", "karras"),
    ScheduleName("exponential", "Exponential", "exponential"),
    ScheduleName("sgm_uniform", "SGM Uniform", "sgm_uniform"),
)}


def sampler_name(name: str) -> SamplerName:
    """The row of sampler `name`; UsageError with the known names (and a close match) otherwise."""
    return _get(SAMPLER_NAMES, name, "sampler")


def schedule_name(name: str) -> ScheduleName:
    """The row of schedule `name`; UsageError with the known names (and a close match) otherwise."""
    return _get(SCHEDULE_NAMES, name, "schedule")


def _get(table: Mapping[str, _Row], name: str, what: str) -> _Row:
    if name in table:
        return table[name]
    close = difflib.get_close_matches(str(name), table, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise UsageError(f"unknown {what} {name!r}{hint} (known: {', '.join(table)})")
