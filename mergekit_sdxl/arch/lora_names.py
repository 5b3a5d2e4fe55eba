"""LoRA module names <-> checkpoint keys, per architecture (torch-free, selection by state-dict key only).

Every weight-bearing module of the UNet and the text encoders of a single-file checkpoint becomes one
`LoraModule`: the kohya name we write (`lora_unet_input_blocks_4_1_proj_in` on SDXL, diffusers paths such as
`lora_unet_down_blocks_0_attentions_0_proj_in` on SD1.x), the checkpoint key it changes, the peft/diffusers
module path, and the preset group that selects it for extraction:

- `attn`: the Linear layers of every transformer block (attn1/attn2 q/k/v/out, ff) plus `proj_in`/`proj_out`
  (Linear on SDXL, 1x1 conv on SD1.x), and the text encoders' attention and MLP Linear layers. This is kohya's
  default module set: SDXL UNet 722, te1 72, te2 192; SD1.x UNet 192, te 72.
- `conv`: what kohya adds with conv_dim: every Conv2d/Linear of ResnetBlock2D (conv1, conv2, time_emb_proj,
  conv_shortcut), Downsample2D and Upsample2D. `attn+conv`: SDXL UNet 788, SD1.x 278.
- `other`: the remaining UNet Linear/conv layers (time and label embeddings, conv_in, conv_out); preset `all`.
- `""`: norms, embeddings, `text_projection`: never extracted, but readable (LyCORIS `w_norm`, `diff`).

The underscore join is not reversible, so readers look names up in `name_index`, built from the known keys.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mergekit_sdxl.arch.keymap import map_ldm_key
from mergekit_sdxl.arch.registry import SPECS, arch_spec
from mergekit_sdxl.arch.tables import check_arch, key_table
from mergekit_sdxl.errors import ArchError

PRESETS: tuple[str, ...] = ("attn", "attn+conv", "all")
PRESET_GROUPS: dict[str, frozenset[str]] = {
    "attn": frozenset({"attn"}),
    "attn+conv": frozenset({"attn", "conv"}),
    "all": frozenset({"attn", "conv", "other"}),
}
# component -> (checkpoint key prefix, kohya name prefix, peft/diffusers prefix), from `ArchSpec.lora_prefixes`
PREFIXES: dict[str, Mapping[str, tuple[str, str, str]]] = {spec.id: spec.lora_prefixes for spec in SPECS.values()}
TEXT_COMPONENTS = frozenset({"clip_l", "clip_g"})

_TRANSFORMER = re.compile(
    r"^(input_blocks\.\d+\.1|middle_block\.1|output_blocks\.\d+\.1)\.(proj_in|proj_out|transformer_blocks\.\d+\."
    r"(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.0\.proj|ff\.net\.2))$"
)
_CONV = re.compile(
    r"^((input_blocks|output_blocks)\.\d+\.0|middle_block\.[02])\.(in_layers\.2|out_layers\.3|emb_layers\.1|skip_connection)$"
    r"|^input_blocks\.\d+\.0\.op$|^output_blocks\.\d+\.\d+\.conv$"
)
_TEXT_LINEAR = re.compile(r"^text_model\.encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])$")
_QKV = ("q_proj", "k_proj", "v_proj")


@dataclass(frozen=True)
class LoraModule:
    """One module a LoRA can change.

    `key` is the checkpoint tensor the module's ΔW adds to; `part` (0, 1, 2) selects the q/k/v rows of a fused
    `in_proj_weight` (-1 otherwise); `transpose` is True where the checkpoint stores the transpose of the
    module's weight (OpenCLIP `text_projection`). `shape` is the module's own weight shape (the slice, in the
    module's layout). `bias_key` is the checkpoint bias (`diff_b`, `b_norm`), sliced the same way.
    """

    name: str
    key: str
    shape: tuple[int, ...]
    component: str
    group: str
    diffusers: str
    aliases: tuple[str, ...] = ()
    bias_key: str | None = None
    part: int = -1
    transpose: bool = False

    @property
    def is_conv(self) -> bool:
        """True for Conv2d modules (4-D weights)."""
        return len(self.shape) == 4

    @property
    def is_text(self) -> bool:
        """True for text-encoder modules."""
        return self.component in TEXT_COMPONENTS

    def rows(self) -> tuple[int, int] | None:
        """The row range of the fused checkpoint tensor this module covers, or None when it owns the whole key."""
        if self.part < 0:
            return None
        return self.part * self.shape[0], (self.part + 1) * self.shape[0]


def lora_modules(arch: str, shapes: Mapping[str, Sequence[int]] | None = None) -> tuple[LoraModule, ...]:
    """Every LoRA-addressable module of a checkpoint of `arch`, sorted by name.

    `shapes` maps checkpoint key -> shape (a file's header); default: the architecture's full key table.
    """
    check_arch(arch)
    if shapes is None:
        return _table_modules(arch)
    return _build(arch, {key: tuple(int(d) for d in shape) for key, shape in shapes.items()})


@functools.cache
def _table_modules(arch: str) -> tuple[LoraModule, ...]:
    return _build(arch, {key: info.shape for key, info in key_table(arch).items()})


def select(modules: Iterable[LoraModule], preset: str, components: Iterable[str] | None = None) -> list[LoraModule]:
    """The modules a preset extracts (`attn`, `attn+conv`, `all`), optionally only from some components."""
    if preset not in PRESET_GROUPS:
        raise ArchError(f"unknown LoRA preset {preset!r}; known: {', '.join(PRESETS)}")
    groups = PRESET_GROUPS[preset]
    wanted = None if components is None else set(components)
    return [m for m in modules if m.group in groups and (wanted is None or m.component in wanted)]


def count_by_component(modules: Iterable[LoraModule]) -> dict[str, int]:
    """Number of modules per component (`unet`, `clip_l`, `clip_g`)."""
    counts: dict[str, int] = {}
    for module in modules:
        counts[module.component] = counts.get(module.component, 0) + 1
    return counts


def name_index(modules: Iterable[LoraModule]) -> dict[str, LoraModule]:
    """Normalised name -> module, for the written name and every alias (see `normalize_name`)."""
    index: dict[str, LoraModule] = {}
    for module in modules:
        for name in (module.name, *module.aliases):
            index.setdefault(name, module)
    return index


def normalize_name(raw: str, arch: str) -> str:
    """An adapter's module name in kohya's underscore form.

    Accepts kohya names (`lora_unet_...`, `lora_te1_...`) and peft/diffusers module paths
    (`unet.down_blocks.0...`, `text_encoder_2.text_model...`, optionally under `base_model.model.`).
    """
    name = raw.removeprefix("base_model.model.")
    if name.startswith("lora_"):
        return name.replace(".", "_")
    head, _, rest = name.partition(".")
    for _, kohya, peft in PREFIXES[check_arch(arch)].values():
        if head == peft:
            return f"{kohya}_{rest.replace('.', '_')}"
    return name.replace(".", "_")


def _build(arch: str, shapes: dict[str, tuple[int, ...]]) -> tuple[LoraModule, ...]:
    modules: list[LoraModule] = []
    for component, (ckpt_prefix, kohya, peft) in PREFIXES[arch].items():
        for key in sorted(k for k in shapes if k.startswith(ckpt_prefix)):
            local = key[len(ckpt_prefix):]
            if component == "unet":
                modules += _unet_module(arch, key, local, shapes, kohya, peft)
            elif component == "clip_g":
                modules += _openclip_modules(key, local, shapes, kohya, peft)
            else:
                modules += _hf_text_module(component, key, local, shapes, kohya, peft)
    return tuple(sorted(modules, key=lambda m: m.name))


def _bias(key: str, shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    bias = key.removesuffix(".weight") + ".bias"
    return bias if bias in shapes and bias != key else None


def _unet_module(arch: str, key: str, local: str, shapes: Mapping[str, tuple[int, ...]], kohya: str,
                 peft: str) -> list[LoraModule]:
    if not local.endswith(".weight"):
        return []
    path = local.removesuffix(".weight")
    shape = shapes[key]
    diffusers = _unet_diffusers(arch, key)
    sgm_name = f"{kohya}_{path.replace('.', '_')}"
    diff_name = f"{kohya}_{diffusers.replace('.', '_')}"
    sgm = arch_spec(arch).lora_unet_names == "sgm"
    name, other = (sgm_name, diff_name) if sgm else (diff_name, sgm_name)
    aliases = () if other == name else (other,)
    return [LoraModule(name=name, key=key, shape=shape, component="unet", group=_unet_group(path, shape),
                       diffusers=f"{peft}.{diffusers}", aliases=aliases, bias_key=_bias(key, shapes))]


def _unet_diffusers(arch: str, key: str) -> str:
    """The diffusers module path of a UNet weight key (through arch/keymap.py; raw LDM path if it has none)."""
    found = map_ldm_key(arch, key)
    if not found:
        return key.removeprefix("model.diffusion_model.").removesuffix(".weight")
    return found[0].diffusers.removesuffix(".weight")


def _unet_group(path: str, shape: tuple[int, ...]) -> str:
    if len(shape) not in (2, 4):
        return ""
    if _TRANSFORMER.match(path):
        return "attn"
    if _CONV.match(path):
        return "conv"
    return "other"


def _hf_text_module(component: str, key: str, local: str, shapes: Mapping[str, tuple[int, ...]], kohya: str,
                    peft: str) -> list[LoraModule]:
    if not local.endswith(".weight"):
        return []
    path = local.removesuffix(".weight")
    if not path.startswith("text_model."):
        path = "text_model." + path  # transformers < 4.0 SD1 layout
    shape = shapes[key]
    group = "attn" if _TEXT_LINEAR.match(path) and len(shape) == 2 else ""
    return [LoraModule(name=f"{kohya}_{path.replace('.', '_')}", key=key, shape=shape, component=component,
                       group=group, diffusers=f"{peft}.{path}", bias_key=_bias(key, shapes))]


_OPENCLIP_LAYER = re.compile(r"^transformer\.resblocks\.(\d+)\.(.+)$")
_OPENCLIP_RENAMES = {
    "attn.out_proj": "self_attn.out_proj",
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
_OPENCLIP_TOP = {
    "token_embedding.weight": "text_model.embeddings.token_embedding",
    "positional_embedding": "text_model.embeddings.position_embedding",
    "ln_final.weight": "text_model.final_layer_norm",
    "text_projection": "text_projection",
}


def _openclip_modules(key: str, local: str, shapes: Mapping[str, tuple[int, ...]], kohya: str,
                      peft: str) -> list[LoraModule]:
    """OpenCLIP-bigG keys under HF CLIPTextModelWithProjection names (what kohya and diffusers use)."""
    shape = shapes[key]

    def make(path: str, shape: tuple[int, ...], group: str = "", **kw: Any) -> LoraModule:  # kw: LoraModule fields
        return LoraModule(name=f"{kohya}_{path.replace('.', '_')}", key=key, shape=shape, component="clip_g",
                          group=group, diffusers=f"{peft}.{path}", **kw)

    if local in _OPENCLIP_TOP:
        path = _OPENCLIP_TOP[local]
        if local == "text_projection":
            return [make(path, (shape[1], shape[0]), transpose=True)]
        return [make(path, shape, bias_key=_bias(key, shapes) if local.endswith(".weight") else None)]
    match = _OPENCLIP_LAYER.match(local)
    if not match:
        return []
    layer, rest = match.groups()
    base = f"text_model.encoder.layers.{layer}"
    if rest == "attn.in_proj_weight":
        bias = key.removesuffix("_weight") + "_bias"
        bias_key = bias if bias in shapes else None
        rows = shape[0] // 3
        return [make(f"{base}.self_attn.{name}", (rows, *shape[1:]), "attn", bias_key=bias_key, part=i)
                for i, name in enumerate(_QKV)]
    if not rest.endswith(".weight"):
        return []
    inner = rest.removesuffix(".weight")
    if inner not in _OPENCLIP_RENAMES:
        return []
    path = f"{base}.{_OPENCLIP_RENAMES[inner]}"
    group = "attn" if _TEXT_LINEAR.match(path) and len(shape) == 2 else ""
    return [make(path, shape, group, bias_key=_bias(key, shapes))]


def adapter_arch_from_keys(keys: Iterable[str]) -> str | None:
    """The architecture an adapter's key names reveal (text-encoder prefixes such as `lora_te1_` / `lora_te_`, or
    peft names such as `text_encoder_2.`), None when they fit every architecture (e.g. only the UNet)."""
    keys = list(keys)
    names = {k.split(".", 1)[0] for k in keys}
    joined = " ".join(sorted(keys))
    for spec in SPECS.values():
        found = spec.detection
        if any(n.startswith(found.lora_prefixes) for n in names) or any(s in joined for s in found.lora_substrings):
            return spec.id
    return None


def arch_from_kohya_version(version: str) -> str | None:
    """The architecture of a kohya `ss_base_model_version` value, None when no spec writes it."""
    return next((spec.id for spec in SPECS.values() if spec.modelspec.kohya_base_version == version), None)


def arch_from_sgm_unet_names(names: Iterable[str]) -> str | None:
    """The architecture whose kohya UNet names follow the single-file layout (`lora_unet_input_blocks_...`), when
    `names` are such and exactly one architecture names them so; else None."""
    if not any(name.startswith("lora_unet_input_blocks_") for name in names):
        return None
    sgm = [spec.id for spec in SPECS.values() if spec.lora_unet_names == "sgm"]
    return sgm[0] if len(sgm) == 1 else None
