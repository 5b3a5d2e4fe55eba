"""Low-rank factorisation of one weight delta: seeded randomized SVD (default) or exact SVD, rank rules, clamping.

Retained energy is the fraction of ‖ΔW‖_F² the factors keep: 1 − ‖ΔW − up·down‖²_F / ‖ΔW‖²_F. For a truncated SVD
(exact or randomized: the randomized factors are an orthogonal projection of ΔW) it equals Σ_{i≤r} s_i² / ‖ΔW‖²_F,
so it comes for free; with clamping it is measured.

Rank rules (each with a maximum rank `rank`):
- `fixed`: r = rank.
- `fro:τ`: the fewest singular values whose energy Σ s_i² / ‖ΔW‖² reaches τ (0 < τ ≤ 1). kohya's `sv_fro p` keeps
  the Frobenius *norm* fraction p, i.e. our `fro:p²`.
- `ratio:ρ`: singular values s_i ≥ ρ·s_1 (0 < ρ ≤ 1; LyCORIS' `ratio`; kohya's `sv_ratio k` is ρ = 1/k).
- `threshold:t`: singular values s_i > t (absolute, LyCORIS' `threshold`).
- `cumulative:q`: the fewest singular values with Σ s_i / Σ_all s_i ≥ q (kohya's `sv_cumulative`). Needs every
  singular value, so this mode always runs the exact solver.
"""

from __future__ import annotations

import contextlib
import math
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from mergekit_sdxl.errors import UsageError

MODES = ("fixed", "fro", "ratio", "threshold", "cumulative")
# above this fraction of min(m, n), a randomized sketch costs about as much as the exact SVD
_EXACT_FRACTION = 0.5
SMALL = 1 << 18  # elements below which one thread is faster


@dataclass(frozen=True)
class RankRule:
    """How many singular values to keep: `mode` (see module docstring), its parameter, and the maximum rank."""

    mode: str = "fixed"
    rank: int = 64
    param: float = 0.0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise UsageError(f"unknown rank mode {self.mode!r}; use one of {', '.join(MODES)}")
        if self.rank < 1:
            raise UsageError(f"rank must be at least 1, got {self.rank}")
        bounded = {"fro": (0.0, 1.0), "ratio": (0.0, 1.0), "cumulative": (0.0, 1.0)}
        if self.mode in bounded and not 0.0 < self.param <= 1.0:
            raise UsageError(f"--dynamic {self.mode}:{self.param}: the parameter must be in (0, 1]")
        if self.mode == "threshold" and self.param < 0:
            raise UsageError(f"--dynamic threshold:{self.param}: the threshold must be >= 0")

    @classmethod
    def parse(cls, text: str | None, rank: int) -> RankRule:
        """`None`/"fixed" -> fixed rank; "fro:0.9", "ratio:0.05", "threshold:0.01", "cumulative:0.9" -> dynamic."""
        if not text or text == "fixed":
            return cls("fixed", rank)
        mode, sep, value = text.partition(":")
        if not sep:
            raise UsageError(f"--dynamic {text!r}: write MODE:VALUE, e.g. fro:0.9 (modes: {', '.join(MODES[1:])})")
        try:
            param = float(value)
        except ValueError:
            raise UsageError(f"--dynamic {text!r}: {value!r} is not a number") from None
        return cls(mode.strip().lower(), rank, param)

    @property
    def needs_all_values(self) -> bool:
        """True when the rule needs every singular value (only the exact solver gives them)."""
        return self.mode == "cumulative"

    def describe(self) -> str:
        """A short label: "64" or "fro:0.9 (max 64)"."""
        return str(self.rank) if self.mode == "fixed" else f"{self.mode}:{self.param:g} (max {self.rank})"

    def choose(self, s: torch.Tensor, total_sq: float, all_values: bool) -> int:
        """The rank for singular values `s` (descending) of a matrix with ‖ΔW‖²_F = total_sq."""
        limit = min(self.rank, s.numel())
        if limit == 0 or total_sq <= 0:
            return 0
        s = s.double().cpu()
        if self.mode == "fixed":
            return limit
        if self.mode == "fro":
            energy = torch.cumsum(s * s, 0) / total_sq
            reached = torch.nonzero(energy >= self.param - 1e-12)
            r = int(reached[0]) + 1 if reached.numel() else limit
        elif self.mode == "ratio":
            r = int((s >= self.param * s[0]).sum())
        elif self.mode == "threshold":
            r = int((s > self.param).sum())
        else:
            if not all_values:
                raise ValueError("cumulative rank selection needs every singular value")
            cum = torch.cumsum(s, 0) / s.sum()
            reached = torch.nonzero(cum >= self.param - 1e-12)
            r = int(reached[0]) + 1 if reached.numel() else limit
        return max(1, min(r, limit))


@dataclass(frozen=True)
class SolverOptions:
    """The SVD solver: randomized (seeded; `oversample` extra columns, `niter` power iterations) or `exact`."""

    exact: bool = False
    niter: int = 2
    oversample: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        if self.niter < 0 or self.oversample < 0:
            raise UsageError("--niter and --oversample must be >= 0")


@dataclass
class Factors:
    """ΔW ≈ up @ down (2-D, fp32, on the solver's device). `energy` as in the module docstring; `s` the kept
    singular values; `norm` = ‖ΔW‖_F."""

    up: torch.Tensor
    down: torch.Tensor
    s: torch.Tensor
    energy: float
    norm: float

    @property
    def rank(self) -> int:
        """Number of kept components (0 for a zero delta)."""
        return self.down.shape[0]


def layer_seed(seed: int, name: str) -> int:
    """A per-layer seed that depends only on the global seed and the layer's name (not on order or device)."""
    return (zlib.crc32(name.encode("utf-8")) ^ (seed * 0x9E3779B1)) & 0x7FFFFFFF


