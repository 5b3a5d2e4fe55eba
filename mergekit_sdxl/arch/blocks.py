"""Key -> MBW block, under each block convention users' recipes were made with (see docs/conventions.md, section 2).

`block_of` returns a block name ("BASE", "IN04", "M00", "OUT08", "VAE") or None, which means *keep A*: the
key is taken unchanged from the first model of the step, whatever the weights say.
"""

from __future__ import annotations

import functools
import re

from mergekit_sdxl.arch.registry import arch_spec
from mergekit_sdxl.arch.spec import ArchSpec, BlockLayout
from mergekit_sdxl.errors import ArchError

CONVENTIONS: tuple[str, ...] = ("supermerger", "supermerger-2023", "sd-mecha")
DEFAULT_CONVENTION = "supermerger"
KEEP_A = None  # what block_of returns for keys that are never merged

_INPUT = re.compile(r"\.input_blocks\.(\d+)\.")
_MIDDLE = re.compile(r"\.middle_block\.")
_OUTPUT = re.compile(r"\.output_blocks\.(\d+)\.")


def check_convention(convention: str) -> str:
    """Return `convention` if known, else raise ArchError listing the known ones."""
    if convention not in CONVENTIONS:
        raise ArchError(f"unknown block convention {convention!r}; known: {', '.join(CONVENTIONS)}")
    return convention


@functools.cache
def block_names(arch: str, convention: str = DEFAULT_CONVENTION) -> tuple[str, ...]:
    """The blocks of an MBW vector in order: BASE, IN00.., M00, OUT00.. (+ VAE for sd-mecha on SDXL)."""
    layout = arch_spec(arch).blocks
    depth = layout.depth
    names = ("BASE", *(f"IN{i:02d}" for i in range(depth)), "M00", *(f"OUT{i:02d}" for i in range(depth)))
    if check_convention(convention) == "sd-mecha" and layout.mecha_vae_block:
        names += ("VAE",)
    return names


def block_of(key: str, arch: str, convention: str = DEFAULT_CONVENTION, *, in_all_inputs: bool = True) -> str | None:
    """The MBW block whose weight applies to `key`, or None (keep A). Rules are applied in the documented order.

    `in_all_inputs` is False when some input model of the step lacks the key (gate 1: keep A).
    """
    spec = arch_spec(arch)
    layout = spec.blocks
    check_convention(convention)
    if not in_all_inputs or "model" not in key:
        return KEEP_A
    if "weight" not in key and "bias" not in key:
        return KEEP_A
    if "time_embed" in key or (layout.adm_embed and "label_emb" in key):
        return _embed_block(layout, convention)
    if layout.parts_by_prefix:
        part = _part_block(key, spec, convention)
        if part:
            return part
    if key.startswith("model.diffusion_model.out."):
        return f"OUT{layout.depth - 1:02d}"
    matched, block = _unet_block(key, layout.depth)
    if matched or layout.parts_by_prefix:
        return block
    return "BASE"  # every other weight/bias key (text encoder, VAE, EMA) follows BASE


def _part_block(key: str, spec: ArchSpec, convention: str) -> str | None:
    """BASE for text-encoder keys; VAE (sd-mecha, when the layout has it) or BASE for VAE keys; else None."""
    component = next((c for prefix, c in spec.components if key.startswith(prefix)), None)
    if component in ("clip_l", "clip_g"):
        return "BASE"
    if component == "vae":
        return "VAE" if convention == "sd-mecha" and spec.blocks.mecha_vae_block else "BASE"
    return None


def _embed_block(layout: BlockLayout, convention: str) -> str | None:
    """Where `time_embed` (and SDXL's `label_emb`) go under each convention."""
    if convention == "sd-mecha":
        return "BASE"
    if convention == "supermerger-2023":
        return KEEP_A if layout.legacy_embed_keep_a else f"OUT{layout.depth - 1:02d}"
    return "IN00"


def _unet_block(key: str, depth: int) -> tuple[bool, str | None]:
    """(whether a block regex matched, the block); an index beyond the architecture's blocks keeps A."""
    match = _INPUT.search(key)
    if match:
        return True, _indexed("IN", int(match.group(1)), depth)
    if _MIDDLE.search(key):
        return True, "M00"
    match = _OUTPUT.search(key)
    if match:
        return True, _indexed("OUT", int(match.group(1)), depth)
    return False, None


def _indexed(prefix: str, index: int, depth: int) -> str | None:
    return f"{prefix}{index:02d}" if index < depth else KEEP_A
