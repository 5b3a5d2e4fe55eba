"""Classic checkpoint-merge formulas (A1111 / SuperMerger) and SLERP, as pure Tensor -> Tensor functions.

Conventions shared by every function here:
- inputs arrive in the compute dtype (fp32 or fp64) on one device; the result has the same dtype, shape and
  device, and is always a new tensor (inputs are never modified, never returned as-is);
- `alpha` is the weight of the *second* model (SuperMerger / A1111 direction: alpha=0 gives A, alpha=1 gives B);
- coefficients are Python floats, combined in double precision before they touch the tensors;
- every product and sum is rounded separately (`x * c`, then `+`), never fused: `torch.add(..., alpha=)`,
  `addcmul` and `lerp` may use a fused multiply-add depending on the kernel path (vector width, device), so
  avoiding them keeps results bit-identical across thread counts and machines, and makes `linear` round
  exactly like the engine's chunked version and `weighted_sum` like A1111.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from mergekit_sdxl.methods.reduce import dot64, norm64

TRAIN_DIFFERENCE_GAIN = 1.8
"""SuperMerger's fixed factor in trainDifference (`new_diff * alpha * 1.8`)."""

SLERP_DOT_THRESHOLD = 0.9995
"""|cos| above which slerp falls back to linear interpolation (mergekit's DOT_THRESHOLD)."""


def copy(a: Tensor) -> Tensor:
    """Keep A unchanged: returns a copy of `a`."""
    return a.clone()


def linear(tensors: Sequence[Tensor], coeffs: Sequence[float]) -> Tensor:
    """Linear combination sum_i c_i * x_i, accumulated left to right (reference for the engine's fused version).

    Args:
        tensors: at least one tensor, all of one shape and dtype.
        coeffs: one float per tensor.
    Returns:
        A new tensor: x_0·c_0, then + x_i·c_i for each further term (each product and sum rounded once); with a
        single term of coefficient 1 it equals that term bit for bit.
    """
    if len(tensors) != len(coeffs):
        raise ValueError(f"linear: {len(tensors)} tensors but {len(coeffs)} coefficients")
    if not tensors:
        raise ValueError("linear: needs at least one term")
    out = tensors[0] * float(coeffs[0])
    for x, c in zip(tensors[1:], coeffs[1:]):
        out.add_(x * float(c))
    return out


def weighted_sum(a: Tensor, b: Tensor, *, alpha: float) -> Tensor:
    """Weighted sum (1 - alpha)·A + alpha·B.

    Source: A1111 `modules/extras.py` `weighted_sum(theta0, theta1, alpha)` =
    `((1 - alpha) * theta0) + (alpha * theta1)`; SuperMerger "Weight sum" uses the same direction.
    That two-product form (unlike `a + alpha*(b - a)`, whose alpha=1 value is a + (b - a) != b in floating
    point) already gives the endpoints for finite inputs; alpha exactly 0 or 1 is still short-circuited to a
    copy of A or B so that the endpoints are bit-exact also for -0.0 and whatever B or A contain.
    """
    alpha = float(alpha)
    if alpha == 0.0:
        return a.clone()
    if alpha == 1.0:
        return b.clone()
    return linear((a, b), (1.0 - alpha, alpha))


def add_difference(a: Tensor, b: Tensor, c: Tensor, *, alpha: float) -> Tensor:
    """Add difference A + alpha·(B - C) (A1111 `add_difference`, SuperMerger "Add difference").

    alpha=0 returns a copy of A exactly.
    """
    alpha = float(alpha)
    if alpha == 0.0:
        return a.clone()
    return a + (b - c).mul_(alpha)


def add_rounded_difference(a: Tensor, b: Tensor, c: Tensor, *, alpha: float, bf16: bool = False) -> Tensor:
    """A + alpha·rnd(B - C): add difference with the difference rounded to fp16 (bf16 with `bf16`) first.

    SuperMerger's "Add difference" from 2023-07 to 2025-11 (`smerge` in `scripts/mergers/mergers.py`) stored B - C
    back in B's dtype (`(B.float() - C.float()).to(B.dtype)`, fp16 for fp16 models), then computed A + alpha·(B - C)
    in fp32; this rounds the same way in the compute dtype, so merging with compute fp32 reproduces its files bit
    for bit. alpha=0 returns a copy of A exactly.
    """
    alpha = float(alpha)
    if alpha == 0.0:
        return a.clone()
    delta = (b - c).to(torch.bfloat16 if bf16 else torch.float16).to(a.dtype)
    return a + delta.mul_(alpha)


