"""LDM/SGM single-file key names <-> diffusers/transformers state-dict names, built by rules.

One LDM key maps to zero or more diffusers keys, each with an `op` that says how its tensor is derived:

| op | LDM -> diffusers | diffusers -> LDM |
|---|---|---|
| `copy` | the same tensor | the same tensor |
| `conv1x1_to_linear` | `[o, i, 1, 1]` -> `[o, i]` (VAE mid-attention q/k/v/proj_out) | `[o, i]` -> `[o, i, 1, 1]` |
| `transpose` | `P.T` (OpenCLIP `text_projection`, stored as `x @ P`) | `W.T` |
| `qkv0` / `qkv1` / `qkv2` | third 0/1/2 along dim 0 of OpenCLIP's fused `in_proj_*` | concatenation of the three |

Components are the diffusers pipeline folder names: `unet`, `vae`, `text_encoder` (CLIP-L),
`text_encoder_2` (OpenCLIP-bigG, SDXL only). Keys without a diffusers equivalent (`position_ids`,
`logit_scale`, scheduler buffers, `v_pred`/`ztsnr` markers, `model_ema.*`, ...) end in `KeyMap.unmapped_keys`.

CLIP-L names come in two styles: `text_model.*` (transformers < 5.6 and `CLIPTextModelWithProjection`) and flat
(`CLIPTextModel` of transformers >= 5.6). This module is torch-free, so the caller picks: `clip_l_style="flat"` or
`"text_model"` (io/keyconvert.py inspects the installed class). OpenCLIP-bigG always uses `text_model.*` plus
`text_projection.weight`. Reverse mapping accepts both styles for both encoders.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cache

from mergekit_sdxl.arch.configs import load_config
from mergekit_sdxl.arch.tables import check_arch
from mergekit_sdxl.errors import ArchError

UNET = "unet"
VAE = "vae"
TEXT_ENCODER = "text_encoder"
TEXT_ENCODER_2 = "text_encoder_2"
OPS = ("copy", "conv1x1_to_linear", "transpose", "qkv0", "qkv1", "qkv2")
CLIP_L_STYLES = ("flat", "text_model")

PREFIXES: dict[str, dict[str, str]] = {
    "sdxl": {
        UNET: "model.diffusion_model.",
        VAE: "first_stage_model.",
        TEXT_ENCODER: "conditioner.embedders.0.transformer.",
        TEXT_ENCODER_2: "conditioner.embedders.1.model.",
    },
    "sd15": {
        UNET: "model.diffusion_model.",
        VAE: "first_stage_model.",
        TEXT_ENCODER: "cond_stage_model.transformer.",
    },
}
# the key tables' `component` names (arch/tables.py) for each diffusers component
TABLE_COMPONENTS = {UNET: "unet", VAE: "vae", TEXT_ENCODER: "clip_l", TEXT_ENCODER_2: "clip_g"}


@dataclass(frozen=True)
class KeyMapping:
    """LDM key `ldm` provides diffusers key `diffusers` of `component` through `op`."""

    ldm: str
    component: str
    diffusers: str
    op: str = "copy"


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


def _inverse(table: Mapping[str, str]) -> dict[str, str]:
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
_UNET_FIXED_REV = _inverse(_UNET_FIXED)
_RESNET = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "emb_layers.1": "time_emb_proj",
    "skip_connection": "conv_shortcut",
}
_RESNET_REV = _inverse(_RESNET)
_MID = {"0": "mid_block.resnets.0", "1": "mid_block.attentions.0", "2": "mid_block.resnets.1"}
_MID_REV = _inverse(_MID)
_MID_LDM = re.compile(r"middle_block\.([012])\.(.+)")
_MID_DIFF = re.compile(r"mid_block\.(resnets\.[01]|attentions\.0)\.(.+)")
_BLOCK = re.compile(r"(input_blocks|output_blocks)\.(\d+)\.(\d+)\.(.+)")
_DIFF_BLOCK = re.compile(r"(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)")
_SAMPLER_CONV = re.compile(r"(conv|op)\.(weight|bias)")


def _unet_to_diffusers(name: str, lay: Layout) -> str | None:
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
        ok = j == 0 and sm is not None and sm.group(1) == "op" and b < len(lay.up_block_attn) - 1
        return f"down_blocks.{b}.downsamplers.0.conv.{sm.group(2)}" if ok else None
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


def _unet_to_ldm(name: str, lay: Layout) -> str | None:
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
        ok = kind == "downsamplers" and layer == 0 and sm is not None and sm.group(1) == "conv"
        ok = ok and b < len(lay.up_block_attn) - 1
        return f"input_blocks.{1 + b * step + lay.layers_per_block}.0.op.{sm.group(2)}" if ok else None
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
_VAE_FIXED_REV = _inverse(_VAE_FIXED)
_VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "nin_shortcut": "conv_shortcut"}
_VAE_RESNET_REV = _inverse(_VAE_RESNET)
_VAE_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
# diffusers < 0.15 saved the VAE attention as query/key/value/proj_attn (SD1.5's hub folder still does)
_VAE_ATTN_REV = {**_inverse(_VAE_ATTN), "query": "q", "key": "k", "value": "v", "proj_attn": "proj_out"}
_VAE_LDM = re.compile(
    r"(encoder|decoder)\.(?:(down|up)\.(\d+)\.(block\.(\d+)|downsample|upsample)|mid\.(block_1|block_2|attn_1))\.(.+)"
)
_VAE_DIFF = re.compile(
    r"(encoder|decoder)\.(?:(down_blocks|up_blocks)\.(\d+)\.(resnets\.(\d+)|downsamplers\.0|upsamplers\.0)"
    r"|mid_block\.(resnets\.0|resnets\.1|attentions\.0))\.(.+)"
)


def _vae_to_diffusers(name: str, lay: Layout) -> tuple[str, str] | None:
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


def _vae_to_ldm(name: str, lay: Layout) -> tuple[str, str] | None:
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


# ---------------------------------------------------------------------------------------------- text encoders

_CLIP_INNER = re.compile(
    r"embeddings\.(token_embedding|position_embedding)\.weight"
    r"|encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|layer_norm1|layer_norm2|mlp\.fc1|mlp\.fc2)\.(weight|bias)"
    r"|final_layer_norm\.(weight|bias)"
)
_POSITION_IDS = "embeddings.position_ids"


def _clip_l_to_diffusers(name: str, style: str) -> str | None:
    inner = name[len("text_model.") :] if name.startswith("text_model.") else name
    if not _CLIP_INNER.fullmatch(inner):
        return None
    return inner if style == "flat" else "text_model." + inner


_OPEN_CLIP_FIXED = {
    "token_embedding.weight": "embeddings.token_embedding.weight",
    "positional_embedding": "embeddings.position_embedding.weight",
    "ln_final.weight": "final_layer_norm.weight",
    "ln_final.bias": "final_layer_norm.bias",
}
_OPEN_CLIP_FIXED_REV = _inverse(_OPEN_CLIP_FIXED)
_RESBLOCK = {
    "attn.out_proj": "self_attn.out_proj",
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
_RESBLOCK_REV = _inverse(_RESBLOCK)
_RESBLOCK_LDM = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)")
_IN_PROJ = re.compile(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)")
_LAYER_DIFF = re.compile(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)")
_QKV = {"q_proj": "qkv0", "k_proj": "qkv1", "v_proj": "qkv2"}


def _open_clip_to_diffusers(name: str) -> list[tuple[str, str]] | None:
    if name in _OPEN_CLIP_FIXED:
        return [("text_model." + _OPEN_CLIP_FIXED[name], "copy")]
    if name == "text_projection":
        return [("text_projection.weight", "transpose")]
    m = _IN_PROJ.fullmatch(name)
    if m:
        n, param = m.groups()
        return [(f"text_model.encoder.layers.{n}.self_attn.{p}.{param}", op) for p, op in _QKV.items()]
    m = _RESBLOCK_LDM.fullmatch(name)
    if m and m.group(2) in _RESBLOCK:
        n, module, param = m.groups()
        return [(f"text_model.encoder.layers.{n}.{_RESBLOCK[module]}.{param}", "copy")]
    return None


def _open_clip_to_ldm(name: str) -> tuple[str, str] | None:
    if name == "text_projection.weight":
        return "text_projection", "transpose"
    inner = name[len("text_model.") :] if name.startswith("text_model.") else name
    if inner in _OPEN_CLIP_FIXED_REV:
        return _OPEN_CLIP_FIXED_REV[inner], "copy"
    m = _LAYER_DIFF.fullmatch(inner)
    if not m:
        return None
    n, module, param = m.groups()
    proj = module.removeprefix("self_attn.")
    if module.startswith("self_attn.") and proj in _QKV:
        return f"transformer.resblocks.{n}.attn.in_proj_{param}", _QKV[proj]
    if module in _RESBLOCK_REV:
        return f"transformer.resblocks.{n}.{_RESBLOCK_REV[module]}.{param}", "copy"
    return None


# ---------------------------------------------------------------------------------------------- public API

# keys inside a component prefix that have no diffusers tensor on purpose
_KNOWN_UNMAPPED = {
    TEXT_ENCODER: ("text_model.embeddings.position_ids", _POSITION_IDS),
    TEXT_ENCODER_2: ("logit_scale",),
}


def component_of(arch: str, key: str) -> str | None:
    """The diffusers component whose LDM prefix `key` starts with, or None."""
    for component, prefix in PREFIXES[check_arch(arch)].items():
        if key.startswith(prefix):
            return component
    return None


def map_ldm_key(
    arch: str, key: str, *, layout: Layout | None = None, clip_l_style: str = "flat"
) -> tuple[KeyMapping, ...] | None:
    """The diffusers keys LDM/SGM `key` provides.

    Returns:
        A tuple of mappings (three for a fused OpenCLIP `in_proj_*`, else one); `()` for a key with no diffusers
        equivalent on purpose (outside every component, `position_ids`, `logit_scale`); None for a key inside a
        component prefix that no rule recognises.
    """
    name = check_arch(arch)
    if clip_l_style not in CLIP_L_STYLES:
        raise ArchError(f"clip_l_style must be one of {CLIP_L_STYLES}, not {clip_l_style!r}")
    component = component_of(name, key)
    if component is None:
        return ()
    inner = key[len(PREFIXES[name][component]) :]
    if inner in _KNOWN_UNMAPPED.get(component, ()):
        return ()
    lay = layout or default_layout(name)
    found: list[tuple[str, str]] | None = None
    if component == UNET:
        d = _unet_to_diffusers(inner, lay)
        found = None if d is None else [(d, "copy")]
    elif component == VAE:
        dv = _vae_to_diffusers(inner, lay)
        found = None if dv is None else [dv]
    elif component == TEXT_ENCODER:
        d = _clip_l_to_diffusers(inner, clip_l_style)
        found = None if d is None else [(d, "copy")]
    else:
        found = _open_clip_to_diffusers(inner)
    return None if found is None else tuple(KeyMapping(key, component, d, op) for d, op in found)


def map_diffusers_key(arch: str, component: str, key: str, *, layout: Layout | None = None) -> KeyMapping | None:
    """The LDM/SGM key that diffusers `key` of `component` comes from (`op` as for the forward direction).

    Accepts both CLIP name styles. CLIP-L `embeddings.position_ids` (saved by old transformers) maps back to the
    LDM `position_ids` key. Returns None for a key no rule recognises.
    """
    name = check_arch(arch)
    prefixes = PREFIXES[name]
    if component not in prefixes:
        raise ArchError(f"{name} has no component {component!r}; expected one of {', '.join(prefixes)}")
    lay = layout or default_layout(name)
    found: tuple[str, str] | None = None
    if component == UNET:
        d = _unet_to_ldm(key, lay)
        found = None if d is None else (d, "copy")
    elif component == VAE:
        found = _vae_to_ldm(key, lay)
    elif component == TEXT_ENCODER:
        inner = key[len("text_model.") :] if key.startswith("text_model.") else key
        if _CLIP_INNER.fullmatch(inner) or inner == _POSITION_IDS:
            found = ("text_model." + inner, "copy")
    else:
        found = _open_clip_to_ldm(key)
    return None if found is None else KeyMapping(prefixes[component] + found[0], component, key, found[1])


@dataclass(frozen=True)
class KeyMap:
    """Every mapping between a set of LDM keys and diffusers keys, plus the keys left out."""

    arch: str
    mappings: tuple[KeyMapping, ...]
    unmapped_keys: tuple[str, ...]

    def components(self) -> tuple[str, ...]:
        """The components with at least one mapping, in pipeline order."""
        present = {m.component for m in self.mappings}
        return tuple(c for c in PREFIXES[self.arch] if c in present)

    def for_component(self, component: str) -> tuple[KeyMapping, ...]:
        """The mappings of one component."""
        return tuple(m for m in self.mappings if m.component == component)

    def diffusers_keys(self, component: str) -> list[str]:
        """The diffusers state-dict keys of `component` covered by this map."""
        return [m.diffusers for m in self.mappings if m.component == component]

    def by_ldm(self) -> dict[str, tuple[KeyMapping, ...]]:
        """LDM key -> its mappings (three for a fused in_proj, in q, k, v order)."""
        out: dict[str, list[KeyMapping]] = {}
        for m in self.mappings:
            out.setdefault(m.ldm, []).append(m)
        return {k: tuple(sorted(v, key=lambda m: m.op)) for k, v in out.items()}

    def by_diffusers(self, component: str) -> dict[str, KeyMapping]:
        """Diffusers key of `component` -> its mapping."""
        return {m.diffusers: m for m in self.mappings if m.component == component}


def build_keymap(
    arch: str,
    ldm_keys: Iterable[str],
    *,
    layout: Layout | None = None,
    clip_l_style: str = "flat",
    strict: bool = True,
) -> KeyMap:
    """Map a checkpoint's LDM/SGM keys to diffusers keys.

    Args:
        arch: `"sdxl"` or `"sd15"`.
        ldm_keys: the checkpoint's keys (any order; the map keeps it).
        layout: block numbering; defaults to the shipped configs of `arch`.
        clip_l_style: `"flat"` (transformers >= 5.6 CLIPTextModel) or `"text_model"`.
        strict: raise ArchError for keys inside a component prefix that no rule recognises (else they are
            listed in `unmapped_keys`).

    Returns:
        The KeyMap; two LDM keys claiming one diffusers key raise ArchError.
    """
    name = check_arch(arch)
    mappings: list[KeyMapping] = []
    unmapped: list[str] = []
    unknown: list[str] = []
    for key in ldm_keys:
        found = map_ldm_key(name, key, layout=layout, clip_l_style=clip_l_style)
        if found is None:
            unknown.append(key)
        if not found:
            unmapped.append(key)
        mappings.extend(found or ())
    if unknown and strict:
        raise ArchError(_unknown_message(name, unknown, "LDM"))
    _check_unique(name, ((m.component, m.diffusers, m.ldm) for m in mappings))
    return KeyMap(name, tuple(mappings), tuple(unmapped))


def build_reverse_keymap(
    arch: str, components: Mapping[str, Iterable[str]], *, layout: Layout | None = None, strict: bool = True
) -> KeyMap:
    """Map diffusers keys (per component) back to LDM/SGM keys.

    `unmapped_keys` holds `"<component>/<key>"` for diffusers keys with no LDM equivalent (e.g. text encoder 2's
    `position_ids`). A fused in_proj whose q, k or v part is missing raises ArchError.
    """
    name = check_arch(arch)
    mappings: list[KeyMapping] = []
    unmapped: list[str] = []
    unknown: list[str] = []
    for component, keys in components.items():
        for key in keys:
            found = map_diffusers_key(name, component, key, layout=layout)
            if found is not None:
                mappings.append(found)
            elif key.endswith(_POSITION_IDS):
                unmapped.append(f"{component}/{key}")
            else:
                unknown.append(f"{component}/{key}")
    if unknown and strict:
        raise ArchError(_unknown_message(name, unknown, "diffusers"))
    unmapped.extend(unknown)
    _check_unique(name, ((m.ldm, m.op, f"{m.component}/{m.diffusers}") for m in mappings))
    _check_qkv_complete(mappings)
    return KeyMap(name, tuple(mappings), tuple(unmapped))


def _check_unique(arch: str, triples: Iterable[tuple[str, str, str]]) -> None:
    seen: dict[tuple[str, str], str] = {}
    for a, b, source in triples:
        other = seen.setdefault((a, b), source)
        if other != source:
            raise ArchError(f"{arch}: keys {other!r} and {source!r} both map to {a}:{b}; the checkpoint is ambiguous")


def _check_qkv_complete(mappings: list[KeyMapping]) -> None:
    parts: dict[str, set[str]] = {}
    for m in mappings:
        if m.op.startswith("qkv"):
            parts.setdefault(m.ldm, set()).add(m.op)
    for ldm, ops in parts.items():
        if len(ops) != 3:
            missing = sorted({"qkv0", "qkv1", "qkv2"} - ops)
            raise ArchError(f"{ldm}: q/k/v parts {missing} are missing, cannot rebuild the fused in_proj")


def _unknown_message(arch: str, keys: list[str], kind: str) -> str:
    shown = ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")
    return f"{len(keys)} {kind} key(s) match no {arch} mapping rule: {shown}"
