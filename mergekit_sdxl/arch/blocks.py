"""Key -> MBW block, under each block convention users' recipes were made with (see conventions.md section 2).

`block_of` returns a block name ("BASE", "IN04", "M00", "OUT08", "VAE") or None, which means *keep A*: the
key is taken unchanged from the first model of the step, whatever the weights say.
"""

from __future__ import annotations

import functools
import re

from mergekit_sdxl.arch.tables import check_arch
from mergekit_sdxl.errors import ArchError

CONVENTIONS: tuple[str, ...] = ("supermerger", "supermerger-2023", "sd-mecha")
DEFAULT_CONVENTION = "supermerger"
KEEP_A = None  # what block_of returns for keys that are never merged

_DEPTH = {"sdxl": 9, "sd15": 12}  # IN / OUT blocks per architecture
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
    depth = _DEPTH[check_arch(arch)]
    names = ("BASE", *(f"IN{i:02d}" for i in range(depth)), "M00", *(f"OUT{i:02d}" for i in range(depth)))
    if check_convention(convention) == "sd-mecha" and arch == "sdxl":
        names += ("VAE",)
    return names


def block_of(key: str, arch: str, convention: str = DEFAULT_CONVENTION, *, in_all_inputs: bool = True) -> str | None:
    """The MBW block whose weight applies to `key`, or None (keep A). Rules are applied in the documented order.

    `in_all_inputs` is False when some input model of the step lacks the key (gate 1: keep A).
    """
    check_arch(arch)
    check_convention(convention)
    if not in_all_inputs or "model" not in key:
        return KEEP_A
    if "weight" not in key and "bias" not in key:
        return KEEP_A
    if "time_embed" in key or (arch == "sdxl" and "label_emb" in key):
        return _embed_block(arch, convention)
    if arch == "sdxl":
        if key.startswith("conditioner.embedders."):
            return "BASE"
        if key.startswith("first_stage_model."):
            return "VAE" if convention == "sd-mecha" else "BASE"
    if key.startswith("model.diffusion_model.out."):
        return f"OUT{_DEPTH[arch] - 1:02d}"
    matched, block = _unet_block(key, arch)
    if matched or arch == "sdxl":
        return block
    return "BASE"  # SD1: every other weight/bias key (text encoder, VAE, EMA) follows BASE


def _embed_block(arch: str, convention: str) -> str | None:
    """Where `time_embed` (and SDXL's `label_emb`) go under each convention."""
    if convention == "sd-mecha":
        return "BASE"
    if convention == "supermerger-2023":
        return KEEP_A if arch == "sdxl" else f"OUT{_DEPTH[arch] - 1:02d}"
    return "IN00"


def _unet_block(key: str, arch: str) -> tuple[bool, str | None]:
    """(whether a block regex matched, the block); an index beyond the architecture's blocks keeps A."""
    depth = _DEPTH[arch]
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
