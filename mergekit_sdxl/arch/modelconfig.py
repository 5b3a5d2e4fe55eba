"""Model configurations derived from a checkpoint's tensor shapes (as ComfyUI's model detection does).

The structure (channels per level, ResNet and transformer depth per block, context and pooled widths, VAE and
text-encoder widths and depths) comes from the shapes in the file header, so nothing is read but the header and
real checkpoints and the tiny test checkpoints go through one code path. What shapes cannot tell (attention head
counts, GroupNorm groups, activations) comes from the shipped reference config of the architecture when the
structure matches it, from the tiny test variant when it matches that, and otherwise from the family's rule
(64-channel heads; SD1.5: 8 UNet heads).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from mergekit_sdxl.arch.configs import load_config
from mergekit_sdxl.arch.keymap import PREFIXES, TEXT_ENCODER, TEXT_ENCODER_2, UNET, VAE
from mergekit_sdxl.arch.registry import arch_spec
from mergekit_sdxl.arch.tiny import norm_groups, tiny_hparams
from mergekit_sdxl.errors import ArchError

Shapes = Mapping[str, tuple[int, ...]]
HEAD_DIM = 64
# Fields a UNet's weights determine; the rest of a config comes from the reference.
_UNET_STRUCTURE = ("in_channels", "out_channels", "block_out_channels", "layers_per_block", "down_block_types",
                   "up_block_types", "transformer_layers_per_block", "cross_attention_dim", "use_linear_projection",
                   "projection_class_embeddings_input_dim", "addition_time_embed_dim")
_UNET_DEFAULTS = {"use_linear_projection": False, "transformer_layers_per_block": 1}


def derive_configs(arch: str, shapes: Shapes) -> dict[str, dict]:
    """Diffusers/transformers configs (`unet`, `vae`, `text_encoder`, and `text_encoder_2` on SDXL) for `shapes`.

    Args:
        arch: an architecture id (from `arch.detect.detect_arch`).
        shapes: LDM/SGM key -> shape of the checkpoint (the header is enough).

    Raises:
        ArchError: a component is missing or its shapes are inconsistent with the architecture.
    """
    prefixes = PREFIXES[arch]
    parts = {c: _strip(shapes, prefixes[c]) for c in prefixes}
    for component, sub in parts.items():
        if not sub:
            raise ArchError(f"the checkpoint has no {component} weights (no key starts with {prefixes[component]!r})")
    configs = {UNET: unet_config(arch, parts[UNET], parts.get(TEXT_ENCODER_2)), VAE: vae_config(arch, parts[VAE])}
    configs[TEXT_ENCODER] = clip_config(arch, TEXT_ENCODER, _clip_l_dims(parts[TEXT_ENCODER]))
    if arch_spec(arch).dual_text_encoder:
        configs[TEXT_ENCODER_2] = clip_config(arch, TEXT_ENCODER_2, _open_clip_dims(parts[TEXT_ENCODER_2]))
    return configs


def _strip(shapes: Shapes, prefix: str) -> dict[str, tuple[int, ...]]:
    return {k[len(prefix):]: tuple(v) for k, v in shapes.items() if k.startswith(prefix)}


def _public(config: Mapping) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_")}


def _shape(sub: Mapping[str, tuple[int, ...]], key: str, component: str) -> tuple[int, ...]:
    try:
        return sub[key]
    except KeyError:
        raise ArchError(f"{component}: the checkpoint lacks {key!r}, needed to tell the model's shape") from None


def _indices(sub: Mapping[str, tuple], pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in sub if (m := rx.match(k))})


# ---------------------------------------------------------------------------------------------- UNet


def _unet_levels(sub: Mapping[str, tuple]) -> list[list[tuple[int, int]]]:
    """[[(channels, transformer depth) per ResNet block] per level] from `input_blocks`."""
    levels: list[list[tuple[int, int]]] = [[]]
    for i in _indices(sub, r"input_blocks\.(\d+)\.")[1:]:
        if f"input_blocks.{i}.0.op.weight" in sub:
            levels.append([])
            continue
        channels = _shape(sub, f"input_blocks.{i}.0.in_layers.2.weight", UNET)[0]
        depth = len(_indices(sub, rf"input_blocks\.{i}\.1\.transformer_blocks\.(\d+)\."))
        levels[-1].append((channels, depth))
    return levels


def _level_value(values: list[int], what: str, level: int) -> int:
    if len(set(values)) != 1:
        raise ArchError(f"unet: level {level} has blocks with different {what} {values}; not an SD/SDXL UNet")
    return values[0]


def unet_structure(sub: Mapping[str, tuple], pooled_width: int | None) -> dict:
    """The structural UNet config fields (see `_UNET_STRUCTURE`) from UNet key shapes (prefix removed)."""
    conv_in = _shape(sub, "input_blocks.0.0.weight", UNET)
    levels = _unet_levels(sub)
    counts = [len(level) for level in levels]
    lpb = _level_value(counts, "ResNet counts", 0)
    channels = [_level_value([c for c, _ in lv], "widths", n) for n, lv in enumerate(levels)]
    depths = [_level_value([d for _, d in lv], "transformer depths", n) for n, lv in enumerate(levels)]
    mid_depth = len(_indices(sub, r"middle_block\.1\.transformer_blocks\.(\d+)\."))
    attn_keys = sorted(k for k in sub if k.endswith("attn2.to_k.weight"))
    if not attn_keys:
        raise ArchError("unet: no cross-attention layers (attn2.to_k.weight); not an SD/SDXL UNet")
    proj_in = next(sub[k] for k in sorted(sub) if k.endswith("proj_in.weight"))
    out: dict = {
        "in_channels": conv_in[1],
        "out_channels": _shape(sub, "out.2.weight", UNET)[0],
        "block_out_channels": channels,
        "layers_per_block": lpb,
        "down_block_types": ["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in depths],
        "up_block_types": ["CrossAttnUpBlock2D" if d else "UpBlock2D" for d in reversed(depths)],
        "transformer_layers_per_block": [d or 1 for d in depths],
        "cross_attention_dim": sub[attn_keys[0]][1],
        "use_linear_projection": len(proj_in) == 2,
    }
    if mid_depth != (depths[-1] or 1):
        raise ArchError(f"unet: middle block has {mid_depth} transformer layers, last level {depths[-1]}; "
                        "diffusers cannot build that")
    _check_up_depths(sub, depths, lpb)
    if "label_emb.0.0.weight" in sub:
        adm = sub["label_emb.0.0.weight"][1]
        if pooled_width is None or (adm - pooled_width) % 6:
            raise ArchError(f"unet: ADM input width {adm} does not fit a pooled width of {pooled_width} + 6 sizes")
        out["projection_class_embeddings_input_dim"] = adm
        out["addition_time_embed_dim"] = (adm - pooled_width) // 6
    return out


def _check_up_depths(sub: Mapping[str, tuple], depths: list[int], lpb: int) -> None:
    expected = [d for d in reversed(depths) for _ in range(lpb + 1)]
    found = [len(_indices(sub, rf"output_blocks\.{i}\.1\.transformer_blocks\.(\d+)\."))
             for i in range(len(expected))]
    if found != expected or f"output_blocks.{len(expected)}.0.in_layers.2.weight" in sub:
        raise ArchError(f"unet: output blocks have transformer depths {found}, expected {expected}")


def unet_config(arch: str, sub: Mapping[str, tuple], te2: Mapping[str, tuple] | None) -> dict:
    """The UNet2DConditionModel config of UNet key shapes `sub` (prefix removed)."""
    pooled = _open_clip_dims(te2)["projection_dim"] if te2 else None
    structure = unet_structure(sub, pooled)
    reference = _public(load_config(arch, UNET))
    config = {**reference, **structure}
    if "projection_class_embeddings_input_dim" not in structure:
        config.update(addition_embed_type=None, projection_class_embeddings_input_dim=None)
    config["norm_num_groups"] = norm_groups(structure["block_out_channels"][0])
    config["attention_head_dim"] = _unet_heads(arch, reference, structure)
    return config


def _unet_heads(arch: str, reference: dict, structure: dict) -> int | list[int]:
    tiny = {**reference, **tiny_hparams(arch)[UNET]}
    for known in (reference, tiny):
        if all(_same(known.get(k, _UNET_DEFAULTS.get(k)), structure[k]) for k in _UNET_STRUCTURE if k in structure):
            return known["attention_head_dim"]
    fixed = arch_spec(arch).tiny.unet_heads
    if fixed is not None:
        return fixed
    channels = structure["block_out_channels"]
    if any(c % HEAD_DIM for c in channels):
        raise ArchError(f"unet: widths {channels} are not multiples of the {HEAD_DIM}-channel SDXL attention head")
    return [c // HEAD_DIM for c in channels]


def _same(a: object, b: object) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return list(a) == list(b)
    if isinstance(a, int) and isinstance(b, (list, tuple)):  # diffusers broadcasts an int per level
        return all(x == a for x in b)
    return a == b


# ---------------------------------------------------------------------------------------------- VAE


def vae_config(arch: str, sub: Mapping[str, tuple]) -> dict:
    """The AutoencoderKL config of VAE key shapes `sub` (prefix removed)."""
    levels = _indices(sub, r"encoder\.down\.(\d+)\.")
    channels = [_shape(sub, f"encoder.down.{n}.block.0.conv2.weight", VAE)[0] for n in levels]
    lpb = len(_indices(sub, r"encoder\.down\.0\.block\.(\d+)\."))
    latent = _shape(sub, "quant_conv.weight", VAE)[0] // 2
    reference = _public(load_config(arch, VAE))
    return {**reference, "block_out_channels": channels, "layers_per_block": lpb, "latent_channels": latent,
            "in_channels": _shape(sub, "encoder.conv_in.weight", VAE)[1],
            "out_channels": _shape(sub, "decoder.conv_out.weight", VAE)[0],
            "down_block_types": ["DownEncoderBlock2D"] * len(channels),
            "up_block_types": ["UpDecoderBlock2D"] * len(channels),
            "norm_num_groups": norm_groups(channels[0])}


# ---------------------------------------------------------------------------------------------- text encoders


def _clip_l_dims(sub: Mapping[str, tuple]) -> dict:
    embed = _shape(sub, "text_model.embeddings.token_embedding.weight", TEXT_ENCODER)
    layers = _indices(sub, r"text_model\.encoder\.layers\.(\d+)\.")
    return {"vocab_size": embed[0], "hidden_size": embed[1], "num_hidden_layers": len(layers),
            "intermediate_size": _shape(sub, "text_model.encoder.layers.0.mlp.fc1.weight", TEXT_ENCODER)[0],
            "projection_dim": embed[1],
            "max_position_embeddings": _shape(sub, "text_model.embeddings.position_embedding.weight",
                                              TEXT_ENCODER)[0]}


def _open_clip_dims(sub: Mapping[str, tuple]) -> dict:
    embed = _shape(sub, "token_embedding.weight", TEXT_ENCODER_2)
    layers = _indices(sub, r"transformer\.resblocks\.(\d+)\.")
    projection = sub.get("text_projection", (embed[1], embed[1]))
    return {"vocab_size": embed[0], "hidden_size": embed[1], "num_hidden_layers": len(layers),
            "intermediate_size": _shape(sub, "transformer.resblocks.0.mlp.c_fc.weight", TEXT_ENCODER_2)[0],
            "projection_dim": projection[1],
            "max_position_embeddings": _shape(sub, "positional_embedding", TEXT_ENCODER_2)[0]}


def clip_config(arch: str, component: str, dims: dict) -> dict:
    """The CLIPTextConfig kwargs of a text encoder with derived `dims`; heads from the reference or tiny variant."""
    reference = load_config(arch, component)
    tiny = {**reference, **tiny_hparams(arch)[component]}
    config = {**reference, **dims}
    for known in (reference, tiny):
        if all(known[k] == dims[k] for k in ("hidden_size", "intermediate_size")):
            config["num_attention_heads"] = known["num_attention_heads"]
            break
    else:
        if dims["hidden_size"] % HEAD_DIM:
            raise ArchError(f"{component}: width {dims['hidden_size']} is not a multiple of the {HEAD_DIM}-channel "
                            "CLIP attention head")
        config["num_attention_heads"] = dims["hidden_size"] // HEAD_DIM
    return config


def fill_rule(arch: str, component: str, key: str) -> str | None:
    """How to fill a weight the diffusers/transformers module has but a checkpoint may lack: "arange"
    (`position_ids`, a persistent buffer in old transformers releases: 0..76), "ones"/"zeros" (SDXL CLIP-L
    `final_layer_norm`: pruned from SDXL files, since SDXL never runs it), or None (it must be in the file)."""
    if key.endswith("embeddings.position_ids"):
        return "arange"
    if arch_spec(arch).pruned_te1_final_norm and component == TEXT_ENCODER and "final_layer_norm." in key:
        return "ones" if key.endswith("weight") else "zeros"
    return None
