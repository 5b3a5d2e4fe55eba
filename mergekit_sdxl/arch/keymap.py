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

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from mergekit_sdxl.arch.keymap_clip import (
    CLIP_INNER,
    POSITION_IDS,
    clip_l_to_diffusers,
    open_clip_to_diffusers,
    open_clip_to_ldm,
)
from mergekit_sdxl.arch.keymap_rules import (
    TEXT_ENCODER,
    TEXT_ENCODER_2,
    UNET,
    VAE,
    Layout,
    default_layout,
    unet_to_diffusers,
    unet_to_ldm,
    vae_to_diffusers,
    vae_to_ldm,
)
from mergekit_sdxl.arch.registry import SPECS
from mergekit_sdxl.arch.tables import check_arch
from mergekit_sdxl.errors import ArchError

__all__ = [
    "CLIP_L_STYLES", "OPS", "PREFIXES", "TABLE_COMPONENTS", "TEXT_ENCODER", "TEXT_ENCODER_2", "UNET", "VAE",
    "KeyMap", "KeyMapping", "Layout", "build_keymap", "build_reverse_keymap", "component_of", "default_layout",
    "map_diffusers_key", "map_ldm_key",
]
OPS = ("copy", "conv1x1_to_linear", "transpose", "qkv0", "qkv1", "qkv2")
CLIP_L_STYLES = ("flat", "text_model")

# architecture -> diffusers component -> single-file key prefix (the data: `ArchSpec.diffusers_prefixes`)
PREFIXES: dict[str, Mapping[str, str]] = {spec.id: spec.diffusers_prefixes for spec in SPECS.values()}
# the key tables' `component` names (arch/tables.py) for each diffusers component
TABLE_COMPONENTS = {UNET: "unet", VAE: "vae", TEXT_ENCODER: "clip_l", TEXT_ENCODER_2: "clip_g"}


@dataclass(frozen=True)
class KeyMapping:
    """LDM key `ldm` provides diffusers key `diffusers` of `component` through `op`."""

    ldm: str
    component: str
    diffusers: str
    op: str = "copy"


# ---------------------------------------------------------------------------------------------- public API

# keys inside a component prefix that have no diffusers tensor on purpose
_KNOWN_UNMAPPED = {
    TEXT_ENCODER: ("text_model.embeddings.position_ids", POSITION_IDS),
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
        d = unet_to_diffusers(inner, lay)
        found = None if d is None else [(d, "copy")]
    elif component == VAE:
        dv = vae_to_diffusers(inner, lay)
        found = None if dv is None else [dv]
    elif component == TEXT_ENCODER:
        d = clip_l_to_diffusers(inner, clip_l_style)
        found = None if d is None else [(d, "copy")]
    else:
        found = open_clip_to_diffusers(inner)
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
        d = unet_to_ldm(key, lay)
        found = None if d is None else (d, "copy")
    elif component == VAE:
        found = vae_to_ldm(key, lay)
    elif component == TEXT_ENCODER:
        inner = key[len("text_model.") :] if key.startswith("text_model.") else key
        if CLIP_INNER.fullmatch(inner) or inner == POSITION_IDS:
            found = ("text_model." + inner, "copy")
    else:
        found = open_clip_to_ldm(key)
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
        arch: an architecture id (arch/registry.py).
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
            elif key.endswith(POSITION_IDS):
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
