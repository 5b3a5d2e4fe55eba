"""Every MethodSpec's traits are true of its function: linear coefficients reproduce it, identity points return an
input bit for bit, elementwise methods give the same bits chunk by chunk, parameter ranges are enforced."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mergekit_sdxl.errors import RecipeError
from mergekit_sdxl.methods.registry import METHODS, call_method
from mergekit_sdxl.methods.spec import MethodSpec, ParamSpec

LINEAR = sorted(name for name, spec in METHODS.items() if spec.linear is not None)
IDENTITIES = [(name, i) for name, spec in METHODS.items() for i in range(len(spec.identities))]
ELEMENTWISE = sorted(name for name, spec in METHODS.items() if spec.elementwise)
CI = settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
# bit patterns a method must carry through an identity point untouched
SPECIAL = [0.0, -0.0, 1.5, -2.25, float("inf"), -float("inf"), float("nan"), 5e-324, 1e308]


def _count(spec: MethodSpec) -> int:
    return spec.min_inputs + (1 if spec.variadic else 0)


def _value(p: ParamSpec, draw: st.DrawFn) -> float | int | bool:
    if p.type is bool:
        return draw(st.booleans())
    if p.type is int:
        return draw(st.integers(0, 2**31))
    low = -2.0 if p.low is None else p.low
    high = 3.0 if p.high is None else p.high
    return draw(st.floats(low, high, allow_nan=False))


def test_the_promised_traits():
    assert set(LINEAR) == {"copy", "keep", "weighted_sum", "add_difference", "triple_sum", "sum_twice"}
    assert set(ELEMENTWISE) == set(LINEAR) | {"train_difference", "add_rounded_difference"}
    assert all(spec.doc for spec in METHODS.values())


@pytest.mark.parametrize("name", LINEAR)
@CI
@given(data=st.data())
def test_linear_coefficients_reproduce_the_function(name, data):
    spec = METHODS[name]
    params = {p.name: _value(p, data.draw) for p in spec.params}
    seed = data.draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(64, generator=g, dtype=torch.float64) for _ in range(_count(spec))]
    coeffs = spec.coefficients(params)
    assert coeffs is not None and len(coeffs) == len(xs)
    expected = sum(c * x for c, x in zip(coeffs, xs))
    got = spec.fn(*xs, **params)
    # float64 rounding of a few products and sums: far below any coefficient change that matters
    assert torch.allclose(got, expected, rtol=1e-12, atol=1e-12), (params, (got - expected).abs().max())


@pytest.mark.parametrize("name", LINEAR)
def test_coefficients_need_plain_numbers(name):
    spec = METHODS[name]
    if spec.params:
        assert spec.coefficients({p.name: "0.5" for p in spec.params}) is None
        assert spec.coefficients({p.name: True for p in spec.params}) is None


@pytest.mark.parametrize("name,index", IDENTITIES)
def test_identity_points_return_that_input_bit_for_bit(name, index):
    spec = METHODS[name]
    identity = spec.identities[index]
    g = torch.Generator().manual_seed(index)
    xs = [torch.tensor(SPECIAL, dtype=torch.float64)[torch.randperm(len(SPECIAL), generator=g)]
          for _ in range(_count(spec))]
    params = {**{p.name: 0.5 for p in spec.params if p.type is float}, **dict(identity.when)}
    out = call_method(name, xs, params)
    assert torch.equal(out.view(torch.int64), xs[identity.input].view(torch.int64))
    assert spec.identity_input(params) == identity.input
    coeffs = spec.coefficients(params)
    if coeffs is not None:  # the planner's shortcut and the engine's lowering agree
        assert coeffs == tuple(1.0 if i == identity.input else 0.0 for i in range(len(coeffs)))


def test_no_identity_away_from_the_points():
    assert METHODS["weighted_sum"].identity_input({"alpha": 0.5}) is None
    assert METHODS["sum_twice"].identity_input({"alpha": 0.0, "beta": 0.5}) is None
    assert METHODS["sum_twice"].identity_input({"alpha": 0.3, "beta": 1.0}) == 2
    assert METHODS["triple_sum"].identity_input({"alpha": 0.0, "beta": 0.0}) is None  # 0·inf would be NaN


@pytest.mark.parametrize("name", ELEMENTWISE)
def test_elementwise_methods_give_the_same_bits_chunk_by_chunk(name):
    spec = METHODS[name]
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(4, 25, generator=g, dtype=torch.float32) for _ in range(_count(spec))]
    params = {p.name: (False if p.type is bool else 0.3) for p in spec.params}
    whole = call_method(name, xs, params).reshape(-1)
    flat = [x.reshape(-1) for x in xs]
    parts = [call_method(name, [x[i:i + 7] for x in flat], params) for i in range(0, 100, 7)]
    assert torch.equal(torch.cat(parts), whole)


@pytest.mark.parametrize("name", sorted(set(METHODS) - set(ELEMENTWISE)))
def test_methods_marked_whole_tensor_really_are(name):
    """A method left out of `elementwise` must need the whole tensor (else it loses the chunked path for nothing)."""
    spec = METHODS[name]
    g = torch.Generator().manual_seed(5)
    xs = [torch.randn(100, generator=g) for _ in range(_count(spec))]
    params = {p.name: (7 if p.type is int else False if p.type is bool else 0.5) for p in spec.params}
    whole = call_method(name, xs, params)
    parts = torch.cat([call_method(name, [x[i:i + 10] for x in xs], params) for i in range(0, 100, 10)])
    assert not torch.equal(parts, whole)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_ranges_are_enforced_at_their_edges(name):
    spec = METHODS[name]
    xs = [torch.ones(3) for _ in range(_count(spec))]
    base = {p.name: (p.default if p.default is not None else (1 if p.type is int else 0.5)) for p in spec.params}
    for p in spec.params:
        for edge, outside in ((p.low, -1e-9), (p.high, 1e-9)):
            if edge is None:
                continue
            call_method(name, xs, {**base, p.name: edge})
            with pytest.raises(RecipeError, match=f"parameter '{p.name}' must lie in"):
                call_method(name, xs, {**base, p.name: edge + outside})


def test_range_text():
    assert ParamSpec("x", float, None, 0.0, 1.0).range_text() == "[0, 1]"
    assert ParamSpec("x", float, None, 0.0).range_text() == "[0, inf)"
    assert ParamSpec("x").range_text() == "any"
    assert math.isinf(float("inf"))


def test_recipe_refuses_out_of_range_constants_overrides_and_block_weights(tmp_path):
    from mergekit_sdxl.recipe.parser import parse_recipe

    def recipe(density: object) -> dict:
        return {"models": {"a": "a.safetensors", "b": "b.safetensors"},
                "steps": {"out": {"method": "ties", "base": "a", "models": ["b"], "density": density}}}

    with pytest.raises(RecipeError, match=r"steps\.out\.density: 1\.5 is outside \[0, 1\]"):
        parse_recipe(recipe(1.5))
    with pytest.raises(RecipeError, match=r"steps\.out\.density: -1 is outside \[0, 1\]"):
        parse_recipe(recipe({"value": 0.5, "overrides": [{"match": "x", "value": -1}]}))
    parse_recipe(recipe(1.0))
