"""Key -> (component, part): the rows and columns of a block-diff heatmap (torch-free).

- UNet: its MBW block (`arch.blocks.block_of` under a convention; keys no block covers are `other`);
- CLIP-L / CLIP-G: `emb` (token and position embeddings), `L00`.. (one per transformer layer), `final` (final
  norm, projection);
- VAE: `enc.in`, `enc.down0`.., `enc.mid`, `enc.out`, `quant`, `dec.in`, `dec.mid`, `dec.up0`.., `dec.out`;
- anything else: component `other`, part `other`.
"""

from __future__ import annotations

import re

from mergekit_sdxl.arch.blocks import DEFAULT_CONVENTION, block_names, block_of
from mergekit_sdxl.arch.detect import component_of

COMPONENT_TITLES = {"unet": "UNet", "clip_l": "CLIP-L", "clip_g": "CLIP-G", "vae": "VAE", "ema": "EMA",
                    "other": "other"}
_CLIP_LAYER = re.compile(r"\.encoder\.layers\.(\d+)\.|\.transformer\.resblocks\.(\d+)\.")
_CLIP_EMB = ("embeddings.", "token_embedding", "positional_embedding")
_VAE = re.compile(r"^first_stage_model\.(encoder|decoder)\.(down|up|mid)(?:\.(\d+))?")
_VAE_LEVELS = 4


def part_of(key: str, arch: str, convention: str = DEFAULT_CONVENTION) -> tuple[str, str]:
    """(component, part) of a checkpoint key; see the module docstring."""
    component = component_of(key, arch)
    if component == "unet":
        return component, block_of(key, arch, convention) or "other"
    if component in ("clip_l", "clip_g"):
        match = _CLIP_LAYER.search(key)
        if match:
            return component, f"L{int(match.group(1) or match.group(2)):02d}"
        return component, "emb" if any(e in key for e in _CLIP_EMB) else "final"
    if component == "vae":
        return component, _vae_part(key)
    return component, "other"


def _vae_part(key: str) -> str:
    match = _VAE.match(key)
    if match:
        side, where, level = match.groups()
        return f"{side[:3]}.{where}{level or ''}"
    if "quant_conv" in key:
        return "quant"
    side = "enc" if ".encoder." in key else "dec"
    return f"{side}.in" if "conv_in" in key else f"{side}.out"


def part_order(component: str, arch: str, convention: str = DEFAULT_CONVENTION) -> list[str]:
    """The parts of a component in display order (parts a file lacks are simply absent from its rows)."""
    if component == "unet":
        return [*block_names(arch, convention), "other"]
    if component in ("clip_l", "clip_g"):
        return ["emb", *(f"L{i:02d}" for i in range(48)), "final"]
    if component == "vae":
        return ["enc.in", *(f"enc.down{i}" for i in range(_VAE_LEVELS)), "enc.mid", "enc.out", "quant", "dec.in",
                "dec.mid", *(f"dec.up{i}" for i in range(_VAE_LEVELS)), "dec.out"]
    return ["other"]
