"""Shipped diffusers/transformers configs (package data) for building models with no network.

Files live in `mergekit_sdxl/arch/configs/<ArchSpec.data>/<component>.json`, written from the published
`stabilityai/stable-diffusion-xl-base-1.0` and `runwayml/stable-diffusion-v1-5` config files.
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources

from mergekit_sdxl.arch.registry import SPECS, ZTSNR_SCHEDULER_ARCH, arch_spec
from mergekit_sdxl.errors import ArchError

COMPONENTS = {spec.id: spec.configs for spec in SPECS.values()}


def load_config(arch: str, component: str) -> dict:
    """The shipped config of `component` for `arch` as a new dict.

    Args:
        arch: an architecture id (arch/registry.py).
        component: one of the spec's `configs`: `unet`, `vae`, `text_encoder`, `text_encoder_2` (SDXL only),
            `scheduler` or `model_index`.

    Returns:
        The JSON object, including keys starting with `_` (`_class_name`, ...); callers building a diffusers
        model pass `{k: v for k, v in cfg.items() if not k.startswith("_")}`.
    """
    spec = arch_spec(arch)
    if component not in spec.configs:
        raise ArchError(f"{spec.id} has no component {component!r}; expected one of {', '.join(spec.configs)}")
    return json.loads(_read(spec.data, component))


def ztsnr_scheduler_config() -> dict:
    """The scheduler config a zero-terminal-SNR checkpoint starts from, whatever its architecture."""
    return load_config(ZTSNR_SCHEDULER_ARCH, "scheduler")


@cache
def _read(data: str, component: str) -> str:
    folder = resources.files("mergekit_sdxl.arch").joinpath("configs").joinpath(data)
    return folder.joinpath(f"{component}.json").read_text("utf-8")
