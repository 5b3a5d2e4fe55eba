"""LoRA Block Weight: the vectors of the `sd-webui-lora-block-weight` extension (hako-mikan), read as it reads them.

A vector lists one weight per *position*; each layout names the blocks its positions stand for:

- 17 values (SD1 LoRA): BASE, IN01, IN02, IN04, IN05, IN07, IN08, M00, OUT03..OUT11
- 12 values (SDXL LoRA): BASE, IN04, IN05, IN07, IN08, M00, OUT00..OUT05
- 20 values (SDXL LyCORIS/LoCon): BASE, IN00..IN08, M00, OUT00..OUT08
- 26 values (SD1 LyCORIS): BASE, IN00..IN11, M00, OUT00..OUT11

As in the extension, blocks a layout leaves out get weight 0 (its `to26`), and the layouts are not tied to an
architecture: a block is matched by its number, so a 17-value vector on an SDXL LoRA sets IN04 from its 4th
value and gives OUT00..OUT02 (not in the 17 layout) weight 0.

Key -> block (the extension's substring match on A1111's module names, written for checkpoint keys):
text-encoder layers (`...encoder.layers.N.`, `...transformer.resblocks.N.`) -> BASE;
`model.diffusion_model.input_blocks.N.` -> IN{N}; `middle_block.` -> M00; `output_blocks.N.` -> OUT{N}. Every
other key (`time_embed`, `label_emb`, `out.`, text embeddings and final norms) is not a block: its change keeps
the adapter's plain strength (the extension's ratio 1).

Presets are the extension's default table (17-value vectors; names are case-sensitive, as there). Its random
(`R`, `U`) and dynamic (`X`) values are refused: a preview must be reproducible.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mergekit_sdxl.arch.blocks import DEFAULT_CONVENTION, block_of
from mergekit_sdxl.arch.registry import SPECS
from mergekit_sdxl.arch.tables import check_arch
from mergekit_sdxl.errors import RecipeError

BLOCKS26: tuple[str, ...] = ("BASE", *(f"IN{i:02d}" for i in range(12)), "M00", *(f"OUT{i:02d}" for i in range(12)))
LAYOUTS: dict[int, tuple[str, ...]] = {
    12: ("BASE", "IN04", "IN05", "IN07", "IN08", "M00", "OUT00", "OUT01", "OUT02", "OUT03", "OUT04", "OUT05"),
    17: ("BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00", *(f"OUT{i:02d}" for i in range(3, 12))),
    20: ("BASE", *(f"IN{i:02d}" for i in range(9)), "M00", *(f"OUT{i:02d}" for i in range(9))),
    26: BLOCKS26,
}
# the layout that covers a plain (attention-only) LoRA of each arch
LAYOUT_FOR_ARCH = {spec.id: spec.blocks.lbw_layout for spec in SPECS.values()}


def _preset(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(","))


# The extension's DEF_WEIGHT_PRESET (scripts/lora_block_weight.py), 17-value layout, in its order.
PRESETS: dict[str, tuple[float, ...]] = {
    "NONE": _preset("0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0"),
    "ALL": _preset("1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1"),
    "INS": _preset("1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0"),
    "IND": _preset("1,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0,0"),
    "INALL": _preset("1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0"),
    "MIDD": _preset("1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0"),
    "OUTD": _preset("1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0"),
    "OUTS": _preset("1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1"),
    "OUTALL": _preset("1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1"),
    "ALL0.5": _preset("0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5"),
}
LBW_PREFIX = "lbw="  # forces LBW reading of a `blocks` value (e.g. 20 or 26 values, which MBW reads too)

# A1111 names text-encoder modules `transformer_text_model_encoder_...` (CLIP-L) and `1_model_transformer_resblocks_...`
# (OpenCLIP-G); the extension's "encoder" / "transformer_resblocks" substrings pick only those, not the embeddings,
# final norms or projection.
_TEXT = re.compile(r"^(cond_stage_model|conditioner\.embedders)\..*\.(encoder|transformer\.resblocks)\.")
_INPUT = re.compile(r"^model\.diffusion_model\.input_blocks\.(\d+)\.")
_OUTPUT = re.compile(r"^model\.diffusion_model\.output_blocks\.(\d+)\.")
_MIDDLE = "model.diffusion_model.middle_block."
_WORD = re.compile(r"^[A-Za-z][\w.*/+-]*$")


def lbw_block(key: str) -> str | None:
    """The LBW block of a checkpoint key (BASE, IN04, M00, OUT03, ...), or None: the key's change is not scaled."""
    if _TEXT.match(key):
        return "BASE"
    if key.startswith(_MIDDLE):
        return "M00"
    for prefix, pattern in (("IN", _INPUT), ("OUT", _OUTPUT)):
        match = pattern.match(key)
        if match:
            return f"{prefix}{int(match.group(1)):02d}"
    return None


