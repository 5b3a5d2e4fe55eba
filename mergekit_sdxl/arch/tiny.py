"""Tiny-but-consistent shapes for synthetic test checkpoints (torch-free).

A tiny model keeps every key, the depth, kernel sizes, latent channels, the 49,408-token vocabulary and the 77
positions of the real one (so the real tokenizer works), and shrinks every width with one map per component:

- UNet (SDXL and SD1.5): multiples of 320 are divided by 20 (320/640/1280 -> 16/32/64, 960 -> 48, 1920 -> 96,
  2560 -> 128, 5120 -> 256, 10240 -> 512); the cross-attention context is the sum of the tiny text-encoder widths
  (SDXL 2048 -> 96 = 32 + 64, SD1.5 768 -> 32); SDXL's ADM input 2816 -> 112 (pooled 64 + 6 x 8, i.e.
  ``addition_time_embed_dim`` 8).
- CLIP-L (te1): 768 -> 32, 3072 -> 128.  OpenCLIP-bigG (te2): 1280 -> 64, 3840 -> 192, 5120 -> 256.  The two
  widths differ on purpose: diffusers' single-file loader tells the encoders apart by width.
- VAE: 128/256/512 -> 16/32/64.
- GroupNorm groups: ``norm_groups(first_channels)`` = min(32, first_channels // 2) (32 for real models, 8 here).
- Attention heads: tiny SDXL keeps SDXL's rule "heads = channels / head_dim" with head_dim 8 (2/4/8 heads);
  tiny SD1.5 keeps SD1.5's rule "fixed head count" with 2 heads; te1 4 heads, te2 8 heads (head_dim 8).

A real dimension that a map does not know raises `ArchError` (never a guess).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping

from mergekit_sdxl.arch.registry import SPECS, arch_spec
from mergekit_sdxl.arch.tables import KeyInfo, check_arch, key_table
from mergekit_sdxl.errors import ArchError

# (arch, component) -> {real dimension: tiny dimension}, from each spec's `tiny.dims`
DIM_MAPS: dict[tuple[str, str], Mapping[int, int]] = {
    (spec.id, component): dims for spec in SPECS.values() for component, dims in spec.tiny.dims.items()}


def norm_groups(first_channels: int) -> int:
    """GroupNorm group count for a model whose first block has `first_channels` channels: min(32, c // 2)."""
    return min(32, first_channels // 2)


def tiny_dim(arch: str, component: str, dim: int) -> int:
    """The tiny counterpart of one real dimension of `component` in `arch`; ArchError when the map lacks it."""
    dims = DIM_MAPS.get((check_arch(arch), component))
    if dims is None:
        raise ArchError(f"no tiny dimension map for component {component!r} of {arch}")
    if dim not in dims:
        raise ArchError(f"{arch} {component}: real dimension {dim} has no tiny counterpart (known: {sorted(dims)})")
    return dims[dim]


def tiny_shape(arch: str, key: str) -> tuple[int, ...]:
    """Shape of `key` in a tiny `arch` checkpoint (ArchError for a key the real table lacks)."""
    info = _info(arch, key)
    return tuple(tiny_dim(arch, info.component, d) for d in info.shape)


def real_shape(arch: str, key: str) -> tuple[int, ...]:
    """Shape of `key` in a real `arch` checkpoint."""
    return _info(arch, key).shape


def tiny_hparams(arch: str) -> dict[str, dict]:
    """Config overrides that turn the real diffusers/transformers configs into the tiny model's.

    Returns {config name: {field: value}} with the config names of a diffusers folder ("unet", "vae",
    "text_encoder", and "text_encoder_2" for SDXL). Widths, heads and norm groups are the tiny ones; depths
    (layers per block, transformer depth, encoder layers) are the real ones, repeated so that each dict is
    self-describing. Update a real config with it: ``{**real_unet_config, **tiny_hparams("sdxl")["unet"]}``.
    """
    return {name: copy.deepcopy(dict(values)) for name, values in arch_spec(arch).tiny.hparams.items()}


def param_count(arch: str, keys: list[str] | None = None, tiny: bool = False) -> int:
    """Number of elements of `keys` (default: every key of the table) in the real or tiny model."""
    table = key_table(arch)
    shape = tiny_shape if tiny else real_shape
    return sum(math.prod(shape(arch, k)) for k in (table if keys is None else keys))


def _info(arch: str, key: str) -> KeyInfo:
    info = key_table(arch).get(key)
    if info is None:
        raise ArchError(f"{key!r} is not a key of a {arch} checkpoint")
    return info
