"""Addresses of recipe parameters, as `grid --x` and searches name them (torch-free, no recipe needed to parse).

    STEP.PARAM                  a whole parameter: a number, an MBW vector, a preset
    STEP.PARAM[IN04]            one block of a block-weighted parameter (the rest of the vector is kept)
    STEP.PARAM[OUT00..OUT02]    an inclusive range of blocks (`MID`/`M`/`M00`, `in4`/`IN04` are the same)
    STEP.coef[2]                the 2nd number written in a formula step (counted from 1, in reading order)
    STEP.coef[base8]            the number multiplying the term that holds the name `base8`
    STEP.strength               a LoRA step's strength (`te_strength`, `blocks` likewise; every adapter of it)

    >>> parse_address("output.alpha[OUT00..OUT02]")
    ParamAddress(step='output', param='alpha', blocks=BlockRange(first='OUT00', last='OUT02'), coef=None)

`recipe.edit.set_value` applies a value at an address to a `Recipe`. Block names are checked against the
architecture there; here only their spelling is.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mergekit_sdxl.errors import UsageError
from mergekit_sdxl.recipe.formula import NAME_PATTERN

COEF = "coef"  # the pseudo-parameter of formula steps
_ADDRESS = re.compile(rf"^\s*({NAME_PATTERN})\.({NAME_PATTERN})\s*(?:\[\s*([^\[\]]*?)\s*\])?\s*$")
_BLOCK = re.compile(r"^(BASE|VAE|MID|M|IN|OUT)(\d*)$")
_NAME = re.compile(rf"^{NAME_PATTERN}$")
EXAMPLES = "output.alpha, output.alpha[IN04], output.alpha[OUT00..OUT02], rev2.coef[2], lora.strength"


@dataclass(frozen=True)
class BlockRange:
    """An inclusive run of MBW/LBW blocks in vector order; `first == last` for a single block."""

    first: str
    last: str

    @property
    def single(self) -> bool:
        return self.first == self.last

    def __str__(self) -> str:
        return self.first if self.single else f"{self.first}..{self.last}"


@dataclass(frozen=True)
class ParamAddress:
    """Where a value goes in a recipe: a step's parameter, optionally one block range or one formula number.

    `coef` is set only for `param == "coef"`: an int (1-based position) or a str (a model/step name).
    """

    step: str
    param: str
    blocks: BlockRange | None = None
    coef: int | str | None = None

    def __str__(self) -> str:
        if self.blocks is not None:
            return f"{self.step}.{self.param}[{self.blocks}]"
        if self.coef is not None:
            return f"{self.step}.{self.param}[{self.coef}]"
        return f"{self.step}.{self.param}"


def parse_address(text: str) -> ParamAddress:
    """Parse `STEP.PARAM`, `STEP.PARAM[BLOCK]`, `STEP.PARAM[FIRST..LAST]`, `STEP.coef[N]` or `STEP.coef[NAME]`.

    Raises:
        UsageError: naming the text and showing the accepted forms.
    """
    match = _ADDRESS.match(text)
    if match is None:
        raise UsageError(f"{text!r} is not a recipe parameter; expected STEP.PARAM, STEP.PARAM[IN04], "
                         f"STEP.PARAM[OUT00..OUT02] or STEP.coef[N] (e.g. {EXAMPLES})")
    step, param, selector = match.groups()
    if selector is None:
        return ParamAddress(step, param)
    if not selector:
        raise UsageError(f"{text!r}: empty [] ; give a block (IN04), a range (OUT00..OUT02) or, for coef, a number")
    if param == COEF:
        return ParamAddress(step, param, coef=_coef(text, selector))
    return ParamAddress(step, param, blocks=parse_blocks(selector, text))


def parse_blocks(selector: str, where: str = "") -> BlockRange:
    """`IN04` -> BlockRange(IN04, IN04); `OUT00..OUT02` -> BlockRange(OUT00, OUT02); names canonicalised."""
    first, dots, last = selector.partition("..")
    if not dots:
        name = canonical_block(selector, where)
        return BlockRange(name, name)
    return BlockRange(canonical_block(first, where), canonical_block(last, where))


def canonical_block(label: str, where: str = "") -> str:
    """`in4` / `IN04` -> IN04, `MID` / `M` / `M00` -> M00, `base` -> BASE, `vae` -> VAE; UsageError otherwise."""
    match = _BLOCK.match(label.strip().upper())
    if match:
        kind, digits = match.groups()
        if kind in ("MID", "M") and digits in ("", "0", "00"):
            return "M00"
        if kind in ("IN", "OUT") and digits and int(digits) < 100:
            return f"{kind}{int(digits):02d}"
        if kind in ("BASE", "VAE") and not digits:
            return kind
    prefix = f"{where}: " if where else ""
    raise UsageError(f"{prefix}{label.strip()!r} is not a block name (BASE, IN00.., M00 or MID, OUT00.., VAE)")


def _coef(text: str, selector: str) -> int | str:
    if selector.isdigit():
        position = int(selector)
        if position < 1:
            raise UsageError(f"{text!r}: numbers in a formula are counted from 1 (coef[1] is the first)")
        return position
    if _NAME.match(selector):
        return selector
    raise UsageError(f"{text!r}: coef[...] takes a position (coef[2]) or a model/step name (coef[base8])")
