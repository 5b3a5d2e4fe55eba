"""Formula tokenizer, parser and weight/delta typing (recipe/formula.py)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mergekit_sdxl.errors import RecipeError
from mergekit_sdxl.recipe.formula import MAX_DEPTH, parse_formula

KINDS = {"beta7": "weight", "anxl3": "weight", "anxl2": "weight", "base8": "weight", "d": "delta"}


def coeffs(text: str, kinds: dict | None = None) -> dict[str, float]:
    return dict(parse_formula(text, kinds or KINDS).coeffs)


def test_gamma_rev2_collects_like_terms_in_first_seen_order():
    formula = parse_formula("beta7 + 1.0 * (anxl3 - anxl2) + 0.25 * (base8 - beta7)", KINDS)
    assert formula.kind == "weight"
    assert formula.coeffs == (("beta7", 0.75), ("anxl3", 1.0), ("anxl2", -1.0), ("base8", 0.25))


def test_difference_is_a_delta_and_scaled_delta_stays_one():
    assert parse_formula("anxl3 - anxl2", KINDS).kind == "delta"
    assert parse_formula("0.5 * (anxl3 - anxl2)", KINDS).kind == "delta"
    assert parse_formula("d * 2", KINDS).kind == "delta"
    assert parse_formula("beta7 + d", KINDS).kind == "weight"


def test_scalar_on_either_side_numbers_and_unary_minus():
    assert coeffs("beta7 + 0.25 * d") == coeffs("beta7 + d * 0.25") == {"beta7": 1.0, "d": 0.25}
    assert coeffs("beta7 + 1e-3 * d") == {"beta7": 1.0, "d": 0.001}
    assert coeffs("beta7 + 2.5E+1 * d") == {"beta7": 1.0, "d": 25.0}
    assert coeffs("beta7 + -2 * d") == {"beta7": 1.0, "d": -2.0}
    assert coeffs("beta7 - -(anxl3 - anxl2)") == {"beta7": 1.0, "anxl3": 1.0, "anxl2": -1.0}
    assert coeffs("beta7 + .5 * (1 - 0.5) * d") == {"beta7": 1.0, "d": 0.25}


def test_precedence_and_left_associativity():
    # a + b - c is (a + b) - c: its weights sum to 1, so add difference works without parentheses
    assert coeffs("beta7 + anxl3 - anxl2") == {"beta7": 1.0, "anxl3": 1.0, "anxl2": -1.0}
    assert coeffs("anxl3 - anxl2 - d - d") == {"anxl3": 1.0, "anxl2": -1.0, "d": -2.0}
    assert coeffs("beta7 + 2 * 3 * d") == {"beta7": 1.0, "d": 6.0}


def test_weighted_sum_as_formula_and_zero_coefficients_dropped():
    assert coeffs("0.5 * beta7 + beta7 * 0.5") == {"beta7": 1.0}
    assert coeffs("0.3 * anxl3 + 0.7 * anxl2") == {"anxl3": 0.3, "anxl2": 0.7}
    assert coeffs("beta7 + 0 * (anxl3 - anxl2)") == {"beta7": 1.0}
    assert coeffs("beta7 + (anxl3 - anxl2) - (anxl3 - anxl2)") == {"beta7": 1.0}


@pytest.mark.parametrize(("text", "term"), [
    ("anxl3 + anxl2", "anxl3 + anxl2"),
    ("beta7 + 1.0 * (anxl3 + anxl2)", "anxl3 + anxl2"),
    ("beta7 * 2", "beta7 * 2"),
    ("2 * beta7", "2 * beta7"),
    ("beta7 + 0.5 * (anxl3 * 2)", "anxl3 * 2"),
    ("beta7 * anxl3", "beta7 * anxl3"),
    ("beta7 + (anxl3 - anxl2) * (anxl3 - anxl2)", "(anxl3 - anxl2) * (anxl3 - anxl2)"),
    ("beta7 + 1", "beta7 + 1"),
    ("-beta7", "-beta7"),
    ("0.6 * anxl3 + 0.6 * anxl2", "0.6 * anxl3 + 0.6 * anxl2"),
])
def test_ill_typed_terms_are_refused_naming_the_term(text, term):
    with pytest.raises(RecipeError) as info:
        parse_formula(text, KINDS)
    assert f"`{term}`" in str(info.value)
    assert "\n" not in str(info.value)


def test_model_plus_model_message_says_what_to_do():
    with pytest.raises(RecipeError, match=r"`anxl3 \+ anxl2` adds models.*difference.*weighted sum"):
        parse_formula("anxl3 + anxl2", KINDS)


@pytest.mark.parametrize(("text", "message"), [
    ("", "empty"),
    ("   ", "empty"),
    ("beta7 / 2", r"unexpected '/' at position 7"),
    ("beta7 + __import__('os')", r"unexpected \"'\""),
    ("beta7 ** 2", "expected a number, a name or `\\(`"),
    ("beta7 + (anxl3 - anxl2", "missing `\\)`"),
    ("beta7 + anxl3 - anxl2)", "unexpected '\\)'"),
    ("beta7 +", "end of formula"),
    ("beta7 anxl3", "unexpected 'anxl3'"),
    ("2beta7", "unexpected 'beta7'"),
    ("zeta", r"unknown name `zeta`"),
    ("1 + 2", "has no model"),
    ("beta7 - beta7", "cancels out"),
    ("beta7 + 1e999 * d", "not a finite number"),
    ("beta7 + 1e300 * 1e300 * d", "not a finite number"),
    ("beta7 + 1e300 * (1e300 * d)", "not a finite number"),
    ("beta7 + d.x", "unexpected '.'"),
    ("beta7 + kxl-beta7", "unknown name `kxl`"),
])
def test_syntax_errors(text, message):
    with pytest.raises(RecipeError, match=message):
        parse_formula(text, KINDS)


def test_unknown_name_lists_known_names():
    with pytest.raises(RecipeError, match="models and earlier steps: anxl2, anxl3, base8, beta7, d"):
        parse_formula("beta7 + 0.5 * (anxl4 - anxl2)", KINDS)


def test_nesting_and_length_are_bounded():
    deep = "(" * (MAX_DEPTH + 1) + "beta7" + ")" * (MAX_DEPTH + 1)
    with pytest.raises(RecipeError, match="nests deeper"):
        parse_formula(deep, KINDS)
    ok = "(" * (MAX_DEPTH - 1) + "beta7" + ")" * (MAX_DEPTH - 1)
    assert coeffs(ok) == {"beta7": 1.0}
    with pytest.raises(RecipeError, match="nests deeper"):
        parse_formula("beta7 + " + "-" * 200 + "d", KINDS)
    with pytest.raises(RecipeError, match="characters long"):
        parse_formula("beta7" + " + 0 * d" * 2000, KINDS)


# --------------------------------------------------------------------------------------- property-based tests
WEIGHTS = ["beta7", "anxl3", "anxl2", "base8"]


def _number(draw) -> tuple[str, float]:
    style = draw(st.sampled_from(["float", "int", "exp"]))
    if style == "int":
        value = draw(st.integers(-5, 5))
        return str(value), float(value)
    if style == "exp":
        text = f"{draw(st.integers(1, 9))}e{draw(st.integers(-3, 1))}"
        return text, float(text)
    value = draw(st.floats(-4, 4, allow_nan=False, allow_infinity=False))
    return repr(value), value


def _scale(c: dict[str, float], k: float) -> dict[str, float]:
    return {n: v * k for n, v in c.items()}


def _add(a: dict[str, float], b: dict[str, float], sign: float = 1.0) -> dict[str, float]:
    out = dict(a)
    for n, v in b.items():
        out[n] = out.get(n, 0.0) + sign * v
    return out


@st.composite
def delta_expr(draw, depth: int = 0) -> tuple[str, dict[str, float]]:
    choice = draw(st.integers(0, 5 if depth < 3 else 1))
    if choice <= 1:  # difference of two weights, or the delta step
        if choice == 1 and draw(st.booleans()):
            return "d", {"d": 1.0}
        (ta, ca), (tb, cb) = draw(weight_expr(depth + 1)), draw(weight_expr(depth + 1))
        return f"({ta}) - ({tb})", _add(ca, cb, -1.0)
    if choice == 2:
        num_text, num = _number(draw)
        text, c = draw(delta_expr(depth + 1))
        return (f"{num_text} * ({text})" if draw(st.booleans()) else f"({text}) * {num_text}"), _scale(c, num)
    if choice == 3:
        (ta, ca), (tb, cb) = draw(delta_expr(depth + 1)), draw(delta_expr(depth + 1))
        sign = draw(st.sampled_from([1.0, -1.0]))
        return f"({ta}) {'+' if sign > 0 else '-'} ({tb})", _add(ca, cb, sign)
    if choice == 4:
        text, c = draw(delta_expr(depth + 1))
        return f"-({text})", _scale(c, -1.0)
    text, c = draw(delta_expr(depth + 1))
    return f"({text})", c


@st.composite
def weight_expr(draw, depth: int = 0) -> tuple[str, dict[str, float]]:
    choice = draw(st.integers(0, 3 if depth < 3 else 0))
    if choice == 0:
        name = draw(st.sampled_from(WEIGHTS))
        return name, {name: 1.0}
    (tw, cw), (td, cd) = draw(weight_expr(depth + 1)), draw(delta_expr(depth + 1))
    if choice == 1:
        return f"{tw} + ({td})", _add(cw, cd)
    if choice == 2:
        return f"({td}) + {tw}", _add(cd, cw)
    return f"({tw}) - ({td})", _add(cw, cd, -1.0)


def _reference(expected: dict[str, float]) -> dict[str, float]:
    return {n: v for n, v in expected.items() if abs(v) > 1e-12}


@settings(max_examples=150, deadline=None)
@given(st.one_of(weight_expr().map(lambda e: (*e, "weight")), delta_expr().map(lambda e: (*e, "delta"))))
def test_random_valid_expressions_match_reference(case):
    text, expected, kind = case
    expected = _reference(expected)
    if not expected:
        with pytest.raises(RecipeError, match="cancels out"):
            parse_formula(text, KINDS)
        return
    formula = parse_formula(text, KINDS)
    got = dict(formula.coeffs)
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, rel=1e-9, abs=1e-12)
    weight_mass = sum(v for n, v in expected.items() if n != "d")
    assert formula.kind == ("weight" if abs(weight_mass - 1) < 1e-9 else "delta") == kind


FORMULA_CHARS = "abdet0123456789.+-*()eE _/\\'\"[]{}%^&!~`\n\t"


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(alphabet=FORMULA_CHARS, max_size=40), st.text(max_size=40)))
def test_garbage_never_crashes_except_with_recipe_error(text):
    kinds = {"a": "weight", "b": "weight", "d": "delta", "e": "weight", "t": "weight"}
    try:
        formula = parse_formula(text, kinds)
    except RecipeError as exc:
        assert "\n" not in str(exc) and "\r" not in str(exc)
        return
    assert formula.kind in ("weight", "delta")
    assert formula.coeffs


@pytest.mark.parametrize("text", ["beta7 -\nbeta7", "beta7 +\n anxl3 * 2", "beta7\n+ anxl3", "2 *\r\n beta7"])
def test_formulas_over_several_lines_give_one_line_messages(text):
    with pytest.raises(RecipeError) as info:
        parse_formula(text, KINDS)
    assert "\n" not in str(info.value) and "\r" not in str(info.value)
