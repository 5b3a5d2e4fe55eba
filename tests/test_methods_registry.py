"""The method registry: specs match their functions, lookups and calls fail with RecipeErrors naming the problem."""

from __future__ import annotations

import inspect
import subprocess
import sys
import typing

import pytest
import torch

from mergekit_sdxl.errors import MergekitError, RecipeError
from mergekit_sdxl.methods.registry import METHODS, NonFiniteError, call_method, check_finite, get_method


@pytest.mark.parametrize("name", sorted(METHODS))
def test_spec_matches_function_signature(name):
    spec = METHODS[name]
    fn = spec.fn.resolve()
    params = inspect.signature(fn).parameters.values()
    hints = typing.get_type_hints(fn)
    kinds = inspect.Parameter
    assert tuple(p.name for p in params if p.kind == kinds.POSITIONAL_OR_KEYWORD) == spec.inputs
    assert any(p.kind == kinds.VAR_POSITIONAL for p in params) == spec.variadic
    keyword = {p.name: p for p in params if p.kind == kinds.KEYWORD_ONLY}
    assert tuple(keyword) == spec.param_names
    for key, p in keyword.items():
        assert spec.param(key).default == (None if p.default is kinds.empty else p.default), key
        assert hints[key] is spec.param(key).type, key
    assert spec.doc
    assert fn.__doc__ and len(fn.__doc__.strip()) > 20, "every method documents its formula"


def test_registry_import_does_not_import_torch():
    code = "import sys\nimport mergekit_sdxl.methods.registry as r\nr.get_method('ties')\nprint('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_get_method_suggests_close_name():
    with pytest.raises(RecipeError) as err:
        get_method("weighted_sun")
    message = str(err.value)
    assert "'weighted_sun'" in message and "Did you mean 'weighted_sum'?" in message
    assert "model_stock" in message and "train_difference" in message


def test_get_method_without_close_match_lists_names():
    with pytest.raises(RecipeError, match="Known methods: add_difference, add_rounded_difference, copy"):
        get_method("zzzz")


def test_call_method_checks_input_count():
    x = torch.zeros(2)
    with pytest.raises(RecipeError, match=r"'add_difference' takes exactly 3 input model\(s\) \(a, b, c\), got 2"):
        call_method("add_difference", [x, x], {"alpha": 1.0})
    with pytest.raises(RecipeError, match=r"'model_stock' takes at least 3"):
        call_method("model_stock", [x, x], {})
    with pytest.raises(RecipeError, match=r"'ties' takes at least 2"):
        call_method("ties", [x], {})
    assert call_method("ties", [x, x + 1], {}).shape == (2,)


def test_call_method_checks_parameter_names():
    x = torch.zeros(2)
    with pytest.raises(RecipeError, match=r"'weighted_sum' has no parameter 'beta' \(its parameters: alpha\)"):
        call_method("weighted_sum", [x, x], {"alpha": 0.5, "beta": 0.5})
    with pytest.raises(RecipeError, match=r"'weighted_sum': parameter 'alpha' is required"):
        call_method("weighted_sum", [x, x], {})
    with pytest.raises(RecipeError, match=r"'dare': parameter 'seed' is required"):
        call_method("dare", [x, x], {"p": 0.5})
    with pytest.raises(RecipeError, match=r"'copy' has no parameter 'alpha' \(its parameters: none\)"):
        call_method("copy", [x], {"alpha": 1.0})


@pytest.mark.parametrize(
    ("name", "params", "bad"),
    [
        ("weighted_sum", {"alpha": True}, "alpha"),
        ("weighted_sum", {"alpha": "0.5"}, "alpha"),
        ("dare", {"seed": 1.0}, "seed"),
        ("dare", {"seed": True}, "seed"),
        ("dare", {"seed": 1, "ties_sign": 1}, "ties_sign"),
        ("ties", {"density": None}, "density"),
    ],
)
def test_call_method_checks_parameter_types(name, params, bad):
    x = torch.zeros(3)
    with pytest.raises(RecipeError, match=rf"'{name}': parameter '{bad}' must be"):
        call_method(name, [x, x], params)


def test_call_method_accepts_int_for_float_and_fills_defaults():
    a, b = torch.zeros(2), torch.ones(2)
    assert torch.equal(call_method("weighted_sum", [a, b], {"alpha": 1}), b)
    out = call_method("dare", [a, b], {"seed": 3, "p": 0})  # defaults alpha 1.0, ties_sign False
    assert torch.equal(out, b)


def test_call_method_turns_rejected_values_into_recipe_errors():
    x = torch.zeros(4)
    with pytest.raises(RecipeError, match=r"'ties': parameter 'density' must lie in \[0, 1\], got 1.5"):
        call_method("ties", [x, x], {"density": 1.5})
    with pytest.raises(RecipeError, match=r"'dare': parameter 'p' must lie in \[0, 1\], got -0.1"):
        call_method("dare", [x, x], {"seed": 0, "p": -0.1})


def test_check_finite():
    ok = torch.ones(3)
    assert check_finite(ok, "step 1, key k") is ok
    bad = torch.tensor([1.0, float("nan"), float("inf"), -float("inf")])
    with pytest.raises(NonFiniteError) as err:
        check_finite(bad, "step 'rev1', key model.diffusion_model.out.2.weight")
    assert "step 'rev1', key model.diffusion_model.out.2.weight" in str(err.value)
    assert "3 non-finite value(s)" in str(err.value) and "out of 4" in str(err.value)
    assert isinstance(err.value, MergekitError) and err.value.exit_code == 4
