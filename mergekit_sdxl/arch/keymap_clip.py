"""Renaming rules between LDM/SGM text-encoder key names and transformers ones: CLIP-L (two name styles) and
OpenCLIP-bigG (fused q/k/v `in_proj`, transposed `text_projection`). Public entry points: `arch/keymap.py`."""

from __future__ import annotations

import re

from mergekit_sdxl.arch.keymap_rules import inverse

CLIP_INNER = re.compile(
    r"embeddings\.(token_embedding|position_embedding)\.weight"
    r"|encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|layer_norm1|layer_norm2|mlp\.fc1|mlp\.fc2)\.(weight|bias)"
    r"|final_layer_norm\.(weight|bias)"
)
POSITION_IDS = "embeddings.position_ids"


def clip_l_to_diffusers(name: str, style: str) -> str | None:
    inner = name[len("text_model.") :] if name.startswith("text_model.") else name
    if not CLIP_INNER.fullmatch(inner):
        return None
    return inner if style == "flat" else "text_model." + inner


_OPEN_CLIP_FIXED = {
    "token_embedding.weight": "embeddings.token_embedding.weight",
    "positional_embedding": "embeddings.position_embedding.weight",
    "ln_final.weight": "final_layer_norm.weight",
    "ln_final.bias": "final_layer_norm.bias",
}
_OPEN_CLIP_FIXED_REV = inverse(_OPEN_CLIP_FIXED)
_RESBLOCK = {
    "attn.out_proj": "self_attn.out_proj",
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
_RESBLOCK_REV = inverse(_RESBLOCK)
_RESBLOCK_LDM = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)")
_IN_PROJ = re.compile(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)")
_LAYER_DIFF = re.compile(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)")
_QKV = {"q_proj": "qkv0", "k_proj": "qkv1", "v_proj": "qkv2"}


def open_clip_to_diffusers(name: str) -> list[tuple[str, str]] | None:
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


def open_clip_to_ldm(name: str) -> tuple[str, str] | None:
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
