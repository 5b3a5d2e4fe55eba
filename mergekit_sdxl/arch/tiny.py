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

import math

from mergekit_sdxl.arch.tables import KeyInfo, check_arch, key_table
from mergekit_sdxl.errors import ArchError


def _unet_map(context: int, tiny_context: int) -> dict[int, int]:
    dims = {d: d // 20 for d in (320, 640, 960, 1280, 1920, 2560, 5120, 10240)}
    dims.update({0: 0, 1: 1, 3: 3, 4: 4, context: tiny_context})
    return dims


_CLIP_L = {1: 1, 77: 77, 49408: 49408, 768: 32, 3072: 128}
_CLIP_G = {1: 1, 77: 77, 49408: 49408, 1280: 64, 3840: 192, 5120: 256}
_VAE = {1: 1, 3: 3, 4: 4, 8: 8, 128: 16, 256: 32, 512: 64}
_OTHER = {1000: 1000}

# (arch, component) -> {real dimension: tiny dimension}
DIM_MAPS: dict[tuple[str, str], dict[int, int]] = {
    ("sdxl", "unet"): {**_unet_map(2048, 96), 2816: 112},
    ("sdxl", "clip_l"): _CLIP_L,
    ("sdxl", "clip_g"): _CLIP_G,
    ("sdxl", "vae"): _VAE,
    ("sdxl", "other"): _OTHER,
    ("sd15", "unet"): _unet_map(768, 32),
    ("sd15", "ema"): _unet_map(768, 32),
    ("sd15", "clip_l"): _CLIP_L,
    ("sd15", "vae"): _VAE,
    ("sd15", "other"): _OTHER,
}


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
    arch = check_arch(arch)
    groups = norm_groups(16)
    vae = {"block_out_channels": [16, 32, 64, 64], "layers_per_block": 2, "norm_num_groups": groups,
           "latent_channels": 4}
    te1 = _clip_hparams(width=32, intermediate=128, heads=4, layers=12)
    if arch == "sd15":
        unet = {"block_out_channels": [16, 32, 64, 64], "layers_per_block": 2, "norm_num_groups": groups,
                "attention_head_dim": 2, "cross_attention_dim": 32, "transformer_layers_per_block": 1}
        return {"unet": unet, "vae": vae, "text_encoder": te1}
    unet = {"block_out_channels": [16, 32, 64], "layers_per_block": 2, "norm_num_groups": groups,
            "attention_head_dim": [2, 4, 8], "transformer_layers_per_block": [1, 2, 10],
            "cross_attention_dim": 96, "addition_time_embed_dim": 8,
            "projection_class_embeddings_input_dim": 64 + 6 * 8}
    te2 = _clip_hparams(width=64, intermediate=256, heads=8, layers=32)
    return {"unet": unet, "vae": vae, "text_encoder": te1, "text_encoder_2": te2}


def _clip_hparams(width: int, intermediate: int, heads: int, layers: int) -> dict:
    return {"hidden_size": width, "intermediate_size": intermediate, "num_attention_heads": heads,
            "num_hidden_layers": layers, "projection_dim": width, "vocab_size": 49408,
            "max_position_embeddings": 77}


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
