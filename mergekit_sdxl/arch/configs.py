"""Shipped diffusers/transformers configs (package data) for building models with no network.

Files live in `mergekit_sdxl/arch/configs/<arch>/<component>.json`, written from the published
`stabilityai/stable-diffusion-xl-base-1.0` and `runwayml/stable-diffusion-v1-5` config files.
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources

from mergekit_sdxl.arch.tables import check_arch
from mergekit_sdxl.errors import ArchError

COMPONENTS = {
    "sdxl": ("unet", "vae", "text_encoder", "text_encoder_2", "scheduler", "model_index"),
    "sd15": ("unet", "vae", "text_encoder", "scheduler", "model_index"),
}


def load_config(arch: str, component: str) -> dict:
    """The shipped config of `component` for `arch` as a new dict.

    Args:
        arch: `"sdxl"` or `"sd15"`.
        component: `unet`, `vae`, `text_encoder`, `text_encoder_2` (SDXL only), `scheduler` or `model_index`.

    Returns:
        The JSON object, including keys starting with `_` (`_class_name`, ...); callers building a diffusers
        model pass `{k: v for k, v in cfg.items() if not k.startswith("_")}`.
    """
    name = check_arch(arch)
    if component not in COMPONENTS[name]:
        raise ArchError(f"{name} has no component {component!r}; expected one of {', '.join(COMPONENTS[name])}")
    return json.loads(_read(name, component))


@cache
def _read(arch: str, component: str) -> str:
    folder = resources.files("mergekit_sdxl.arch").joinpath("configs").joinpath(arch)
    return folder.joinpath(f"{component}.json").read_text("utf-8")