def parse_lbw(value: Any, where: str = "lbw") -> dict[str, float]:
    """An LBW vector (12/17/20/26 numbers, as a list or comma string, or a preset name) -> {block: weight}.

    Returns all 26 blocks of `BLOCKS26`; blocks the layout leaves out are 0, as in the extension.

    Raises:
        RecipeError: naming `where`, for other lengths, unknown presets, random/dynamic values, non-numbers.
    """
    if isinstance(value, str):
        text = value.strip()
        if text.startswith(LBW_PREFIX):
            text = text[len(LBW_PREFIX):].strip()
        if text in PRESETS:
            value = list(PRESETS[text])
        elif "," not in text and text and not _is_number(text):
            raise RecipeError(f"{where}: unknown LoRA Block Weight preset {text!r}; presets: {', '.join(PRESETS)} "
                              "(case-sensitive), or 12/17/20/26 numbers")
        else:
            value = [part.strip() for part in text.split(",")]
    if not isinstance(value, Sequence) or isinstance(value, str):
        raise RecipeError(f"{where}: expected a LoRA Block Weight vector (12, 17, 20 or 26 numbers) or a preset, "
                          f"got {type(value).__name__}")
    names = LAYOUTS.get(len(value))
    if names is None:
        raise RecipeError(f"{where}: {len(value)} values; a LoRA Block Weight vector has 12 (SDXL: "
                          f"{', '.join(LAYOUTS[12])}), 17 (SD1: {', '.join(LAYOUTS[17])}), 20 or 26")
    weights = dict.fromkeys(BLOCKS26, 0.0)
    for i, (name, item) in enumerate(zip(names, value)):
        weights[name] = _weight(item, where, i + 1, name)
    return weights


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _weight(item: Any, where: str, position: int, name: str) -> float:
    if isinstance(item, str) and item.strip()[:1] in ("R", "U", "X"):
        raise RecipeError(f"{where}: value {position} ({name}) is {item.strip()!r}; the extension's random (R, U) "
                          "and dynamic (X) values are not supported (previews must be reproducible): give a number")
    if isinstance(item, bool):
        raise RecipeError(f"{where}: value {position} ({name}) is {item!r}, not a number")
    try:
        number = float(item)
    except (TypeError, ValueError):
        raise RecipeError(f"{where}: value {position} ({name}) is {item!r}, not a number") from None
    if not math.isfinite(number):
        raise RecipeError(f"{where}: value {position} ({name}) is {item!r}; weights must be finite")
    return number


def is_lbw(value: Any) -> bool:
    """Whether an adapter's `blocks` value is read as LBW: an `lbw=` string, an LBW preset, or 12 / 17 values
    (lengths MBW has not); 20 / 26 values, MBW presets and named forms stay MBW vectors."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith(LBW_PREFIX) or text in PRESETS:
            return True
        if ":" in text or "=" in text:
            return False
        return len([p for p in text.replace("\n", ",").split(",") if p.strip()]) in (12, 17)
    return isinstance(value, Sequence) and len(value) in (12, 17)


@dataclass(frozen=True)
class BlockScale:
    """Per-key factors of an adapter's block weights: LBW (`rule` "lbw") or MBW under a block convention."""

    rule: str
    weights: Mapping[str, float]
    arch: str

    def factor(self, key: str, is_text: bool = False) -> float:
        """The multiplier of the adapter's change to checkpoint `key` (1.0 where no block applies)."""
        if self.rule == "lbw":
            block = lbw_block(key)
        else:
            block = "BASE" if is_text else block_of(key, self.arch, self.rule)
        return 1.0 if block is None else self.weights.get(block, 1.0)


def adapter_blocks(value: Any, arch: str, convention: str = DEFAULT_CONVENTION, where: str = "blocks") -> BlockScale:
    """Read an adapter's `blocks` value: LBW when `is_lbw(value)`, else an MBW vector (see `arch.mbw`)."""
    from mergekit_sdxl.arch.mbw import PRESETS as MBW_PRESETS
    from mergekit_sdxl.arch.mbw import parse_mbw

    check_arch(arch)
    if is_lbw(value):
        return BlockScale("lbw", parse_lbw(value, where), arch)
    if isinstance(value, str) and _WORD.match(value.strip()) and value.strip().upper() not in MBW_PRESETS:
        raise RecipeError(f"{where}: unknown preset {value.strip()!r}; LoRA Block Weight presets: "
                          f"{', '.join(PRESETS)} (case-sensitive); MBW presets: {', '.join(MBW_PRESETS)}")
    return BlockScale(convention, parse_mbw(value, arch, convention, where=where), arch)


def check_adapter_blocks(value: Any, convention: str = DEFAULT_CONVENTION, arch: str | None = None,
                         where: str = "blocks") -> None:
    """Validate an adapter's `blocks` value for `arch`, or for some architecture when it is not known yet."""
    from mergekit_sdxl.arch.tables import ARCHS

    errors: list[RecipeError] = []
    for candidate in (arch,) if arch else ARCHS:
        try:
            adapter_blocks(value, candidate, convention, where)
            return
        except RecipeError as exc:
            errors.append(exc)
    raise errors[0]