def factorize(delta: torch.Tensor, rule: RankRule, solver: SolverOptions = SolverOptions(), name: str = "",
              clamp_quantile: float | None = None) -> Factors:
    """Best rank-r factors of a 2-D delta under `rule` (`name` seeds the randomized sketch).

    Args:
        delta: the (out, in) matrix, float32 or float64, on any device.
        rule: rank rule with its maximum rank.
        solver: randomized (default) or exact.
        name: the layer's name; with `solver.seed` it seeds the random sketch, so results are reproducible.
        clamp_quantile: kohya's clamping (lossy, off by default): clip both factors to ±q-quantile of their values.

    Returns:
        Factors with up (out, r) and down (r, in); rank 0 when the delta is all zero.
    """
    if delta.ndim != 2:
        raise ValueError(f"factorize needs a matrix, got shape {tuple(delta.shape)}")
    with small_op_threads(delta.numel(), delta.device.type):
        return _factorize(delta, rule, solver, name, clamp_quantile)


@contextlib.contextmanager
def small_op_threads(numel: int, device_type: str = "cpu") -> Iterator[None]:
    """One CPU thread for work on small tensors: BLAS/LAPACK on tiny inputs only loses time to thread hand-offs
    (badly so on a loaded machine); large ones keep torch's thread count."""
    if device_type != "cpu" or numel >= SMALL or torch.get_num_threads() == 1:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _factorize(delta: torch.Tensor, rule: RankRule, solver: SolverOptions, name: str,
               clamp_quantile: float | None) -> Factors:
    a = delta if delta.dtype in (torch.float32, torch.float64) else delta.float()
    total_sq = float(torch.linalg.vector_norm(a, dtype=torch.float64) ** 2)
    m, n = a.shape
    if total_sq == 0.0 or m == 0 or n == 0:
        return _empty(m, n, a)
    want = min(rule.rank, m, n)
    sketch = want + solver.oversample
    exact = solver.exact or rule.needs_all_values or sketch >= _EXACT_FRACTION * min(m, n)
    u, s, vh = _exact_svd(a) if exact else _randomized_svd(a, sketch, solver.niter, layer_seed(solver.seed, name))
    r = rule.choose(s, total_sq, all_values=exact)
    u, s, vh = u[:, :r], s[:r], vh[:r]
    if clamp_quantile is not None:
        up, down = _clamp(u * s, vh, clamp_quantile)
        residual = float(torch.linalg.vector_norm(a - up @ down, dtype=torch.float64) ** 2)
        energy = 1.0 - residual / total_sq
    else:
        root = s.sqrt()
        up, down = u * root, root[:, None] * vh
        energy = float((s.double() ** 2).sum()) / total_sq
    return Factors(up.float(), down.float(), s.float(), min(1.0, max(0.0, energy)), math.sqrt(total_sq))


def optimal_energy(delta: torch.Tensor, rank: int) -> float:
    """The retained energy of the best rank-`rank` approximation (exact singular values; for tests/benchmarks)."""
    s = torch.linalg.svdvals(delta.double())
    total = float((s * s).sum())
    return float((s[:rank] ** 2).sum()) / total if total else 1.0


def _empty(m: int, n: int, like: torch.Tensor) -> Factors:
    z = like.new_zeros
    return Factors(z((m, 0), dtype=torch.float32), z((0, n), dtype=torch.float32), z((0,), dtype=torch.float32),
                   1.0, 0.0)


def _exact_svd(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD, solved on the tall orientation (wide matrices are several times slower in LAPACK)."""
    if a.shape[0] < a.shape[1]:
        u, s, vh = torch.linalg.svd(a.T, full_matrices=False)
        return vh.T, s, u.T
    return torch.linalg.svd(a, full_matrices=False)


def _randomized_svd(a: torch.Tensor, k: int, niter: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Halko-Martinsson-Tropp range finder with QR-stabilised power iterations; wide matrices via the transpose.

    The Gaussian test matrix is drawn on the CPU from a seeded generator, so it is the same on every device.
    """
    if a.shape[0] < a.shape[1]:
        u, s, vh = _randomized_svd(a.T, k, niter, seed)
        return vh.T, s, u.T
    generator = torch.Generator().manual_seed(seed)
    omega = torch.randn(a.shape[1], k, generator=generator, dtype=torch.float32).to(a.device, a.dtype)
    q = torch.linalg.qr(a @ omega).Q
    for _ in range(niter):
        q = torch.linalg.qr(a.T @ q).Q
        q = torch.linalg.qr(a @ q).Q
    # SVD of the small k x n matrix B = QᵀA through the QR of Bᵀ: only a k x k SVD is left
    qb, rb = torch.linalg.qr(a.T @ q)
    ur, s, vrh = torch.linalg.svd(rb.T)
    return q @ ur, s, (qb @ vrh.T).T


def _clamp(up: torch.Tensor, down: torch.Tensor, quantile: float) -> tuple[torch.Tensor, torch.Tensor]:
    """kohya's clamp: both factors (up carrying the singular values) clipped to ±(q-quantile of all their values)."""
    if not 0.0 < quantile <= 1.0:
        raise UsageError(f"--clamp-quantile must be in (0, 1], got {quantile}")
    values = torch.cat([up.reshape(-1), down.reshape(-1)]).sort().values
    position = quantile * (values.numel() - 1)
    lo, frac = int(math.floor(position)), position - math.floor(position)
    hi_val = values[lo] + (values[min(lo + 1, values.numel() - 1)] - values[lo]) * frac  # torch.quantile 'linear'
    return up.clamp(-hi_val, hi_val), down.clamp(-hi_val, hi_val)
