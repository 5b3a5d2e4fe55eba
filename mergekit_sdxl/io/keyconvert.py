"""LDM/SGM state dicts <-> per-component diffusers state dicts, applying the ops of arch/keymap.py.

Both directions keep every tensor's dtype and values bit for bit; a round trip returns equal tensors.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from functools import cache

import torch

from mergekit_sdxl.arch.keymap import KeyMapping, Layout, build_keymap, build_reverse_keymap
from mergekit_sdxl.errors import CheckpointError

_QKV_INDEX = {"qkv0": 0, "qkv1": 1, "qkv2": 2}


@cache
def installed_clip_l_style() -> str:
    """`"flat"` if the installed CLIPTextModel has no `text_model.` prefix (transformers >= 5.6), else "text_model"."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=8, hidden_size=4, intermediate_size=4, num_hidden_layers=1, num_attention_heads=1,
        max_position_embeddings=4, projection_dim=4, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )  # fmt: skip
    with torch.device("meta"):
        model = CLIPTextModel(config)
    return clip_l_style_of(model)


def clip_l_style_of(model: torch.nn.Module) -> str:
    """The CLIP-L name style a built text-encoder module uses in its state dict."""
    return "text_model" if hasattr(model, "text_model") else "flat"


def to_diffusers_tensor(op: str, tensor: torch.Tensor, key: str = "") -> torch.Tensor:
    """The diffusers tensor `op` derives from LDM `tensor` (`key` only names it in errors)."""
    if op == "copy":
        return tensor
    if op == "conv1x1_to_linear":
        if tensor.ndim == 2:
            return tensor
        if tensor.ndim < 2 or any(s != 1 for s in tensor.shape[2:]):
            raise CheckpointError(f"{key}: expected a 1x1 convolution weight, got shape {list(tensor.shape)}")
        return tensor.reshape(tensor.shape[0], tensor.shape[1])
    if op == "transpose":
        if tensor.ndim != 2:
            raise CheckpointError(f"{key}: expected a matrix to transpose, got shape {list(tensor.shape)}")
        return tensor.t().contiguous()
    if op in _QKV_INDEX:
        if tensor.ndim == 0 or tensor.shape[0] % 3:
            raise CheckpointError(f"{key}: fused q/k/v needs a first dimension divisible by 3: {list(tensor.shape)}")
        return tensor.chunk(3, dim=0)[_QKV_INDEX[op]].clone()
    raise CheckpointError(f"{key}: unknown key-map op {op!r}")


def to_ldm_tensor(mappings: tuple[KeyMapping, ...], tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The LDM tensor rebuilt from the diffusers tensors of `mappings` (all for one LDM key)."""
    first = mappings[0]
    if first.op in _QKV_INDEX:
        parts = sorted(mappings, key=lambda m: m.op)
        if [m.op for m in parts] != ["qkv0", "qkv1", "qkv2"]:
            raise CheckpointError(f"{first.ldm}: needs q, k and v parts, got {[m.diffusers for m in parts]}")
        values = [tensors[m.diffusers] for m in parts]
        if len({(v.dtype, tuple(v.shape)) for v in values}) != 1:
            raise CheckpointError(f"{first.ldm}: q/k/v parts differ in dtype or shape")
        return torch.cat(values, dim=0)
    if len(mappings) != 1:
        names = [m.diffusers for m in mappings]
        raise CheckpointError(f"{first.ldm}: {len(mappings)} diffusers keys map to it: {names}")
    tensor = tensors[first.diffusers]
    if first.op == "copy":
        return tensor
    if first.op == "conv1x1_to_linear":
        return tensor.reshape(*tensor.shape, 1, 1) if tensor.ndim == 2 else tensor
    if first.op == "transpose":
        return tensor.t().contiguous()
    raise CheckpointError(f"{first.ldm}: unknown key-map op {first.op!r}")


def ldm_to_diffusers(
    arch: str,
    tensors: Mapping[str, torch.Tensor],
    *,
    clip_l_style: str | None = None,
    layout: Layout | None = None,
    strict: bool = True,
) -> dict[str, dict[str, torch.Tensor]]:
    """Split an LDM/SGM state dict into diffusers state dicts.

    Args:
        arch: an architecture id (arch/registry.py).
        tensors: LDM/SGM key -> tensor (a dict, or any mapping such as a lazy reader view).
        clip_l_style: CLIP-L name style; defaults to the installed transformers' (`installed_clip_l_style()`).
        layout: block numbering; defaults to the shipped configs.
        strict: raise ArchError for keys inside a component that no rule recognises.

    Returns:
        component (`unet`, `vae`, `text_encoder`, `text_encoder_2`) -> diffusers key -> tensor. Keys with no
        diffusers equivalent are left out; `build_keymap(arch, tensors).unmapped_keys` lists them.
    """
    style = clip_l_style or installed_clip_l_style()
    keymap = build_keymap(arch, tensors.keys(), layout=layout, clip_l_style=style, strict=strict)
    out: dict[str, dict[str, torch.Tensor]] = {c: {} for c in keymap.components()}
    for m in keymap.mappings:
        out[m.component][m.diffusers] = to_diffusers_tensor(m.op, tensors[m.ldm], m.ldm)
    return out


def diffusers_to_ldm(
    arch: str,
    components: Mapping[str, Mapping[str, torch.Tensor]],
    *,
    layout: Layout | None = None,
    strict: bool = True,
) -> dict[str, torch.Tensor]:
    """Join diffusers state dicts (component -> key -> tensor) into one LDM/SGM state dict.

    Either CLIP name style is accepted. Diffusers keys with no LDM equivalent (text encoder 2's `position_ids`)
    are left out; unrecognised keys raise ArchError when `strict`.
    """
    keymap = build_reverse_keymap(arch, {c: sd.keys() for c, sd in components.items()}, layout=layout, strict=strict)
    out: dict[str, torch.Tensor] = {}
    for ldm, mappings in keymap.by_ldm().items():
        component = mappings[0].component
        out[ldm] = to_ldm_tensor(mappings, components[component])
    return out


def expected_diffusers_keys(
    arch: str, ldm_keys: Iterable[str], *, clip_l_style: str | None = None, layout: Layout | None = None
) -> dict[str, list[str]]:
    """component -> the diffusers keys that `ldm_keys` provide (what a strict load of those components needs)."""
    keymap = build_keymap(arch, ldm_keys, clip_l_style=clip_l_style or installed_clip_l_style(), layout=layout)
    return {c: keymap.diffusers_keys(c) for c in keymap.components()}
