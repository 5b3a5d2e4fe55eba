"""Low-rank solver: exact recovery, optimal error, randomized accuracy, rank rules, clamping, determinism."""

from __future__ import annotations

import math

import pytest
import torch

from mergekit_sdxl.errors import UsageError
from mergekit_sdxl.lora.svd import RankRule, SolverOptions, factorize, optimal_energy


def _matrix(m: int, n: int, spectrum: torch.Tensor, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    k = spectrum.numel()
    u = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64)).Q
    return ((u * spectrum.double()) @ v.T).float()


def _error(a: torch.Tensor, f) -> float:
    return float(torch.linalg.norm(a.double() - f.up.double() @ f.down.double()))


def _optimal_error(a: torch.Tensor, r: int) -> float:
    s = torch.linalg.svdvals(a.double())
    return float(torch.sqrt((s[r:] ** 2).sum()))


@pytest.mark.parametrize("exact", [True, False])
@pytest.mark.parametrize("shape", [(300, 200), (200, 300)])
def test_planted_low_rank_is_recovered(exact, shape):
    g = torch.Generator().manual_seed(1)
    a = torch.randn(shape[0], 6, generator=g) @ torch.randn(6, shape[1], generator=g)
    f = factorize(a, RankRule("fixed", 16), SolverOptions(exact=exact), name="x")
    assert _error(a, f) / float(a.norm()) <= 1e-5
    assert f.energy == pytest.approx(1.0, abs=1e-6)


def test_exact_error_equals_optimal():
    a = _matrix(120, 90, torch.linspace(3, 0.1, 90))
    for r in (1, 8, 30):
        f = factorize(a, RankRule("fixed", r), SolverOptions(exact=True))
        assert _error(a, f) == pytest.approx(_optimal_error(a, r), rel=1e-4)
        assert f.energy == pytest.approx(optimal_energy(a, r), abs=1e-5)


@pytest.mark.parametrize("decay", ["i^-0.5", "i^-1", "exp"])
def test_randomized_within_two_percent_of_optimal(decay):
    n = 300
    i = torch.arange(1, n + 1, dtype=torch.float64)
    spectrum = {"i^-0.5": i ** -0.5, "i^-1": i ** -1.0, "exp": torch.exp(-i / 15)}[decay]
    a = _matrix(n, 600, spectrum)
    for r in (16, 32):
        f = factorize(a, RankRule("fixed", r), SolverOptions(), name=f"layer{r}")
        assert _error(a, f) <= 1.02 * _optimal_error(a, r)
        # the reported energy is what the factors really keep
        assert 1 - f.energy == pytest.approx(_error(a, f) ** 2 / float(a.double().norm()) ** 2, rel=1e-3, abs=1e-6)


def test_seeded_and_deterministic():
    a = _matrix(400, 300, torch.linspace(1, 0.01, 300))
    f1 = factorize(a, RankRule("fixed", 16), SolverOptions(seed=3), name="k")
    f2 = factorize(a, RankRule("fixed", 16), SolverOptions(seed=3), name="k")
    assert torch.equal(f1.up, f2.up) and torch.equal(f1.down, f2.down)


def test_dynamic_modes():
    s = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5, 0.25] + [0.0] * 34)
    a = _matrix(60, 40, s)
    total = float((s ** 2).sum())
    fro = factorize(a, RankRule("fro", 32, 0.95), SolverOptions(exact=True))
    assert fro.rank == next(r for r in range(1, 7) if float((s[:r] ** 2).sum()) / total >= 0.95)
    assert factorize(a, RankRule("ratio", 32, 0.2), SolverOptions(exact=True)).rank == 3  # s >= 1.6
    assert factorize(a, RankRule("threshold", 32, 0.9), SolverOptions(exact=True)).rank == 4
    cum = factorize(a, RankRule("cumulative", 32, 0.9), SolverOptions())
    assert cum.rank == next(r for r in range(1, 7) if float(s[:r].sum()) / float(s.sum()) >= 0.9)
    assert factorize(a, RankRule("fro", 2, 0.999), SolverOptions(exact=True)).rank == 2  # max rank caps
    assert factorize(a, RankRule("ratio", 32, 0.2), SolverOptions()).rank == 3  # randomized agrees


def test_rule_parsing_and_errors():
    assert RankRule.parse(None, 16) == RankRule("fixed", 16)
    assert RankRule.parse("fro:0.9", 32) == RankRule("fro", 32, 0.9)
    for bad in ("fro", "fro:x", "fro:1.5", "magic:0.5"):
        with pytest.raises(UsageError):
            RankRule.parse(bad, 8)


def test_zero_delta_gives_rank_zero():
    f = factorize(torch.zeros(10, 7), RankRule("fixed", 4))
    assert f.rank == 0 and f.up.shape == (10, 0) and f.down.shape == (0, 7) and f.energy == 1.0


def test_clamp_is_lossy_and_measured():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(200, 8, generator=g) @ torch.randn(8, 150, generator=g)
    a[0, 0] += 50.0  # an outlier the clamp will cut
    plain = factorize(a, RankRule("fixed", 8), SolverOptions(exact=True))
    clamped = factorize(a, RankRule("fixed", 8), SolverOptions(exact=True), clamp_quantile=0.99)
    assert clamped.energy < plain.energy
    measured = 1 - _error(a, clamped) ** 2 / float(a.double().norm()) ** 2
    assert clamped.energy == pytest.approx(measured, abs=1e-5)
    assert math.isfinite(clamped.energy)
