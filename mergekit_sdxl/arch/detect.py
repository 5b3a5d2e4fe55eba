"""Architecture detection from key names, and the key-level facts `inspect` and the planner need.

Everything here works on key names (and, for parameter counts, shapes and dtypes from a header):
no tensor data is ever read.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from mergekit_sdxl.arch.registry import ARCH_NAMES, SPECS, arch_spec
from mergekit_sdxl.arch.tables import COMPONENTS, key_table, mandatory_keys, numel
from mergekit_sdxl.dtypes import is_float_dtype
from mergekit_sdxl.errors import ArchError

# Any one of these keys identifies the architecture (the data: arch/registry.py).
FINGERPRINTS: dict[str, tuple[str, ...]] = {spec.id: spec.detection.fingerprints for spec in SPECS.values()}
# Files without any text encoder (UNet-only exports): (architecture, key) for those that can be told apart.
UNET_ONLY_FINGERPRINTS: tuple[tuple[str, str], ...] = tuple(
    (spec.id, spec.detection.unet_only) for spec in SPECS.values() if spec.detection.unet_only)
_TEXT_ENCODER_PREFIXES = ("conditioner.", "cond_stage_model.")  # roots of every known text conditioning
# Keys that flag how the model predicts (a merge must keep them).
MARKERS: tuple[str, ...] = ("v_pred", "ztsnr", "edm_vpred.sigma_max", "edm_vpred.sigma_min")
# Checkpoints saved with transformers < 4.0 lack the `text_model.` level under `ArchSpec.legacy_clip_prefix`
# (A1111 renames them on load).
_LEGACY_CLIP = ("embeddings.", "encoder.", "final_layer_norm.")
# Hints for files that are not a single-file SDXL / SD1 checkpoint: (key prefix, what it probably is).
_HINTS: tuple[tuple[str, str], ...] = (
    ("lora_unet_", "a LoRA/LyCORIS adapter (use bake or merge-lora)"),
    ("lora_te", "a LoRA/LyCORIS adapter (use bake or merge-lora)"),
    ("cond_stage_model.model.", "an SD 2.x checkpoint (OpenCLIP-H text encoder), which is not supported"),
    ("conditioner.embedders.0.model.", "an SDXL refiner (bigG as its only text encoder), which is not supported"),
    ("down_blocks.", "a diffusers-format UNet, not a single-file checkpoint"),
    ("text_model.", "a bare text encoder, not a full checkpoint"),
    ("encoder.down.", "a bare VAE, not a full checkpoint"),
    ("decoder.up.", "a bare VAE, not a full checkpoint"),
)


def detect_arch(keys: Iterable[str], source: str = "checkpoint") -> str:
    """Return the architecture id from fingerprint keys; ArchError naming `source` and what was looked for."""
    present = set(keys)
    found = [spec.id for spec in SPECS.values() if any(key in present for key in spec.detection.fingerprints)]
    if not found and not any(key.startswith(_TEXT_ENCODER_PREFIXES) for key in present):
        found = [spec.id for spec in SPECS.values() if spec.detection.unet_only in present]
    found = _by_markers(found, present)
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        raise ArchError(f"{source}: has fingerprint keys of both {' and '.join(ARCH_NAMES[a] for a in found)}; "
                        "is it a corrupted merge?")
    looked = "; ".join(f"{ARCH_NAMES[arch]}: {' or '.join(prints)}" for arch, prints in FINGERPRINTS.items())
    looked += "".join(f"; UNet-only {ARCH_NAMES[arch]}: {key}" for arch, key in UNET_ONLY_FINGERPRINTS)
    message = f"{source}: unknown architecture: none of the fingerprint keys was found ({looked})"
    hint = _hint(present)
    if hint:
        message += f"; it looks like {hint}"
    elif not present:
        message += "; the file has no tensors"
    raise ArchError(message)


def _by_markers(found: list[str], present: set[str]) -> list[str]:
    """Of the candidate architectures, those whose marker keys are all present and most numerous (a v-prediction
    variant beats its base when the file has `v_pred`, and drops out when it has not)."""
    markers = {arch: SPECS[arch].detection.markers for arch in found}
    fitting = [arch for arch in found if all(key in present for key in markers[arch])]
    most = max((len(markers[arch]) for arch in fitting), default=0)
    return [arch for arch in fitting if len(markers[arch]) == most]


def _hint(keys: set[str]) -> str | None:
    for prefix, what in _HINTS:
        if any(key.startswith(prefix) for key in keys):
            return what
    return None


def component_of(key: str, arch: str) -> str:
    """The component of `key` ("unet", "clip_l", "clip_g", "vae", "ema" or "other"), from its prefix.

    Agrees with the key table for every key in it, and works for keys that are not in it.
    """
    if key in MARKERS:
        return "unet"
    for prefix, component in arch_spec(arch).components:
        if key.startswith(prefix):
            return component
    return "other"


def canonical_key(key: str, arch: str) -> str:
    """`key` in the layout of the key table: renames the pre-`text_model.` SD1 CLIP layout, else unchanged."""
    legacy = arch_spec(arch).legacy_clip_prefix
    if legacy and key.startswith(legacy):
        rest = key[len(legacy):]
        if rest.startswith(_LEGACY_CLIP):
            return f"{legacy}text_model.{rest}"
    return key


def markers(keys: Iterable[str]) -> list[str]:
    """The marker keys (`v_pred`, `ztsnr`, `edm_vpred.*`) present among `keys`, in MARKERS order."""
    present = set(keys)
    return [marker for marker in MARKERS if marker in present]


def missing_mandatory(keys: Iterable[str], arch: str) -> list[str]:
    """Sorted mandatory keys of `arch` that `keys` lacks (legacy CLIP names count as present)."""
    present = {canonical_key(key, arch) for key in keys}
    return sorted(mandatory_keys(arch) - present)


def unknown_keys(keys: Iterable[str], arch: str) -> list[str]:
    """Sorted keys that are not in the key table of `arch` (after renaming legacy CLIP names)."""
    table = key_table(arch)
    return sorted(key for key in keys if canonical_key(key, arch) not in table)


def param_counts(infos: Mapping[str, Any], arch: str) -> dict[str, int]:
    """Floating-point parameter count per component, in COMPONENTS order, only components present.

    `infos` maps key -> anything with `.shape` and `.dtype` (a reader's tensor info, or a KeyInfo);
    integer tensors (`position_ids`, `v_pred`, `num_updates`) are not parameters and are not counted.
    """
    counts = dict.fromkeys(COMPONENTS, 0)
    seen = set()
    for key, info in infos.items():
        component = component_of(key, arch)
        seen.add(component)
        if is_float_dtype(str(info.dtype)):
            counts[component] += numel(info.shape)
    return {component: count for component, count in counts.items() if component in seen}
