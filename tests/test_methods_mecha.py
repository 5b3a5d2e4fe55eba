"""Differential tests against sd-mecha 1.1.8's merge methods, called directly on tensors.

Where the two agree the tests say so to float precision; where they differ on purpose the test pins the
difference down (documented in the methods' docstrings):
- weighted_sum / add_difference: sd-mecha uses torch.lerp / addcmul (fused multiply-adds), we round each
  product and sum separately (A1111's expressions): equal to ~1 ulp.
- slerp: sd-mecha slerps the unit vectors and rescales to the lerp of the norms; we (like mergekit) apply the
  slerp coefficients to the raw tensors. Same result when the norms are equal, different otherwise.
- ties: sd-mecha's default `vote_sgn=False` elects the sign by *count*; ours elects by mass (the paper,
  mergekit), which is sd-mecha's `vote_sgn=True`. sd-mecha's top-k keeps every |x| >= its (1 - k)·n-th
  smallest value, i.e. one entry more than k·n on distinct values; ours keeps exactly round(k·n).
- model_stock: sd-mecha takes the cosine along the last dimension (per row; a 1x1 conv's rows have one
  element, so each cosine is +-1) and leaves the pole of t unguarded: it returns +-3.4e38 where we give base.
- dare: sd-mecha draws its mask on the tensors' device with a different scheme; not compared bit for bit.
"""

from __future__ import annotations

import pytest
import torch

sd_mecha = pytest.importorskip("sd_mecha")
mecha_linear = pytest.importorskip("sd_mecha.extensions.builtin.merge_methods.linear")
mecha_ties = pytest.importorskip("sd_mecha.extensions.builtin.merge_methods.ties")

from mergekit_sdxl.methods import interpolate as ip  # noqa: E402
from mergekit_sdxl.methods import task_vectors as tv  # noqa: E402


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 1.0, 1.25])
def test_weighted_sum_and_add_difference_match(alpha):
    a, b, c = _randn(64, 32, seed=1), _randn(64, 32, seed=2), _randn(64, 32, seed=3)
    al = torch.tensor(alpha)
    mecha = mecha_linear.weighted_sum.__wrapped__({"k": a}, {"k": b}, al, key="k")
    assert torch.allclose(mecha, ip.weighted_sum(a, b, alpha=alpha), rtol=0, atol=1e-6)
    mecha = mecha_linear.add_difference.__wrapped__({"k": a}, {"k": b - c}, al, key="k")
    assert torch.allclose(mecha, ip.add_difference(a, b, c, alpha=alpha), rtol=0, atol=1e-6)


def test_train_difference_matches_mask_form():
    a, b, c = _randn(40, 7, seed=4), _randn(40, 7, seed=5), _randn(40, 7, seed=6)
    a[:5] = b[:5]  # elements where A already equals B (scale 0)
    mask = mecha_linear.train_difference_mask.__wrapped__(a, b, c, torch.tensor(0.7))
    assert torch.allclose(a + mask * (b - c), ip.train_difference(a, b, c, alpha=0.7), rtol=0, atol=1e-6)


def test_slerp_matches_for_equal_norms_only():
    a, b = _randn(300, seed=7), _randn(300, seed=8)
    b_same = b * (a.norm() / b.norm())
    mecha = mecha_linear.slerp.__wrapped__(a, b_same, torch.tensor(0.3))
    assert torch.allclose(mecha, ip.slerp(a, b_same, alpha=0.3), rtol=0, atol=1e-5)
    mecha = mecha_linear.slerp.__wrapped__(a, 3 * b, torch.tensor(0.3))
    assert not torch.allclose(mecha, ip.slerp(a, 3 * b, alpha=0.3), rtol=0, atol=1e-3)


def test_ties_matches_sd_mecha_vote_sgn_with_its_keep_count():
    n = 100
    base = _randn(n, seed=9)
    models = [base + _randn(n, seed=10 + i) for i in range(3)]
    deltas = [m - base for m in models]
    mecha = base + mecha_ties.ties_sum.__wrapped__(*deltas, k=1.0, vote_sgn=True)
    assert torch.allclose(mecha, tv.ties(base, *models, density=1.0), rtol=0, atol=1e-6)
    # sd-mecha k=0.2 keeps n - int(0.8·n) + 1 = 21 of 100 entries; our density 0.21 keeps the same 21
    assert all(int((mecha_ties.filter_top_k(d, 0.2) != 0).sum()) == 21 for d in deltas)
    mecha = base + mecha_ties.ties_sum.__wrapped__(*deltas, k=0.2, vote_sgn=True)
    assert torch.allclose(mecha, tv.ties(base, *models, density=0.21), rtol=0, atol=1e-6)
    # sd-mecha's default count vote differs from the paper's mass vote
    by_count = base + mecha_ties.ties_sum.__wrapped__(*deltas, k=1.0, vote_sgn=False)
    assert not torch.allclose(by_count, tv.ties(base, *models, density=1.0), atol=1e-3)


def test_model_stock_matches_on_vectors():
    base = _randn(16, seed=20)
    x = _randn(16, seed=21)
    y = x + 0.5 * _randn(16, seed=22)  # positive cosine: no clamping on our side
    mecha = base + mecha_ties.model_stock.__wrapped__(x, y)
    assert torch.allclose(mecha, tv.model_stock(base, base + x, base + y), rtol=0, atol=1e-6)


def test_model_stock_1x1_conv_overflow_in_sd_mecha_is_guarded_here():
    base, d, e = _randn(8, 4, 1, 1, seed=23), _randn(8, 4, 1, 1, seed=24), _randn(8, 4, 1, 1, seed=25)
    mecha = mecha_ties.model_stock.__wrapped__(d, e)
    assert mecha.abs().max().item() == torch.finfo(torch.float32).max  # the +-3.4e38 users reported
    ours = tv.model_stock(base, base + d, base + e)
    assert torch.isfinite(ours).all() and (ours - base).abs().max() <= (d.abs() + e.abs()).max()
