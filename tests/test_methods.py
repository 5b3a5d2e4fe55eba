"""Merge formulas: hand-computed cases, endpoint exactness and properties of every registered method."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mergekit_sdxl.methods import interpolate as ip
from mergekit_sdxl.methods import task_vectors as tv
from mergekit_sdxl.methods.registry import METHODS, call_method

F64 = torch.float64


def t(*values: float, dtype: torch.dtype = F64) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


# ---------------------------------------------------------------- hand-computed cases


def test_linear_hand_case():
    out = ip.linear([t(1, 2), t(3, -1)], [2.0, 0.5])
    assert torch.equal(out, t(3.5, 3.5))


def test_linear_rejects_mismatch():
    with pytest.raises(ValueError):
        ip.linear([t(1)], [1.0, 2.0])
    with pytest.raises(ValueError):
        ip.linear([], [])


def test_weighted_sum_hand_case():
    assert torch.equal(ip.weighted_sum(t(0, 2, 4), t(4, 2, 0), alpha=0.25), t(1, 2, 3))


def test_weighted_sum_endpoints_are_bit_exact():
    a = torch.tensor([-0.0, 1e-30, 3.0, -7.25, 1e30], dtype=torch.float32)
    b = torch.tensor([5.0, -2.0, float("inf"), 0.1, -1e30], dtype=torch.float32)
    zero = ip.weighted_sum(a, b, alpha=0.0)
    one = ip.weighted_sum(a, b, alpha=1.0)
    assert torch.equal(zero, a) and torch.equal(zero.signbit(), a.signbit())
    assert torch.equal(one, b)
    assert zero.data_ptr() != a.data_ptr() and one.data_ptr() != b.data_ptr()


def test_add_difference_hand_case():
    assert torch.equal(ip.add_difference(t(1, 1), t(3, 0), t(1, 2), alpha=0.5), t(2, 0))


def test_triple_sum_hand_case():
    assert torch.equal(ip.triple_sum(t(1, 0), t(0, 1), t(2, 2), alpha=0.25, beta=0.5), t(1.25, 1.25))


def test_sum_twice_hand_case():
    # (1 - 0.25)·((1 - 0.5)·0 + 0.5·4) + 0.25·8 = 0.75·2 + 2
    assert torch.equal(ip.sum_twice(t(0), t(4), t(8), alpha=0.5, beta=0.25), t(3.5))


def test_sum_twice_beta_endpoints():
    a, b, c = t(1, -2), t(3, 5), t(-7, 0.5)
    assert torch.equal(ip.sum_twice(a, b, c, alpha=0.3, beta=0.0), ip.weighted_sum(a, b, alpha=0.3))
    assert torch.equal(ip.sum_twice(a, b, c, alpha=0.3, beta=1.0), c)


def test_train_difference_hand_case():
    # element 0: A = C, so s = 1/2 and A gains 0.9·alpha·(B - C);  1: A = B, s = 0;  2: all equal (0/0 -> 0);
    # 3: |B - A| = 6, |B - C| = 1, s = 6/7
    a, b, c = t(0, 3, 5, -4), t(2, 3, 5, 2), t(0, 1, 5, 1)
    out = ip.train_difference(a, b, c, alpha=1.0)
    assert torch.allclose(out, t(1.8, 3, 5, -4 + 1.8 * 6 / 7), rtol=0, atol=1e-12)
    half = ip.train_difference(a, b, c, alpha=0.5)
    assert torch.allclose(half, t(0.9, 3, 5, -4 + 0.9 * 6 / 7), rtol=0, atol=1e-12)


def test_train_difference_is_finite_where_everything_is_equal():
    x = torch.zeros(3, 4, 1, 1)
    out = ip.train_difference(x, x, x, alpha=1.0)
    assert torch.equal(out, x)


def test_slerp_orthogonal_unit_vectors():
    a, b = t(1, 0), t(0, 1)
    assert torch.allclose(ip.slerp(a, b, alpha=0.5), t(math.sqrt(0.5), math.sqrt(0.5)), atol=1e-15)
    # a third of the way along the quarter circle: angle pi/6
    assert torch.allclose(ip.slerp(a, b, alpha=1 / 3), t(math.cos(math.pi / 6), 0.5), atol=1e-15)


def test_slerp_falls_back_to_weighted_sum():
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    for b in (2.5 * a, -a, torch.zeros_like(a), a + 1e-4):
        assert torch.equal(ip.slerp(a, b, alpha=0.3), ip.weighted_sum(a, b, alpha=0.3))


def test_slerp_endpoints_are_exact():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    assert torch.equal(ip.slerp(a, b, alpha=0.0), a)
    assert torch.equal(ip.slerp(a, b, alpha=1.0), b)


def test_keep_count():
    assert tv.keep_count(0.3, 10) == 3  # 0.3 * 10 = 2.9999999999999996
    assert tv.keep_count(0.2, 4) == 1
    assert tv.keep_count(0.5, 3) == 2
    assert tv.keep_count(0.0, 5) == 0
    assert tv.keep_count(1.0, 7) == 7
    assert tv.keep_count(1e-9, 7) == 1
    with pytest.raises(ValueError):
        tv.keep_count(1.5, 3)


def test_top_k_mask_breaks_ties_by_index():
    x = t(1, -1, 1, 1)
    assert tv.top_k_mask(x, 2).tolist() == [True, True, False, False]
    y = t(0.5, -2, 2, 3, -2)
    assert tv.top_k_mask(y, 3).tolist() == [False, True, True, True, False]
    assert tv.top_k_mask(y, 0).tolist() == [False] * 5
    assert tv.top_k_mask(y, 5).all()
    assert tv.top_k_mask(y.view(5, 1, 1), 2).shape == (5, 1, 1)


def test_ties_hand_case():
    base = t(10, 10, 10, 10)
    tau1, tau2, tau3 = t(4, -1, 0.5, -3), t(-2, 5, -0.5, 1), t(1, -6, 2, 2)
    # density 0.5 keeps 2 of 4:  tau1 -> [4, 0, 0, -3]; tau2 -> [-2, 5, 0, 0]; tau3 -> [0, -6, 2, 0] (the tie
    # between the two 2s goes to index 2). Mass [2, -1, 2, -3] elects [+, -, +, -]; agreeing entries: 4 | -6 | 2 | -3.
    out = tv.ties(base, base + tau1, base + tau2, base + tau3, alpha=1.0, density=0.5)
    assert torch.equal(out, t(14, 4, 12, 7))
    half = tv.ties(base, base + tau1, base + tau2, base + tau3, alpha=0.5, density=0.5)
    assert torch.equal(half, t(12, 7, 11, 8.5))


def test_ties_disjoint_mean_and_mass_election():
    base = t(1, 1, 1)
    # element 0: +2 and +4 agree -> mean 3; element 1: -1 vs +3, mass +2 elects +, keeps 3;
    # element 2: a count vote would elect - (two against one), the mass (-1 - 1 + 5) elects +
    m1, m2, m3 = base + t(2, -1, -1), base + t(4, 3, -1), base + t(0, 0, 5)
    out = tv.ties(base, m1, m2, m3, density=1.0)
    assert torch.equal(out, t(4, 4, 6))


def test_ties_tied_mass_stays_at_base():
    base = t(0.5)
    assert torch.equal(tv.ties(base, base + 1, base - 1, density=1.0), base)


def _reference_ties(base, models, alpha, density):
    """Plain-Python TIES on 1-D tensors: sort-based trim, mass election, disjoint mean."""
    n = base.numel()
    k = tv.keep_count(density, n)
    trimmed = []
    for m in models:
        d = (m - base).tolist()
        order = sorted(range(n), key=lambda i: (-abs(d[i]), i))[:k]
        trimmed.append([d[i] if i in order else 0.0 for i in range(n)])
    out = []
    for i in range(n):
        mass = sum(d[i] for d in trimmed)
        sign = (mass > 0) - (mass < 0)
        agree = [d[i] for d in trimmed if d[i] != 0 and ((d[i] > 0) - (d[i] < 0)) == sign]
        merged = sum(agree) / len(agree) if agree else 0.0
        out.append(base[i].item() + alpha * merged)
    return torch.tensor(out, dtype=base.dtype)


small_ints = st.lists(st.integers(-4, 4), min_size=1, max_size=12)


@settings(max_examples=80, deadline=None)
@given(st.data())
def test_ties_matches_reference(data):
    n = data.draw(st.integers(1, 12))
    vec = st.lists(st.integers(-4, 4), min_size=n, max_size=n)  # small integers: many magnitude ties
    base = torch.tensor(data.draw(vec), dtype=F64)
    models = [torch.tensor(data.draw(vec), dtype=F64) for _ in range(data.draw(st.integers(1, 4)))]
    density = data.draw(st.sampled_from([0.1, 0.2, 0.5, 0.75, 1.0]))
    alpha = data.draw(st.sampled_from([1.0, 0.5, -0.25]))
    out = tv.ties(base, *models, alpha=alpha, density=density)
    assert torch.allclose(out, _reference_ties(base, models, alpha, density), rtol=1e-12, atol=1e-12)


def test_dare_is_reproducible_and_seed_dependent():
    g = torch.Generator().manual_seed(1)
    base, m1, m2 = (torch.randn(64, 3, generator=g) for _ in range(3))
    first = tv.dare(base, m1, m2, seed=7, p=0.5)
    assert torch.equal(first, tv.dare(base, m1, m2, seed=7, p=0.5))
    assert not torch.equal(first, tv.dare(base, m1, m2, seed=8, p=0.5))


def test_dare_matches_its_documented_mask():
    base, m1, m2 = t(0, 0, 0, 0, 0, 0), t(1, 2, 3, 4, 5, 6), t(-1, -1, -1, -1, -1, -1)
    gen = torch.Generator().manual_seed(123)
    keep1 = torch.rand(6, generator=gen) >= 0.5
    keep2 = torch.rand(6, generator=gen) >= 0.5
    expected = 2 * (m1 * keep1 + m2 * keep2)
    assert torch.equal(tv.dare(base, m1, m2, seed=123, p=0.5), expected)


def test_dare_same_mask_for_any_dtype_and_thread_count():
    g = torch.Generator().manual_seed(2)
    base, m = torch.zeros(4096), torch.randn(4096, generator=g).abs() + 1
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = tv.dare(base, m, seed=5, p=0.7)
        torch.set_num_threads(max(2, threads))
        many = tv.dare(base, m, seed=5, p=0.7)
    finally:
        torch.set_num_threads(threads)
    wide = tv.dare(base.double(), m.double(), seed=5, p=0.7)
    assert torch.equal(one, many)
    assert torch.equal(one != 0, wide != 0)


def test_dare_p_edges_and_ties_sign():
    base, m1, m2 = t(1, 1), t(2, -1), t(-2, 2)
    assert torch.equal(tv.dare(base, m1, m2, seed=0, p=0.0), base + (m1 - base) + (m2 - base))
    assert torch.equal(tv.dare(base, m1, m2, seed=0, p=1.0), base)
    # deltas [1, -2] and [-3, 1]: mass [-2, -1] elects [-, -]; agreeing entries sum to [-3, -2]
    assert torch.equal(tv.dare(base, m1, m2, seed=0, p=0.0, ties_sign=True), base + t(-3, -2))
    with pytest.raises(ValueError):
        tv.dare(base, m1, seed=0, p=1.5)


def test_dare_expectation():
    n = 200_000
    base, delta1, delta2 = torch.full((n,), 0.5), torch.ones(n), torch.full((n,), 2.0)
    out = tv.dare(base, base + delta1, base + delta2, seed=11, p=0.9)
    # each delta survives with probability 0.1, scaled by 10: mean 3 + 0.5, std of the mean ~ 0.0212
    assert abs(out.mean().item() - 3.5) < 0.1
    kept = ((out - base) != 0).float().mean().item()
    assert abs(kept - (1 - 0.9**2)) < 0.01


def test_model_stock_hand_cases():
    base = t(1, 1)
    # orthogonal deltas: cos 0 -> t 0 -> base
    assert torch.equal(tv.model_stock(base, base + t(1, 0), base + t(0, 1)), base)
    # identical deltas: cos 1 -> t 1 -> their average
    assert torch.equal(tv.model_stock(base, base + t(2, 4), base + t(2, 4)), t(3, 5))
    # 45 degrees: cos = 1/sqrt 2, t = 2c / (c + 1) = 2 (sqrt 2 - 1); mean delta [1, 0.5]
    ratio = 2 * (math.sqrt(2) - 1)
    out = tv.model_stock(base, base + t(1, 0), base + t(1, 1))
    assert torch.allclose(out, t(1 + ratio, 1 + ratio / 2), atol=1e-12)


def test_model_stock_three_models_uses_mean_pairwise_cosine():
    base = t(0, 0, 0)
    models = [t(1, 0, 0), t(1, 1, 0), t(1, 1, 1)]
    flat = [m / m.norm() for m in models]
    c = ((flat[0] @ flat[1]) + (flat[0] @ flat[2]) + (flat[1] @ flat[2])) / 3
    ratio = 3 * c / (2 * c + 1)
    out = tv.model_stock(base, *models)
    assert torch.allclose(out, ratio * sum(models) / 3, atol=1e-12)


def test_model_stock_degenerate_cases_stay_finite():
    base = torch.randn(8, 4, 1, 1, generator=torch.Generator().manual_seed(3))
    d = torch.randn(8, 4, 1, 1, generator=torch.Generator().manual_seed(4))
    # opposite deltas: cos -1 = -1/(k - 1), the pole of k·c / ((k - 1)·c + 1); clamped to c = 0 -> base
    assert torch.equal(tv.model_stock(base, base + d, base - d), base)
    # three deltas summing to zero: mean cosine -1/2 = -1/(k - 1) again
    e = torch.randn(8, 4, 1, 1, generator=torch.Generator().manual_seed(5))
    out = tv.model_stock(base, base + d, base + e, base - d - e)
    assert torch.equal(out, base)
    # zero deltas (a model equal to the base) and all-zero tensors
    assert torch.equal(tv.model_stock(base, base, base + d), base)
    zero = torch.zeros(8, 4, 1, 1)
    assert torch.equal(tv.model_stock(zero, zero, zero), zero)


def test_model_stock_needs_two_models():
    with pytest.raises(ValueError):
        tv.model_stock(t(1), t(2))


# ---------------------------------------------------------------- properties of every registered method

DEFAULT_PARAMS = {
    "weighted_sum": {"alpha": 0.3},
    "add_difference": {"alpha": 0.7},
    "add_rounded_difference": {"alpha": 0.7},
    "triple_sum": {"alpha": 0.2, "beta": 0.3},
    "sum_twice": {"alpha": 0.4, "beta": 0.6},
    "train_difference": {"alpha": 0.8},
    "slerp": {"alpha": 0.35},
    "dare": {"seed": 42},
}
ALPHA_ZERO = {  # params that must return the first input exactly
    "weighted_sum": {"alpha": 0.0},
    "add_difference": {"alpha": 0.0},
    "add_rounded_difference": {"alpha": 0.0},
    "triple_sum": {"alpha": 0.0, "beta": 0.0},
    "sum_twice": {"alpha": 0.0, "beta": 0.0},
    "train_difference": {"alpha": 0.0},
    "slerp": {"alpha": 0.0},
    "ties": {"alpha": 0.0},
    "dare": {"seed": 1, "alpha": 0.0},
    "copy": {},
    "keep": {},
}
ALPHA_ONE = {  # params that must return the second input exactly
    "weighted_sum": {"alpha": 1.0},
    "slerp": {"alpha": 1.0},
    "triple_sum": {"alpha": 1.0, "beta": 0.0},
    "sum_twice": {"alpha": 1.0, "beta": 0.0},
}
SHAPES = [(7,), (4, 3), (6, 5, 1, 1), (2, 3, 3, 3), ()]


def _inputs(name: str, shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0, zero: bool = False) -> list:
    spec = METHODS[name]
    count = spec.min_inputs + (1 if spec.variadic else 0)
    g = torch.Generator().manual_seed(seed)
    if zero:
        return [torch.zeros(shape, dtype=dtype) for _ in range(count)]
    return [torch.randn(shape, generator=g, dtype=dtype) for _ in range(count)]


def test_default_params_cover_every_required_parameter():
    for name, spec in METHODS.items():
        required = {p.name for p in spec.params if p.required}
        assert required <= set(DEFAULT_PARAMS.get(name, {})), name


@pytest.mark.parametrize("name", sorted(METHODS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_shape_dtype_fresh_output_and_inputs_untouched(name, dtype, shape):
    tensors = _inputs(name, shape, dtype)
    before = [x.clone() for x in tensors]
    out = call_method(name, tensors, DEFAULT_PARAMS.get(name, {}))
    assert out.shape == shape and out.dtype == dtype
    assert torch.isfinite(out).all()
    assert all(out.data_ptr() != x.data_ptr() for x in tensors)
    assert all(torch.equal(x, y) for x, y in zip(tensors, before))


@pytest.mark.parametrize("name", sorted(METHODS))
@pytest.mark.parametrize("shape", [(5, 4, 1, 1), (3,)], ids=str)
def test_zero_tensors_give_finite_zeros(name, shape):
    out = call_method(name, _inputs(name, shape, torch.float32, zero=True), DEFAULT_PARAMS.get(name, {}))
    assert torch.equal(out, torch.zeros(shape))


@pytest.mark.parametrize("name", sorted(ALPHA_ZERO))
def test_alpha_zero_returns_first_input(name):
    tensors = _inputs(name, (4, 3), torch.float32, seed=9)
    assert torch.equal(call_method(name, tensors, ALPHA_ZERO[name]), tensors[0])


@pytest.mark.parametrize("name", sorted(ALPHA_ONE))
def test_alpha_one_returns_second_input(name):
    tensors = _inputs(name, (4, 3), torch.float32, seed=10)
    assert torch.equal(call_method(name, tensors, ALPHA_ONE[name]), tensors[1])


finite = st.floats(-1e3, 1e3, allow_nan=False, width=32)


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_random_inputs_finite_and_untouched(data):
    name = data.draw(st.sampled_from(sorted(METHODS)))
    spec = METHODS[name]
    n = data.draw(st.integers(1, 9))
    count = spec.min_inputs + data.draw(st.integers(0, 2 if spec.variadic else 0))
    tensors = [torch.tensor(data.draw(st.lists(finite, min_size=n, max_size=n))) for _ in range(count)]
    before = [x.clone() for x in tensors]
    out = call_method(name, tensors, DEFAULT_PARAMS.get(name, {}))
    assert out.shape == (n,) and torch.isfinite(out).all()
    assert all(torch.equal(x, y) for x, y in zip(tensors, before))


@settings(max_examples=60, deadline=None)
@given(st.lists(finite, min_size=2, max_size=8), st.lists(finite, min_size=2, max_size=8), st.floats(0, 1))
def test_slerp_keeps_norm_of_equal_norm_inputs(xs, ys, alpha):
    n = min(len(xs), len(ys))
    a, b = torch.tensor(xs[:n], dtype=F64), torch.tensor(ys[:n], dtype=F64)
    if a.norm() < 1e-3 or b.norm() < 1e-3:
        return
    b = b * (a.norm() / b.norm())
    cos = (a @ b / a.norm() / b.norm()).item()
    out = ip.slerp(a, b, alpha=alpha)
    if abs(cos) <= ip.SLERP_DOT_THRESHOLD:
        assert math.isclose(out.norm().item(), a.norm().item(), rel_tol=1e-9)


@settings(max_examples=60, deadline=None)
@given(st.lists(finite, min_size=1, max_size=8), st.floats(-1, 2), st.floats(-1, 2))
def test_weighted_sum_family_agrees(xs, alpha, beta):
    n = len(xs)
    a = torch.tensor(xs, dtype=F64)
    b, c = a.flip(0) * 0.5 + 1, a * -2
    ws = ip.weighted_sum(a, b, alpha=alpha)
    assert torch.allclose(ws, (1 - alpha) * a + alpha * b, rtol=1e-12, atol=1e-9)
    assert torch.allclose(ip.add_difference(a, b, c, alpha=alpha), a + alpha * (b - c), rtol=1e-12, atol=1e-9)
    expect = (1 - alpha - beta) * a + alpha * b + beta * c
    assert torch.allclose(ip.triple_sum(a, b, c, alpha=alpha, beta=beta), expect, rtol=1e-12, atol=1e-9)
    twice = (1 - beta) * ((1 - alpha) * a + alpha * b) + beta * c
    assert torch.allclose(ip.sum_twice(a, b, c, alpha=alpha, beta=beta), twice, rtol=1e-12, atol=1e-9)
    assert ws.shape == (n,)


@settings(max_examples=60, deadline=None)
@given(st.lists(finite, min_size=1, max_size=8), st.floats(0, 1), st.sampled_from([0.2, 0.5, 1.0]))
def test_ties_and_dare_are_odd_in_the_deltas(xs, alpha, density):
    """Negating every delta negates the merged delta, bit for bit, stated on the deltas the method sees.

    With base 0 the deltas are the inputs themselves, so negating them is exact. With a base, (base + d) - base
    is not d (nor is it the negation of (base - d) - base: the ulps above and below base differ), and a trim or
    sign election tie can then go either way, so the base is covered by translation instead: the method's deltas
    are m - base, rounded once, and its result is base + the merged delta, bit for bit.
    """
    base = torch.tensor(xs, dtype=F64)
    zero = torch.zeros_like(base)
    d1, d2 = base.flip(0) - 0.25, base * 0.5 + 1
    merges = (lambda b, *ms: tv.ties(b, *ms, alpha=alpha, density=density),
              lambda b, *ms: tv.dare(b, *ms, seed=3, p=0.5, ties_sign=True))
    for merge in merges:
        assert torch.equal(merge(zero, d1, d2), -merge(zero, -d1, -d2))
        m1, m2 = base + d1, base + d2
        assert torch.equal(merge(base, m1, m2), base + merge(zero, m1 - base, m2 - base))


@settings(max_examples=60, deadline=None)
@given(st.lists(finite, min_size=1, max_size=8), st.floats(0, 1))
def test_model_stock_ratio_in_unit_interval(xs, scale):
    base = torch.tensor(xs, dtype=F64)
    deltas = [base.flip(0) - 0.25, base * scale - 1, -base]
    ratio = tv.model_stock_ratio([d.clone() for d in deltas])
    assert 0.0 <= ratio <= 1.0
    out = tv.model_stock(torch.zeros_like(base), *deltas)
    assert torch.isfinite(out).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", sorted(METHODS))
def test_cuda_matches_cpu(name):
    tensors = _inputs(name, (64, 33), torch.float64, seed=12)
    params = DEFAULT_PARAMS.get(name, {})
    cpu = call_method(name, tensors, params)
    gpu = call_method(name, [x.cuda() for x in tensors], params)
    assert gpu.device.type == "cuda"
    if name in ("dare", "ties"):  # same masks, so the same entries survive
        assert torch.equal((cpu != tensors[0]), (gpu.cpu() != tensors[0]))
    assert torch.allclose(cpu, gpu.cpu(), rtol=1e-12, atol=1e-12)


def test_rounding_matches_a1111_and_separate_products():
    g = torch.Generator().manual_seed(13)
    a, b, c = (torch.randn(1001, generator=g) for _ in range(3))
    alpha = 0.3
    assert torch.equal(ip.weighted_sum(a, b, alpha=alpha), ((1 - alpha) * a) + (alpha * b))  # A1111's expression
    assert torch.equal(ip.add_difference(a, b, c, alpha=alpha), a + (alpha * (b - c)))
    assert torch.equal(ip.linear([a, b, c], [0.25, -1.5, 3.0]), a * 0.25 + b * -1.5 + c * 3.0)
    # SuperMerger's trainDifference, written out step by step in fp32
    dist_c, dist_a = (b - c).abs(), (b - a).abs()
    scale = torch.where(dist_c + dist_a != 0, dist_a / (dist_c + dist_a), torch.tensor(0.0))
    new_diff = torch.sign(b - c) * scale.abs() * (b - c).abs()
    assert torch.equal(ip.train_difference(a, b, c, alpha=alpha), a + new_diff * (alpha * 1.8))


@pytest.mark.parametrize("name", sorted(METHODS))
def test_bit_identical_across_thread_counts(name):
    tensors = _inputs(name, (3, 50_001), torch.float32, seed=14)
    params = DEFAULT_PARAMS.get(name, {})
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = call_method(name, tensors, params)
        torch.set_num_threads(max(4, threads))
        many = call_method(name, tensors, params)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)


def test_fixed_reductions(monkeypatch):
    from mergekit_sdxl.methods import reduce

    assert reduce.fixed_sum(torch.zeros(0)).item() == 0.0
    assert reduce.fixed_sum(torch.tensor(2.5)).item() == 2.5
    monkeypatch.setattr(reduce, "ROW", 8)  # small rows: 1000 elements take four levels
    x = torch.randn(1000, generator=torch.Generator().manual_seed(15), dtype=F64)
    assert math.isclose(reduce.fixed_sum(x).item(), math.fsum(x.tolist()), rel_tol=1e-12, abs_tol=1e-12)
    monkeypatch.setattr(reduce, "BLOCK", 64)  # float64 blocks too: 1000 elements in 16 blocks
    y32 = x.float()
    squares = math.fsum(v * v for v in y32.double().tolist())
    assert math.isclose(reduce.dot64(y32, y32), squares, rel_tol=1e-12)
    assert math.isclose(reduce.norm64(y32) ** 2, squares, rel_tol=1e-12)
    assert math.isclose(reduce.dot64(y32 * 1e20, y32 * 1e-20), squares, rel_tol=1e-6)  # no fp32 overflow/underflow
    assert reduce.dot64(torch.zeros(0), torch.zeros(0)) == 0.0
    monkeypatch.undo()
    y = torch.randn(3 * reduce.ROW * 40 + 17, generator=torch.Generator().manual_seed(16))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = reduce.fixed_sum(y)
        torch.set_num_threads(max(4, threads))
        many = reduce.fixed_sum(y)
        torch.set_num_threads(1)
        one64 = reduce.dot64(y, y.flip(0))
        torch.set_num_threads(max(4, threads))
        many64 = reduce.dot64(y, y.flip(0))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many) and one64 == many64


def _orthonormal(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    u, v = torch.randn(n, generator=g, dtype=F64), torch.randn(n, generator=g, dtype=F64)
    u /= u.norm()
    v -= (v @ u) * u
    return u, v / v.norm()


@pytest.mark.parametrize("scale", [1e20, 1e-20, 1.0])
def test_slerp_at_extreme_magnitudes_matches_the_closed_form(scale):
    """A = s·u, B = s·(cos θ u + sin θ v) with u ⟂ v unit vectors: slerp(alpha) = s·(cos αθ u + sin αθ v).
    fp32 norms overflowed (1e20) or vanished (1e-20) there and slerp silently became weighted_sum."""
    u, v = _orthonormal(4000, 21)
    theta, alpha = 1.1, 0.3
    a = (scale * u).float()
    b = (scale * (math.cos(theta) * u + math.sin(theta) * v)).float()
    want = scale * (math.cos(alpha * theta) * u + math.sin(alpha * theta) * v)
    got = ip.slerp(a, b, alpha=alpha)
    assert got.dtype == torch.float32
    assert ((got.double() - want).norm() / want.norm()).item() < 1e-6
    lerp = ip.weighted_sum(a, b, alpha=alpha).double()
    assert ((lerp - want).norm() / want.norm()).item() > 1e-2  # the fallback would be told apart


@pytest.mark.parametrize("scale", [1e20, 1e-20, 1.0])
def test_model_stock_at_extreme_magnitudes_matches_the_closed_form(scale):
    """Two deltas s·u and s·(cos φ u + sin φ v): t = 2 cos φ / (cos φ + 1), result = base + t·mean(deltas).
    fp32 norms gave t = 0 (the base) at 1e±20."""
    u, v = _orthonormal(4000, 22)
    phi = 0.7
    base = scale * torch.randn(4000, generator=torch.Generator().manual_seed(23), dtype=F64)
    d1, d2 = scale * u, scale * (math.cos(phi) * u + math.sin(phi) * v)
    m1, m2, b32 = (base + d1).float(), (base + d2).float(), base.float()
    t = 2 * math.cos(phi) / (math.cos(phi) + 1)
    deltas = [m1.double() - b32.double(), m2.double() - b32.double()]  # what fp32 storage left of the deltas
    want = b32.double() + t * (deltas[0] + deltas[1]) / 2
    assert tv.model_stock_ratio([m1 - b32, m2 - b32]) == pytest.approx(t, rel=1e-5)
    got = tv.model_stock(b32, m1, m2).double()
    assert ((got - want).norm() / (want - b32.double()).norm()).item() < 1e-5


@pytest.mark.parametrize("bf16", [False, True])
def test_add_rounded_difference_is_supermerger_2025_arithmetic(bf16):
    """SuperMerger 2025-01-20 .. 2025-11-26: B - C stored in B's dtype, then lerp(A, A + alpha * d, 1) in fp32."""
    store = torch.bfloat16 if bf16 else torch.float16
    g = torch.Generator().manual_seed(0)
    a, b, c = ((torch.randn(100_000, generator=g) * 0.05).to(store) for _ in range(3))
    d = (b.to(torch.float32) - c.to(torch.float32)).to(store)
    theirs = torch.lerp(a.to(torch.float32), a.to(torch.float32) + 0.3 * d.to(torch.float32), 1.0).to(store)
    ours = call_method("add_rounded_difference", [a.float(), b.float(), c.float()], {"alpha": 0.3, "bf16": bf16})
    assert torch.equal(ours.to(store), theirs)
    plain = call_method("add_difference", [a.float(), b.float(), c.float()], {"alpha": 0.3})
    assert not torch.equal(plain.to(store), theirs)  # the rounded difference is what makes it exact
