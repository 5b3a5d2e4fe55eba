"""Parameter addresses (`STEP.PARAM[IN04]`, `rev2.coef[2]`) and setting values in recipes through them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mergekit_sdxl.arch.mbw import parse_mbw
from mergekit_sdxl.errors import RecipeError, UsageError
from mergekit_sdxl.recipe.address import BlockRange, ParamAddress, canonical_block, parse_address
from mergekit_sdxl.recipe.edit import formula_numbers, parameters_of, set_value
from mergekit_sdxl.recipe.load import load_recipe
from mergekit_sdxl.recipe.parser import parse_recipe

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


@pytest.fixture(scope="module")
def rev2():
    return load_recipe(RECIPES / "kohaku_xl_gamma_rev2.yaml")


def _lora_recipe(blocks: str | None = None):
    step = {"lora": ["x.safetensors", "y.safetensors"], "model": "a"} | ({"blocks": blocks} if blocks else {})
    return parse_recipe({"models": {"a": "a.safetensors"}, "steps": {"out": step}})


@pytest.mark.parametrize(("text", "want"), [
    ("output.alpha", ParamAddress("output", "alpha")),
    (" output.alpha [ in4 ] ", ParamAddress("output", "alpha", BlockRange("IN04", "IN04"))),
    ("output.alpha[OUT00..OUT02]", ParamAddress("output", "alpha", BlockRange("OUT00", "OUT02"))),
    ("output.alpha[mid]", ParamAddress("output", "alpha", BlockRange("M00", "M00"))),
    ("rev2.coef[2]", ParamAddress("rev2", "coef", coef=2)),
    ("rev2.coef[base8]", ParamAddress("rev2", "coef", coef="base8")),
    ("lora.strength", ParamAddress("lora", "strength")),
])
def test_parse(text, want):
    assert parse_address(text) == want


@pytest.mark.parametrize("text", ["alpha", "output.", ".alpha", "out.alpha[IN04", "out.alpha[]", "out.alpha[X04]",
                                  "out.alpha[IN04..]", "rev2.coef[0]", "rev2.coef[1.5]", "a.b.c", "1a.alpha"])
def test_parse_errors_are_usage_errors(text):
    with pytest.raises(UsageError):
        parse_address(text)


@given(st.sampled_from(["IN", "OUT"]), st.integers(0, 11), st.sampled_from(["", "0", "00"]), st.booleans())
def test_str_round_trips(kind, number, pad, lower):
    label = f"{kind}{pad}{number}" if pad != "0" or number < 10 else f"{kind}{number}"
    label = label.lower() if lower else label
    address = parse_address(f"s.alpha[{label}..OUT11]")
    assert address.blocks.first == f"{kind}{number:02d}" == canonical_block(label)
    assert parse_address(str(address)) == address


def test_whole_parameter(rev2):
    flat = set_value(rev2, parse_address("output.alpha"), "0.5")
    [param] = flat.steps["output"].params
    assert param.value == 0.5 and param.blocks is None
    preset = set_value(rev2, parse_address("output.alpha"), "GRAD_V").steps["output"].params[0]
    assert preset.blocks == "GRAD_V"
    vector = set_value(rev2, parse_address("output.alpha"), ",".join(["0.2"] * 20)).steps["output"].params[0]
    assert parse_mbw(vector.blocks, "sdxl") == dict.fromkeys(parse_mbw(vector.blocks, "sdxl"), 0.2)
    assert rev2.steps["output"].params[0].blocks[5] == 0.1  # the input recipe is not changed
    with pytest.raises(RecipeError, match="expected 20"):
        set_value(rev2, parse_address("output.alpha"), "0,1,0")


def test_one_block_keeps_the_rest(rev2):
    before = parse_mbw(rev2.steps["output"].params[0].blocks, "sdxl", "supermerger-2023")
    after_recipe = set_value(rev2, parse_address("output.alpha[IN04]"), "0.9")
    after = parse_mbw(after_recipe.steps["output"].params[0].blocks, "sdxl", "supermerger-2023")
    assert after == {**before, "IN04": 0.9}
    ranged = set_value(rev2, parse_address("output.alpha[OUT00..OUT02]"), 1, arch="sdxl")
    weights = parse_mbw(ranged.steps["output"].params[0].blocks, "sdxl")
    assert [weights[b] for b in ("M00", "OUT00", "OUT01", "OUT02", "OUT03")] == [0, 1, 1, 1, 0.05]
    with pytest.raises(RecipeError, match="no block IN11"):
        set_value(rev2, parse_address("output.alpha[IN11]"), 1)
    with pytest.raises(RecipeError, match="backwards"):
        set_value(rev2, parse_address("output.alpha[OUT02..OUT00]"), 1)
    with pytest.raises(RecipeError, match="not a finite number"):
        set_value(rev2, parse_address("output.alpha[IN04]"), "GRAD_V")


def test_one_block_of_a_constant():
    recipe = parse_recipe({"models": {"a": "a.safetensors", "b": "b.safetensors"},
                           "steps": {"out": {"method": "weighted_sum", "a": "a", "b": "b", "alpha": 0.25}}})
    edited = set_value(recipe, parse_address("out.alpha[IN04]"), 1)
    weights = parse_mbw(edited.steps["out"].params[0].blocks, "sd15")
    assert weights["IN04"] == 1 and {w for b, w in weights.items() if b != "IN04"} == {0.25}


def test_formula_numbers(rev2):
    assert formula_numbers(rev2.steps["rev2"]) == [(1.0, {"anxl3", "anxl2"}), (0.25, {"base8", "beta7"})]
    second = set_value(rev2, parse_address("rev2.coef[2]"), "0.5").steps["rev2"].formula
    assert second.text == "beta7 + 1.0 * (anxl3 - anxl2) + 0.5 * (base8 - beta7)"
    assert dict(second.coeffs) == {"beta7": 0.5, "anxl3": 1.0, "anxl2": -1.0, "base8": 0.5}
    named = set_value(rev2, parse_address("rev2.coef[anxl2]"), "-0.5").steps["rev2"].formula
    assert dict(named.coeffs)["anxl3"] == -0.5 and named.kind == "weight"
    with pytest.raises(RecipeError, match=re.escape("has 2 number(s): coef[1] = 1.0 (x anxl2 anxl3)")):
        set_value(rev2, parse_address("rev2.coef[3]"), 1)
    with pytest.raises(RecipeError, match="no number multiplies"):
        set_value(rev2, parse_address("rev2.coef[rev2]"), 1)
    with pytest.raises(RecipeError, match="coef"):
        set_value(rev2, parse_address("rev2.alpha"), 1)


def test_formula_edit_that_changes_the_kind_is_refused():
    recipe = parse_recipe({"models": {"a": "a.safetensors", "b": "b.safetensors"},
                           "steps": {"out": "0.5 * a + 0.5 * b"}})
    with pytest.raises(RecipeError, match="adds up|add up"):
        set_value(recipe, parse_address("out.coef[1]"), 0.7)
    ok = set_value(recipe, parse_address("out.coef[b]"), 0.5)
    assert ok.steps["out"].formula.kind == "weight"


def test_lora_step():
    recipe = _lora_recipe()
    assert parameters_of(recipe.steps["out"]) == ("strength", "te_strength", "blocks")
    strong = set_value(recipe, parse_address("out.strength"), "0.4").steps["out"]
    assert [a.strength for a in strong.adapters] == [0.4, 0.4]
    preset = set_value(recipe, parse_address("out.blocks"), "OUTALL").steps["out"]
    assert {a.blocks for a in preset.adapters} == {"OUTALL"}
    one = set_value(_lora_recipe("MIDD"), parse_address("out.blocks[OUT03]"), 0.5).steps["out"].adapters[0]
    values = one.blocks.removeprefix("lbw=").split(",")
    assert len(values) == 26 and values[17] == "0.5" and values[13] == "1" and values[4] == "0"  # OUT03, M00, IN03
    with pytest.raises(RecipeError, match="unknown preset 'MIDDLE'; LoRA Block Weight presets: NONE, ALL,"):
        set_value(recipe, parse_address("out.blocks"), "MIDDLE")
    with pytest.raises(RecipeError, match="a LoRA step takes"):
        set_value(recipe, parse_address("out.alpha"), 1)


def test_unknown_places(rev2):
    with pytest.raises(RecipeError, match=r"no step 'out' \(steps: rev2, output\)"):
        set_value(rev2, parse_address("out.alpha"), 1)
    with pytest.raises(RecipeError, match="has no parameter 'beta'"):
        set_value(rev2, parse_address("output.beta"), 1)


def test_lora_blocks_are_checked_when_the_recipe_is_read():
    with pytest.raises(RecipeError, match=r"out\.lora\[0\]\.blocks: unknown preset 'MIDDLE'"):
        _lora_recipe("MIDDLE")
    with pytest.raises(RecipeError, match="random"):
        _lora_recipe("1,R,1,1,1,1,1,1,1,1,1,1")
