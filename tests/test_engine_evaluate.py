"""KeyEvaluator: lowering of linear methods, the fused and chunked paths against whole-tensor evaluation."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mergekit_sdxl.engine.evaluate import CHUNK, KeyEvaluator, lower
from mergekit_sdxl.methods.registry import call_method
from mergekit_sdxl.recipe.nodes import Call, KeyPlan, Linear, Load

A, B, C, D = (Load(alias, "k") for alias in "abcd")


def test_weighted_sum_over_a_formula_lowers_to_one_sum() -> None:
    rev2 = Linear(((A, 0.75), (C, 1.0), (B, -1.0), (D, 0.25)))
    node = lower(Call("weighted_sum", (rev2, C), (("alpha", 0.1),)))
    assert isinstance(node, Linear)
    coeffs = dict(node.terms)
    assert coeffs[A] == pytest.approx(0.675) and coeffs[C] == pytest.approx(1.0)
    assert coeffs[B] == pytest.approx(-0.9) and coeffs[D] == pytest.approx(0.225)


def test_lowering_exact_cases() -> None:
    assert lower(Call("weighted_sum", (A, B), (("alpha", 0.0),))) == A
    assert lower(Call("weighted_sum", (A, B), (("alpha", 1.0),))) == B
    assert lower(Call("copy", (A,))) == A
    assert lower(Call("slerp", (A, B), (("alpha", 0.5),))) == Call("slerp", (A, B), (("alpha", 0.5),))
    zero = lower(Linear(((A, 1.0), (A, -1.0))))
    assert isinstance(zero, Linear) and all(c == 0.0 for _, c in zero.terms)


def _tensors(n: int, seed: int) -> dict[Load, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {leaf: torch.randn(n, generator=g).half() for leaf in (A, B, C, D)}


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 3 * CHUNK // 2), alpha=st.floats(0, 1), beta=st.floats(0, 1), seed=st.integers(0, 99))
def test_lowered_sum_matches_stepwise_methods(n: int, alpha: float, beta: float, seed: int) -> None:
    loaded = _tensors(n, seed)
    f32 = {k: v.float() for k, v in loaded.items()}
    node = Call("sum_twice", (Call("add_difference", (A, B, C), (("alpha", alpha),)), D, A),
                (("alpha", alpha), ("beta", beta)))
    got = KeyEvaluator().evaluate(KeyPlan("k", node, "F16", (n,)), loaded)["k"]
    inner = call_method("add_difference", [f32[A], f32[B], f32[C]], {"alpha": alpha})
    ref = call_method("sum_twice", [inner, f32[D], f32[A]], {"alpha": alpha, "beta": beta})
    # same value up to fp32 re-association: at most one fp16 rounding step apart
    assert torch.allclose(got.float(), ref, rtol=2**-10, atol=2**-20)


def test_chunked_train_difference_is_bit_identical_to_whole_tensor() -> None:
    n = 2 * CHUNK + 123
    loaded = _tensors(n, 1)
    node = Call("train_difference", (A, B, C), (("alpha", 0.7),))
    got = KeyEvaluator().evaluate(KeyPlan("k", node, "F16", (n,)), loaded)["k"]
    whole = call_method("train_difference", [loaded[x].float() for x in (A, B, C)], {"alpha": 0.7}).half()
    assert torch.equal(got, whole)


def test_non_finite_result_names_the_key() -> None:
    loaded = {A: torch.tensor([1.0, float("inf")]).half(), B: torch.tensor([0.0, 0.0]).half()}
    with pytest.raises(Exception, match="model.x.weight"):
        KeyEvaluator().evaluate(KeyPlan("model.x.weight", Linear(((A, 1.0), (B, 1.0))), "F16", (2,)), loaded)


def test_pass_through_keeps_bytes_and_int_keys() -> None:
    ids = torch.arange(77, dtype=torch.int64)
    out = KeyEvaluator().evaluate(KeyPlan("ids", A, "I64", (77,)), {A: ids})["ids"]
    assert out is ids


@pytest.mark.parametrize(("code", "bad"), [(code, bad) for code in ("F16", "BF16", "F32", "F8_E4M3", "F8_E5M2")
                                           for bad in (float("nan"), float("inf"))
                                           if not (code == "F8_E4M3" and bad == float("inf"))])  # e4m3fn: no inf
def test_pass_through_is_checked_for_non_finite_values(code: str, bad: float) -> None:
    """A key copied as stored (alpha 0/1, copy) gets the same finite check as a computed one, in every chunk."""
    from mergekit_sdxl.io.dtypes import torch_dtype
    from mergekit_sdxl.methods.registry import NonFiniteError

    values = torch.ones(2 * CHUNK + 5)
    values[CHUNK + 3] = bad  # in the second chunk: the whole tensor is looked at, not its start
    stored = values.to(torch_dtype(code))
    for node in (B, lower(Call("weighted_sum", (A, B), (("alpha", 1.0),))), lower(Call("copy", (B,)))):
        with pytest.raises(NonFiniteError, match="key model.x.weight"):
            KeyEvaluator().evaluate(KeyPlan("model.x.weight", node, code, tuple(values.shape)),
                                    {A: torch.zeros_like(stored), B: stored})
    fine = torch.ones(2 * CHUNK + 5).to(torch_dtype(code))
    out = KeyEvaluator().evaluate(KeyPlan("model.x.weight", B, code, tuple(fine.shape)), {B: fine})
    assert out["model.x.weight"] is fine  # still the stored bytes, untouched