def triple_sum(a: Tensor, b: Tensor, c: Tensor, *, alpha: float, beta: float) -> Tensor:
    """Triple sum (1 - alpha - beta)·A + alpha·B + beta·C (SuperMerger "Triple sum")."""
    alpha, beta = float(alpha), float(beta)
    return linear((a, b, c), (1.0 - alpha - beta, alpha, beta))


def sum_twice(a: Tensor, b: Tensor, c: Tensor, *, alpha: float, beta: float) -> Tensor:
    """Sum twice (1 - beta)·((1 - alpha)·A + alpha·B) + beta·C (SuperMerger "sum Twice").

    Computed as two weighted sums in that order, so beta=0 equals weighted_sum(A, B) and beta=1 gives C exactly.
    """
    return weighted_sum(weighted_sum(a, b, alpha=alpha), c, alpha=beta)


def train_difference(a: Tensor, b: Tensor, c: Tensor, *, alpha: float) -> Tensor:
    """SuperMerger's trainDifference: add difference, scaled per element by how far A is from B.

    With d = B - C:  result = A + 1.8·alpha·s·d,  s = |B - A| / (|B - A| + |B - C|)  (s = 0 where both are 0).

    Re-derived from SuperMerger `scripts/mergers/mergers.py`, `traindiff` (hako-mikan/sd-webui-supermerger):
    there `scale = |B-A| / (|B-C| + |B-A|)` (0 where the sum is 0), `new_diff = sign(B-C)·|scale|·|B-C|`
    (= s·d since s >= 0) and `theta_0 + new_diff * (alpha * 1.8)`, rounded here in the same order; SuperMerger
    runs in fp32, this in the compute dtype.
    Reading: an element where A already equals B gets nothing (s = 0), one where A sits at C gets
    0.9·alpha·d (s = 1/2), one where A is far from B relative to the B - C step gets up to 1.8·alpha·d.
    alpha=0 returns a copy of A exactly.
    """
    alpha = float(alpha)
    if alpha == 0.0:
        return a.clone()
    d = b - c
    dist_a = (b - a).abs_()
    denom = dist_a + d.abs()
    scale = torch.where(denom != 0, dist_a / denom, torch.zeros((), dtype=a.dtype, device=a.device))
    return a + scale.mul_(d).mul_(alpha * TRAIN_DIFFERENCE_GAIN)


def slerp(a: Tensor, b: Tensor, *, alpha: float) -> Tensor:
    """Spherical linear interpolation between A and B, treating each tensor as one flattened vector.

    With cos θ = <A, B> / (|A|·|B|):  result = sin((1 - alpha)·θ)/sin θ · A + sin(alpha·θ)/sin θ · B.
    Like mergekit's `slerp` (from the dvschultz gist) the coefficients apply to the raw tensors, so norms are
    interpolated implicitly. Falls back to weighted_sum (exactly) when |cos θ| > 0.9995 (nearly colinear or
    anti-colinear, where sin θ -> 0) or when either tensor is all zeros. alpha=0 / 1 give A / B exactly.
    The norms, the dot product and the scalar coefficients are computed in float64 (methods/reduce.py), so
    magnitudes far from 1 (1e±20) neither overflow nor vanish into a silent fallback.
    """
    alpha = float(alpha)
    if alpha in (0.0, 1.0):
        return weighted_sum(a, b, alpha=alpha)
    fa, fb = a.reshape(-1), b.reshape(-1)
    na, nb = norm64(fa), norm64(fb)  # float64: fp32 squares overflow from |x| ~ 2e19 and vanish below ~1e-19
    if na == 0.0 or nb == 0.0 or not (math.isfinite(na) and math.isfinite(nb)):
        return weighted_sum(a, b, alpha=alpha)
    cos = dot64(fa, fb) / na / nb
    if not math.isfinite(cos) or abs(cos) > SLERP_DOT_THRESHOLD:
        return weighted_sum(a, b, alpha=alpha)
    theta = math.acos(max(-1.0, min(1.0, cos)))
    sin_theta = math.sin(theta)
    return linear((a, b), (math.sin((1.0 - alpha) * theta) / sin_theta, math.sin(alpha * theta) / sin_theta))
