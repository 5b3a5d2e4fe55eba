"""Renaming rules between LDM/SGM UNet and VAE key names and diffusers ones (the block renumbering depends on
`Layout`, a few numbers of the model's configs). The public entry points are in `arch/keymap.py`."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache

from mergekit_sdxl.arch.configs import load_config
from mergekit_sdxl.arch.tables import check_arch
from mergekit_sdxl.errors import ArchError

# diffusers pipeline folder names of the components
UNET = "unet"
VAE = "vae"
TEXT_ENCODER = "text_encoder"
TEXT_ENCODER_2 = "text_encoder_2"


@dataclass(frozen=True)
class Layout:
    """The few config numbers the block renumbering depends on.

    `up_block_attn[b]` says whether diffusers up block `b` has attentions (its upsampler then sits at
    `output_blocks.N.2.conv` instead of `.1.conv`).
    """

    layers_per_block: int
    up_block_attn: tuple[bool, ...]
    vae_blocks: int

    @classmethod
    def from_configs(cls, unet: Mapping, vae: Mapping) -> Layout:
        """The layout of a UNet2DConditionModel config and an AutoencoderKL config (dicts)."""
        lpb = unet.get("layers_per_block", 2)
        if not isinstance(lpb, int):
            raise ArchError(f"per-block layers_per_block {lpb!r} is not supported; expected one integer")
        attn = tuple("Attn" in t for t in unet["up_block_types"])
        return cls(lpb, attn, len(vae["up_block_types"]))


@cache
def default_layout(arch: str) -> Layout:
    """The layout of the shipped configs of `arch`."""
    name = check_arch(arch)
    return Layout.from_configs(load_config(name, UNET), load_config(name, VAE))


# ---------------------------------------------------------------------------------------------- small helpers


def _swap(name: str, table: Mapping[str, str]) -> str | None:
    """`name` with its leading module path replaced through `table` (whole dotted parts only)."""
    for old, new in table.items():
        if name == old:
            return new
        if name.startswith(old + "."):
            return new + name[len(old) :]
    return None


def inverse(table: Mapping[str, str]) -> dict[str, str]:
    return {v: k for k, v in table.items()}


# ---------------------------------------------------------------------------------------------- UNet

_UNET_FIXED = {
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "label_emb.0.0": "add_embedding.linear_1",
    "label_emb.0.2": "add_embedding.linear_2",
    "input_blocks.0.0": "conv_in",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
}
_UNET_FIXED_REV = inverse(_UNET_FIXED)
_RESNET = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "emb_layers.1": "time_emb_proj",
    "skip_connection": "conv_shortcut",
}
_RESNET_REV = inverse(_RESNET)
_MID = {"0": "mid_block.resnets.0", "1": "mid_block.attentions.0", "2": "mid_block.resnets.1"}
_MID_REV = inverse(_MID)
_MID_LDM = re.compile(r"middle_block\.([012])\.(.+)")
_MID_DIFF = re.compile(r"mid_block\.(resnets\.[01]|attentions\.0)\.(.+)")
_BLOCK = re.compile(r"(input_blocks|output_blocks)\.(\d+)\.(\d+)\.(.+)")
_DIFF_BLOCK = re.compile(r"(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)")
_SAMPLER_CONV = re.compile(r"(conv|op)\.(weight|bias)")


def unet_to_diffusers(name: str, lay: Layout) -> str | None:
    fixed = _swap(name, _UNET_FIXED)
    if fixed is not None:
        return fixed
    m = _MID_LDM.fullmatch(name)
    if m:
        idx, rest = m.groups()
        rest_d = rest if idx == "1" else _swap(rest, _RESNET)
        return None if rest_d is None else f"{_MID[idx]}.{rest_d}"
    m = _BLOCK.fullmatch(name)
    if not m:
        return None
    side, i, j, rest = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)
    if side == "input_blocks":
        return _down_to_diffusers(i, j, rest, lay)
    return _up_to_diffusers(i, j, rest, lay)


def _down_to_diffusers(i: int, j: int, rest: str, lay: Layout) -> str | None:
    if i == 0:
        return None
    b, layer = divmod(i - 1, lay.layers_per_block + 1)
    if b >= len(lay.up_block_attn):
        return None
    if layer == lay.layers_per_block:
        sm = _SAMPLER_CONV.fullmatch(rest)
        if sm is None or not (j == 0 and sm.group(1) == "op" and b < len(lay.up_block_attn) - 1):
            return None
        return f"down_blocks.{b}.downsamplers.0.conv.{sm.group(2)}"
    if j == 0:
        res = _swap(rest, _RESNET)
        return None if res is None else f"down_blocks.{b}.resnets.{layer}.{res}"
    return f"down_blocks.{b}.attentions.{layer}.{rest}" if j == 1 else None


def _up_to_diffusers(i: int, j: int, rest: str, lay: Layout) -> str | None:
    b, layer = divmod(i, lay.layers_per_block + 1)
    if b >= len(lay.up_block_attn):
        return None
    has_attn = lay.up_block_attn[b]
    sampler_j = 2 if has_attn else 1
    sm = _SAMPLER_CONV.fullmatch(rest)
    if j == sampler_j and sm is not None and sm.group(1) == "conv":
        is_last = layer == lay.layers_per_block and b < len(lay.up_block_attn) - 1
        return f"up_blocks.{b}.upsamplers.0.conv.{sm.group(2)}" if is_last else None
    if j == 0:
        res = _swap(rest, _RESNET)
        return None if res is None else f"up_blocks.{b}.resnets.{layer}.{res}"
    return f"up_blocks.{b}.attentions.{layer}.{rest}" if j == 1 and has_attn else None


def unet_to_ldm(name: str, lay: Layout) -> str | None:
    fixed = _swap(name, _UNET_FIXED_REV)
    if fixed is not None:
        return fixed
    m = _MID_DIFF.fullmatch(name)
    if m:
        mid, rest = m.groups()
        rest_l = rest if mid.startswith("attentions") else _swap(rest, _RESNET_REV)
        return None if rest_l is None else f"middle_block.{_MID_REV[f'mid_block.{mid}']}.{rest_l}"
    m = _DIFF_BLOCK.fullmatch(name)
    if not m:
        return None
    side, b, kind, layer, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
    step = lay.layers_per_block + 1
    if b >= len(lay.up_block_attn):
        return None
    if side == "down_blocks":
        if kind == "resnets":
            res = _swap(rest, _RESNET_REV)
            return None if res is None else f"input_blocks.{1 + b * step + layer}.0.{res}"
        if kind == "attentions":
            return f"input_blocks.{1 + b * step + layer}.1.{rest}"
        sm = _SAMPLER_CONV.fullmatch(rest)
        if sm is None or not (kind == "downsamplers" and layer == 0 and sm.group(1) == "conv"):
            return None
        return f"input_blocks.{1 + b * step + lay.layers_per_block}.0.op.{sm.group(2)}" \
            if b < len(lay.up_block_attn) - 1 else None
    if kind == "resnets":
        res = _swap(rest, _RESNET_REV)
        return None if res is None else f"output_blocks.{b * step + layer}.0.{res}"
    if kind == "attentions":
        return f"output_blocks.{b * step + layer}.1.{rest}"
    sm = _SAMPLER_CONV.fullmatch(rest)
    last = b == len(lay.up_block_attn) - 1
    if kind == "upsamplers" and layer == 0 and sm is not None and sm.group(1) == "conv" and not last:
        j = 2 if lay.up_block_attn[b] else 1
        return f"output_blocks.{b * step + lay.layers_per_block}.{j}.conv.{sm.group(2)}"
    return None


# ---------------------------------------------------------------------------------------------- VAE

_VAE_FIXED = {
    "encoder.norm_out": "encoder.conv_norm_out",
    "decoder.norm_out": "decoder.conv_norm_out",
    **{n: n for n in ("encoder.conv_in", "encoder.conv_out", "decoder.conv_in", "decoder.conv_out")},
    "quant_conv": "quant_conv",
    "post_quant_conv": "post_quant_conv",
}
_VAE_FIXED_REV = inverse(_VAE_FIXED)
_VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "nin_shortcut": "conv_shortcut"}
_VAE_RESNET_REV = inverse(_VAE_RESNET)
_VAE_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
# diffusers < 0.15 saved the VAE attention as query/key/value/proj_attn (SD1.5's hub folder still does)
_VAE_ATTN_REV = {**inverse(_VAE_ATTN), "query": "q", "key": "k", "value": "v", "proj_attn": "proj_out"}
_VAE_LDM = re.compile(
    r"(encoder|decoder)\.(?:(down|up)\.(\d+)\.(block\.(\d+)|downsample|upsample)|mid\.(block_1|block_2|attn_1))\.(.+)"
)
_VAE_DIFF = re.compile(
    r"(encoder|decoder)\.(?:(down_blocks|up_blocks)\.(\d+)\.(resnets\.(\d+)|downsamplers\.0|upsamplers\.0)"
    r"|mid_block\.(resnets\.0|resnets\.1|attentions\.0))\.(.+)"
)


def vae_to_diffusers(name: str, lay: Layout) -> tuple[str, str] | None:
    fixed = _swap(name, _VAE_FIXED)
    if fixed is not None:
        return fixed, "copy"
    m = _VAE_LDM.fullmatch(name)
    if not m:
        return None
    coder, side, idx, part, block, mid, rest = m.groups()
    if mid is not None:
        if mid != "attn_1":
            res = _swap(rest, _VAE_RESNET)
            return None if res is None else (f"{coder}.mid_block.resnets.{int(mid[-1]) - 1}.{res}", "copy")
        return _vae_attn_to_diffusers(coder, rest)
    i = int(idx)
    if (coder, side) not in (("encoder", "down"), ("decoder", "up")) or i >= lay.vae_blocks:
        return None
    n = i if side == "down" else lay.vae_blocks - 1 - i
    if block is not None:
        res = _swap(rest, _VAE_RESNET)
        return None if res is None else (f"{coder}.{side}_blocks.{n}.resnets.{block}.{res}", "copy")
    if part != f"{side}sample" or _SAMPLER_CONV.fullmatch(rest) is None or not rest.startswith("conv."):
        return None
    return f"{coder}.{side}_blocks.{n}.{side}samplers.0.{rest}", "copy"


def _vae_attn_to_diffusers(coder: str, rest: str) -> tuple[str, str] | None:
    module, _, param = rest.rpartition(".")
    if module not in _VAE_ATTN or param not in ("weight", "bias"):
        return None
    op = "conv1x1_to_linear" if param == "weight" and module != "norm" else "copy"
    return f"{coder}.mid_block.attentions.0.{_VAE_ATTN[module]}.{param}", op


def vae_to_ldm(name: str, lay: Layout) -> tuple[str, str] | None:
    fixed = _swap(name, _VAE_FIXED_REV)
    if fixed is not None:
        return fixed, "copy"
    m = _VAE_DIFF.fullmatch(name)
    if not m:
        return None
    coder, side, idx, part, block, mid, rest = m.groups()
    if mid is not None:
        if mid.startswith("resnets."):
            res = _swap(rest, _VAE_RESNET_REV)
            return None if res is None else (f"{coder}.mid.block_{int(mid[-1]) + 1}.{res}", "copy")
        module, _, param = rest.rpartition(".")
        if module not in _VAE_ATTN_REV or param not in ("weight", "bias"):
            return None
        op = "conv1x1_to_linear" if param == "weight" and module != "group_norm" else "copy"
        return f"{coder}.mid.attn_1.{_VAE_ATTN_REV[module]}.{param}", op
    short = side[: -len("_blocks")]
    n = int(idx)
    if (coder, short) not in (("encoder", "down"), ("decoder", "up")) or n >= lay.vae_blocks:
        return None
    i = n if short == "down" else lay.vae_blocks - 1 - n
    if block is not None:
        res = _swap(rest, _VAE_RESNET_REV)
        return None if res is None else (f"{coder}.{short}.{i}.block.{block}.{res}", "copy")
    if part != f"{short}samplers.0" or not rest.startswith("conv.") or _SAMPLER_CONV.fullmatch(rest) is None:
        return None
    return f"{coder}.{short}.{i}.{short}sample.{rest}", "copy"
