"""Set a value at a `ParamAddress` in a `Recipe`, giving a new, validated Recipe (torch-free; the input is kept).

    variant = set_value(recipe, parse_address("output.alpha[IN04]"), "0.3", arch="sdxl")

Values are what a command line gives (strings) or what YAML holds (numbers, lists). The rules:
- `STEP.PARAM` replaces the whole parameter: a number becomes a constant, anything else an MBW vector (a list,
  `"0,0.1,..."`, a preset such as `GRAD_V`, a named form `"IN04:0.3,default:0"`); its regex overrides go too.
- `STEP.PARAM[BLOCKS]` sets only those blocks to a number and keeps the rest of the vector and the overrides (a
  constant parameter becomes a vector that is that constant elsewhere).
- `STEP.coef[N]` / `STEP.coef[NAME]` rewrites one number of a formula step; the formula is re-typed and must stay
  what it was (a weight stays a weight).
- LoRA steps take `strength`, `te_strength`, `blocks` (an LBW or MBW vector or preset) and `blocks[IN04]`, for
  every adapter of the step.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from mergekit_sdxl.arch.blocks import block_names
from mergekit_sdxl.arch.lbw import BLOCKS26, LBW_PREFIX, check_adapter_blocks, is_lbw, parse_lbw
from mergekit_sdxl.arch.mbw import parse_mbw, to_list
from mergekit_sdxl.arch.tables import ARCHS
from mergekit_sdxl.errors import MergekitError, RecipeError
from mergekit_sdxl.methods.registry import METHODS
from mergekit_sdxl.recipe.address import COEF, BlockRange, ParamAddress
from mergekit_sdxl.recipe.formula import Kind, Token, parse_formula, tokenize
from mergekit_sdxl.recipe.types import FormulaStep, LoraStep, MethodStep, Param, Recipe, Step

LORA_PARAMS = ("strength", "te_strength", "blocks")


def set_value(recipe: Recipe, address: ParamAddress, value: Any, arch: str | None = None) -> Recipe:
    """`recipe` with `value` at `address`; RecipeError naming the address when the recipe has no such place or the
    value does not fit it. `arch` (an architecture id, default the recipe's) is needed to edit blocks of a vector."""
    arch = arch or recipe.arch
    step = recipe.steps.get(address.step)
    if step is None:
        raise RecipeError(f"{address}: the recipe has no step {address.step!r} (steps: {', '.join(recipe.steps)})")
    if isinstance(step, FormulaStep):
        new: Step = _formula(recipe, step, address, value)
    elif isinstance(step, LoraStep):
        new = _lora(step, address, value, arch)
    else:
        new = _method(step, address, value, arch)
    return dataclasses.replace(recipe, steps={**recipe.steps, address.step: new})


def parameters_of(step: Step) -> tuple[str, ...]:
    """The parameter names an address may use on `step` (for error messages and search spaces)."""
    if isinstance(step, FormulaStep):
        return (COEF,)
    if isinstance(step, LoraStep):
        return LORA_PARAMS
    return tuple(p.name for p in step.params)


def formula_numbers(step: FormulaStep) -> list[tuple[float, frozenset[str]]]:
    """Each number written in a formula step, in order, with the names of the term it multiplies."""
    tokens = tokenize(step.formula.text)
    return [(float(tokens[i].text), _term_names(tokens, i)) for i, t in enumerate(tokens) if t.kind == "number"]


# ---------------------------------------------------------------------------------------------- method steps


def _method(step: MethodStep, address: ParamAddress, value: Any, arch: str | None) -> MethodStep:
    if address.coef is not None:
        raise RecipeError(f"{address}: coef[...] addresses numbers of formula steps; {step.name!r} is a "
                          f"{step.method} step (parameters: {', '.join(parameters_of(step)) or 'none'})")
    current = next((p for p in step.params if p.name == address.param), None)
    if current is None:
        current = _declared(step, address)
    where = f"{address}"
    if address.blocks is not None:
        new = _block_edit(current, address.blocks, value, where, step.convention, arch)
    else:
        new = _whole(current, value, where, step.convention, arch)
    params = tuple(new if p.name == address.param else p for p in step.params)
    if current not in step.params:
        params += (new,)
    return dataclasses.replace(step, params=params)


def _declared(step: MethodStep, address: ParamAddress) -> Param:
    """A parameter the method declares but the recipe leaves at its default (its value then comes from the value)."""
    spec = METHODS[step.method]
    if address.param not in spec.param_names:
        names = ", ".join(spec.param_names) or "none"
        raise RecipeError(f"{address}: step {step.name!r} ({step.method}) has no parameter {address.param!r} "
                          f"(parameters: {names})")
    kind = spec.param(address.param).type
    default = spec.param(address.param).default
    return Param(address.param, f"{step.name}.{address.param}", value=default if kind is not float else
                 (float(default) if default is not None else None))


def _whole(current: Param, value: Any, where: str, convention: str, arch: str | None) -> Param:
    kind = type(current.value) if current.value is not None and not current.block_weighted else float
    if kind in (bool, int, str):
        return Param(current.name, current.where, value=_typed(value, kind, where))
    number = _number(value)
    if number is not None:
        return Param(current.name, current.where, value=number)
    blocks = tuple(value) if isinstance(value, list) else value
    _check_mbw(blocks, where, convention, arch)
    return Param(current.name, current.where, blocks=blocks)


def _block_edit(current: Param, blocks: BlockRange, value: Any, where: str, convention: str,
                arch: str | None) -> Param:
    number = _required_number(value, where)
    if not current.block_weighted:
        if not isinstance(current.value, float):
            raise RecipeError(f"{where}: {current.name!r} is not a block-weighted number; [{blocks}] does not apply")
        spec: Any = {"default": current.value, str(blocks): number}
        _check_mbw(spec, where, convention, arch)
        return dataclasses.replace(current, blocks=spec, value=None)
    if arch is None:
        raise RecipeError(f"{where}: editing one block of a vector needs the architecture; set `arch:` in the "
                          "recipe")
    weights = parse_mbw(current.blocks, arch, convention, where=where)
    for name in _names_in(blocks, block_names(arch, convention), where):
        weights[name] = number
    return dataclasses.replace(current, blocks=tuple(to_list(weights, arch, convention)))


def _check_mbw(spec: Any, where: str, convention: str, arch: str | None) -> None:
    errors: list[MergekitError] = []
    for candidate in (arch,) if arch else ARCHS:
        try:
            parse_mbw(spec, candidate, convention, where=where)
            return
        except MergekitError as exc:
            errors.append(exc)
    raise RecipeError(str(errors[0])) from errors[0]


def _names_in(blocks: BlockRange, names: tuple[str, ...], where: str) -> list[str]:
    for name in (blocks.first, blocks.last):
        if name not in names:
            raise RecipeError(f"{where}: no block {name} here; the blocks are {', '.join(names)}")
    i, j = names.index(blocks.first), names.index(blocks.last)
    if i > j:
        raise RecipeError(f"{where}: range {blocks} runs backwards; write {blocks.last}..{blocks.first}")
    return list(names[i:j + 1])


# ------------------------------------------------------------------------------------------------ LoRA steps


def _lora(step: LoraStep, address: ParamAddress, value: Any, arch: str | None) -> LoraStep:
    if address.param not in LORA_PARAMS or address.coef is not None or (
            address.blocks is not None and address.param != "blocks"):
        raise RecipeError(f"{address}: a LoRA step takes {', '.join(LORA_PARAMS)} and blocks[IN04]; "
                          f"step {step.name!r} is a LoRA step")
    where = str(address)
    if address.param == "blocks":
        if address.blocks is None:
            new_blocks = _lora_blocks(value, where, step.convention, arch)
            return _each_adapter(step, lambda a: dataclasses.replace(a, blocks=new_blocks))
        number = _required_number(value, where)
        return _each_adapter(step, lambda a: dataclasses.replace(
            a, blocks=_lora_block_edit(a.blocks, address.blocks, number, where, step.convention, arch)))
    number = _required_number(value, where)
    return _each_adapter(step, lambda a: dataclasses.replace(a, **{address.param: number}))


def _each_adapter(step: LoraStep, change: Any) -> LoraStep:
    return dataclasses.replace(step, adapters=tuple(change(a) for a in step.adapters))


def _lora_blocks(value: Any, where: str, convention: str, arch: str | None) -> Any:
    blocks = list(value) if isinstance(value, (list, tuple)) else value
    check_adapter_blocks(blocks, convention, arch, where)
    return blocks


def _lora_block_edit(blocks: Any, selected: BlockRange, number: float, where: str, convention: str,
                     arch: str | None) -> Any:
    """LBW vectors (and adapters without blocks: all 1) edit as 26-value LBW vectors; MBW ones as MBW."""
    if blocks is None or is_lbw(blocks):
        weights = dict.fromkeys(BLOCKS26, 1.0) if blocks is None else parse_lbw(blocks, where)
        for name in _names_in(selected, BLOCKS26, where):
            weights[name] = number
        return LBW_PREFIX + ",".join(f"{w:g}" for w in weights.values())
    param = Param("blocks", where, blocks=blocks)
    return _block_edit(param, selected, number, where, convention, arch).blocks


# --------------------------------------------------------------------------------------------- formula steps


def _formula(recipe: Recipe, step: FormulaStep, address: ParamAddress, value: Any) -> FormulaStep:
    if address.param != COEF or address.coef is None:
        raise RecipeError(f"{address}: {step.name!r} is a formula step ({step.formula.text}); address its "
                          f"numbers as {step.name}.coef[N] (N from 1) or {step.name}.coef[NAME]")
    number = _required_number(value, str(address))
    tokens = tokenize(step.formula.text)
    index = _number_token(tokens, address, step)
    token = tokens[index]
    written = repr(number) if number >= 0 else f"({number!r})"
    text = step.formula.text[:token.pos] + written + step.formula.text[token.pos + len(token.text):]
    kinds: dict[str, Kind] = {**dict.fromkeys(recipe.models, "weight"),
                              **{n: s.kind for n, s in recipe.steps.items() if n != step.name}}
    try:
        formula = parse_formula(text, kinds)
    except RecipeError as exc:
        raise RecipeError(f"{address} = {value}: {exc}") from exc
    if formula.kind != step.kind:
        raise RecipeError(f"{address} = {value} turns step {step.name!r} from a {step.kind} into a {formula.kind}; "
                          "choose a value that keeps the model weights adding up as before")
    return dataclasses.replace(step, formula=formula)


def _number_token(tokens: list[Token], address: ParamAddress, step: FormulaStep) -> int:
    numbers = [i for i, t in enumerate(tokens) if t.kind == "number"]
    listing = "; ".join(f"coef[{n + 1}] = {tokens[i].text} (x {' '.join(sorted(_term_names(tokens, i))) or '-'})"
                        for n, i in enumerate(numbers)) or "none"
    if isinstance(address.coef, int):
        if address.coef > len(numbers):
            raise RecipeError(f"{address}: formula {step.formula.text!r} has {len(numbers)} number(s): {listing}")
        return numbers[address.coef - 1]
    found = [i for i in numbers if address.coef in _term_names(tokens, i)]
    if len(found) != 1:
        how = "no number multiplies" if not found else "several numbers multiply"
        raise RecipeError(f"{address}: {how} a term with {address.coef!r} in {step.formula.text!r}; "
                          f"use a position: {listing}")
    return found[0]


def _term_names(tokens: list[Token], index: int) -> frozenset[str]:
    """Names in the product (`a * (b - c) * 2`) that holds the token at `index`: scan both ways at depth 0 to the
    nearest binary + or - or an unmatched bracket."""
    names: set[str] = set()
    for step in (-1, 1):
        depth, i = 0, index + step
        while 0 <= i < len(tokens) and tokens[i].kind != "end":
            text = tokens[i].text
            opening, closing = ("(", ")") if step == 1 else (")", "(")
            if text == opening:
                depth += 1
            elif text == closing:
                if depth == 0:
                    break
                depth -= 1
            elif depth == 0 and text in "+-" and tokens[i].kind == "op" and _binary(tokens, i):
                break
            if tokens[i].kind == "name":
                names.add(text)
            i += step
    return frozenset(names)


def _binary(tokens: list[Token], i: int) -> bool:
    """A + or - after a name, number or `)` is binary; elsewhere it is a sign."""
    return i > 0 and (tokens[i - 1].kind in ("name", "number") or tokens[i - 1].text == ")")


# -------------------------------------------------------------------------------------------------- values


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            return None
    else:
        return None
    return number if math.isfinite(number) else None


def _required_number(value: Any, where: str) -> float:
    number = _number(value)
    if number is None:
        raise RecipeError(f"{where}: {value!r} is not a finite number")
    return number


def _typed(value: Any, kind: type, where: str) -> Any:
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    text = str(value).strip()
    if kind is bool and text.lower() in ("true", "false"):
        return text.lower() == "true"
    if kind is int:
        try:
            return int(text)
        except ValueError:
            pass
    if kind is str:
        return text
    raise RecipeError(f"{where}: {value!r} is not {'true/false' if kind is bool else 'a whole number'}")


def describe(value: Any) -> str:
    """A short label for a value (lists and mappings joined as users write them)."""
    if isinstance(value, Mapping):
        return ", ".join(f"{k}:{v}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


__all__ = ["LORA_PARAMS", "describe", "formula_numbers", "parameters_of", "set_value"]
