"""Search spaces (torch-free): parsing, block expansion with IN/OUT mirroring, ties, choices, payload checks, and
values written into a recipe at their addresses."""

from __future__ import annotations

import pytest

from mergekit_sdxl.errors import RecipeError, UsageError
from mergekit_sdxl.recipe.parser import parse_recipe
from mergekit_sdxl.search.space import apply_values, parse_space

PAYLOAD = {"prompts": ["a"], "seeds": [1, 2]}


def _recipe():
    return parse_recipe({"arch": "sdxl", "models": {"a": "a.safetensors", "b": "b.safetensors"}, "steps": {
        "mix": "a + 0.5 * (b - a)",
        "output": {"method": "weighted_sum", "a": "mix", "b": "b", "alpha": [0.0] * 20}}})


def _alpha(recipe) -> list[float]:
    from mergekit_sdxl.arch.mbw import parse_mbw

    blocks = next(p for p in recipe.steps["output"].params if p.name == "alpha").blocks
    return list(parse_mbw(blocks, "sdxl").values())


def test_ranges_groups_and_values_land_at_their_addresses():
    space = parse_space({"params": {"output.alpha[IN04]": [0, 1], "output.alpha[OUT00..OUT02]": {
        "low": 0, "high": 1, "step": 0.1}, "mix.coef[1]": {"low": 0.1, "high": 0.9}}, "payload": PAYLOAD})
    dims = space.dimensions(_recipe(), "sdxl")
    assert [d.name for d in dims] == ["output.alpha[IN04]", "output.alpha[OUT00..OUT02]", "mix.coef[1]"]
    assert dims[1].step == 0.1
    variant = apply_values(_recipe(), dims, {"output.alpha[IN04]": 0.25, "output.alpha[OUT00..OUT02]": 0.7,
                                             "mix.coef[1]": 0.3}, "sdxl")
    alpha = _alpha(variant)
    assert alpha[5] == 0.25 and alpha[11:14] == [0.7, 0.7, 0.7]
    assert sum(alpha) == pytest.approx(0.25 + 3 * 0.7)
    assert variant.steps["mix"].formula.coeffs == (("a", 0.7), ("b", 0.3))
    assert _alpha(_recipe()) == [0.0] * 20  # the recipe given is not changed


def test_each_block_with_mirror_pairs_in_k_with_out_n_minus_1_minus_k():
    space = parse_space({"params": {"output.alpha": {"low": 0, "high": 1, "each_block": True, "mirror": True}},
                         "payload": PAYLOAD})
    dims = space.dimensions(_recipe(), "sdxl")
    names = [d.name for d in dims]
    assert names[:2] == ["output.alpha[BASE]", "output.alpha[M00]"]
    assert names[2] == "output.alpha[IN00+OUT08]" and names[-1] == "output.alpha[IN08+OUT00]"
    assert len(dims) == 2 + 9
    values = {d.name: i / 10 for i, d in enumerate(dims)}
    alpha = _alpha(apply_values(_recipe(), dims, values, "sdxl"))
    # SDXL vector order: BASE, IN00..IN08, M00, OUT00..OUT08
    assert alpha[1 + 4] == alpha[11 + 4] == values["output.alpha[IN04+OUT04]"]
    assert alpha[1] == alpha[19] == values["output.alpha[IN00+OUT08]"]
    plain = parse_space({"params": {"output.alpha": {"low": 0, "high": 1, "each_block": True}}, "payload": PAYLOAD})
    assert len(plain.dimensions(_recipe(), "sdxl")) == 20


def test_ties_copy_the_lead_value():
    space = parse_space({"params": {"output.alpha[IN04]": [0, 1]},
                         "ties": [["output.alpha[IN04]", "output.alpha[OUT04]", "output.alpha[M00]"]],
                         "payload": PAYLOAD})
    dims = space.dimensions(_recipe(), "sdxl")
    assert len(dims) == 1 and len(dims[0].targets) == 3
    alpha = _alpha(apply_values(_recipe(), dims, {"output.alpha[IN04]": 0.4}, "sdxl"))
    assert [i for i, v in enumerate(alpha) if v == 0.4] == [5, 10, 15]


def test_choices_presets_and_vectors():
    vector = [0.5] * 20
    space = parse_space({"params": {"output.alpha": {"choices": ["GRAD_V", vector, 0.3]}}, "payload": PAYLOAD})
    dims = space.dimensions(_recipe(), "sdxl")
    assert dims[0].choices == ("GRAD_V", ",".join(["0.5"] * 20), 0.3)
    assert _alpha(apply_values(_recipe(), dims, {"output.alpha": dims[0].choices[1]}, "sdxl")) == vector


@pytest.mark.parametrize(("params", "error", "match"), [
    ({"output.alpha[IN04]": [1, 0]}, UsageError, "below high"),
    ({"output.alpha[IN99]": [0, 1]}, RecipeError, "IN99"),
    ({"nostep.alpha": [0, 1]}, RecipeError, "no step 'nostep'"),
    ({"output.beta": [0, 1]}, RecipeError, "beta"),
    ({"output.alpha": {"low": 0, "high": 1, "mirror": True}}, UsageError, "each_block"),
    ({"output.alpha[IN04]": {"low": 0, "high": 1, "step": 0.1, "log": True}}, UsageError, "log"),
    ({"output.alpha[IN04]": {"low": 0, "hi": 1}}, UsageError, "unknown field"),
    ({"output.alpha[IN04": [0, 1]}, UsageError, "not a recipe parameter"),
    ({"mix.coef[9]": [0, 1]}, RecipeError, "has 1 number"),
])
def test_space_errors_name_the_entry(params, error, match):
    with pytest.raises(error, match=match):
        parse_space({"params": params, "payload": PAYLOAD}).dimensions(_recipe(), "sdxl")


@pytest.mark.parametrize(("payload", "match"), [
    ({}, "prompts"), ({"prompts": ["a"], "seeds": [-1]}, "seeds"), ({"prompts": "a", "steps": 0}, "steps"),
    ({"prompts": "a", "size": "banana"}, "size"), ({"prompts": "a", "colour": 1}, "unknown field"),
    ({"prompts": "a", "sampler": "eulr"}, "sampler"), ({"prompts": "a", "schedule": "x"}, "schedule"),
    ({"prompts": "a", "rng": "cuda"}, "rng"),
])
def test_payload_errors(payload, match):
    with pytest.raises(UsageError, match=match):
        parse_space({"params": {"output.alpha[IN04]": [0, 1]}, "payload": payload})


def test_payload_order_and_defaults():
    space = parse_space({"params": {"output.alpha[IN04]": [0, 1]},
                         "payload": {"prompts": ["x", "y"], "seeds": [3, 4, 5], "size": "portrait"}})
    p = space.payload
    assert p.images == [(0, "x", 3), (1, "x", 4), (2, "x", 5), (3, "y", 3), (4, "y", 4), (5, "y", 5)]
    assert (p.width, p.height, p.steps, p.sampler, p.negative) == (832, 1216, 28, "euler_a", "")


def test_tie_errors():
    base = {"params": {"output.alpha[IN04]": [0, 1], "output.alpha[OUT04]": [0, 1]}, "payload": PAYLOAD}
    with pytest.raises(UsageError, match="also under `params`"):
        parse_space({**base, "ties": [["output.alpha[IN04]", "output.alpha[OUT04]"]]}).dimensions(_recipe(), "sdxl")
    with pytest.raises(UsageError, match="not under `params`"):
        parse_space({**base, "ties": [["output.alpha[M00]", "output.alpha[BASE]"]]}).dimensions(_recipe(), "sdxl")
