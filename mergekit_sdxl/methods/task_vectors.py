"""Task-vector merges from the research literature: TIES, DARE and Model Stock.

Each takes a `base` tensor and one or more fine-tuned tensors of the same shape, works on the deltas
tau_i = m_i - base, and returns base + (merged delta). Same conventions as `interpolate`: compute dtype in and
out, new tensor out, inputs untouched, products and sums rounded separately (no FMA), results independent
of device and thread count.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mergekit_sdxl.methods.reduce import dot64, norm64


def _deltas(base: Tensor, models: tuple[Tensor, ...]) -> list[Tensor]:
    if not models:
        raise ValueError("needs at least one model besides the base")
    return [m - base for m in models]


def _total(deltas: list[Tensor]) -> Tensor:
    """0 + d_0 + d_1 + ... left to right, exactly as the builtin sum() adds (its leading 0 turns -0.0 into 0.0).

    sum() itself would be typed Tensor | int and returns the int 0 for an empty list; `deltas` is never empty.
    """
    total = deltas[0] + 0
    for d in deltas[1:]:
        total = total + d
    return total


def keep_count(density: float, numel: int) -> int:
    """How many entries a top-k trim keeps: density·numel rounded half up, at least 1 when density > 0.

    Rounding (not flooring) keeps 0.3·10 = 2.9999999999999996 at 3; the floor of 1 keeps a 4-element bias at
    density 0.2 from vanishing (mergekit refuses k = 0 there).
    """
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"density must lie in [0, 1], got {density}")
    if density == 0.0:
        return 0
    return min(numel, max(1, math.floor(density * numel + 0.5)))


def top_k_mask(x: Tensor, k: int) -> Tensor:
    """Boolean mask of the k entries of largest |x|; among equal magnitudes the lower flat index wins.

    Deterministic on every device: the k-th largest magnitude is found with `kthvalue` (a value, so unique),
    everything above it is kept, and the remaining places go to the entries equal to it in index order.
    """
    flat = x.reshape(-1).abs()
    n = flat.numel()
    if k >= n:
        return torch.ones_like(x, dtype=torch.bool)
    mask = torch.zeros(n, dtype=torch.bool, device=x.device)
    if k <= 0:
        return mask.view(x.shape)
    threshold = torch.kthvalue(flat, n - k + 1).values
    mask |= flat > threshold
    missing = k - int(mask.sum())
    tied = torch.nonzero(flat == threshold).squeeze(1)[:missing]
    mask[tied] = True
    return mask.view(x.shape)


def _agreeing_sum(deltas: list[Tensor]) -> tuple[Tensor, Tensor]:
    """TIES sign election by mass, then the sum and count of the deltas that agree with it, per element.

    The elected sign is sign(sum of deltas); a delta agrees where it is nonzero with that sign. Where the sum
    is exactly 0 no sign is elected and nothing agrees.
    """
    elected = _total(deltas).sign_()
    total, count = torch.zeros_like(elected), torch.zeros_like(elected)
    for d in deltas:
        agree = d.mul(elected).gt_(0)  # 1.0 / 0.0 in the compute dtype
        total.addcmul_(d, agree)  # d·agree is exact (agree is 0 or 1), so no double-rounding question
        count.add_(agree)
    return total, count


def ties(base: Tensor, *models: Tensor, alpha: float = 1.0, density: float = 0.2) -> Tensor:
    """TIES-merging: trim, elect sign, disjoint mean (Yadav et al. 2023, arXiv:2306.01708).

    1. tau_i = m_i - base, each trimmed to its top-k magnitudes (k = keep_count(density, numel), see top_k_mask);
    2. elected sign per element: sign(sum_i trimmed tau_i) (the paper's "mass" election, mergekit's
       consensus "sum"; sd-mecha's default counts signs instead);
    3. disjoint mean: average of the trimmed tau_i whose sign equals the elected one (0 where none does);
    4. result base + alpha · merged.
    An exact tie in the mass (sum = 0) elects no sign, so the element stays at base (mergekit elects + there).
    """
    k = keep_count(float(density), base.numel())
    trimmed = [d.mul_(top_k_mask(d, k)) for d in _deltas(base, models)]
    total, count = _agreeing_sum(trimmed)
    merged = total.div_(count.clamp_(min=1))
    return base + merged.mul_(float(alpha))


def dare(
    base: Tensor, *models: Tensor, seed: int, p: float = 0.9, alpha: float = 1.0, ties_sign: bool = False
) -> Tensor:
    """DARE: drop and rescale (Yu et al. 2023, arXiv:2311.03099), summed like mergekit's `dare_linear`.

    For each model i, every element of tau_i = m_i - base is dropped with probability p and the survivors are
    scaled by 1/(1 - p), so E[result] = base + alpha · sum_i tau_i. The deltas are summed, not averaged
    (mergekit dare_linear / dare_ties default normalize=False): give per-model weights through the recipe.
    With ties_sign=True the rescaled deltas go through TIES' sign election (mass) and only agreeing entries
    are summed (mergekit `dare_ties`). p = 1 drops everything (result = base).

    Reproducibility: the keep masks come from `torch.rand` on a CPU `torch.Generator` seeded with `seed`, drawn
    in fp32 for model 1, then model 2, ..., and moved to the tensors' device, so the result is the same on
    every device and dtype and at any thread count (for a given torch version).
    """
    p = float(p)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must lie in [0, 1], got {p}")
    generator = torch.Generator(device="cpu")
    generator.manual_seed(int(seed))
    scale = 0.0 if p == 1.0 else 1.0 / (1.0 - p)
    deltas = []
    for d in _deltas(base, models):
        keep = torch.rand(d.shape, generator=generator, dtype=torch.float32) >= p
        deltas.append(d.mul_(keep.to(d.device)).mul_(scale))
    merged = _agreeing_sum(deltas)[0] if ties_sign else _total(deltas)
    return base + merged.mul_(float(alpha))


def model_stock_ratio(deltas: list[Tensor]) -> float:
    """Model Stock's interpolation ratio t = k·cos / ((k - 1)·cos + 1) from k deltas.

    cos is the mean pairwise cosine over all pairs i < j of the flattened deltas (mergekit's choice; the paper
    defines it for equal angles), from float64 norms and dot products (methods/reduce.py: fp32 squares would
    overflow or vanish at magnitudes like 1e±20 and silently give t = 0). Guards: a pair with a zero-norm delta
    counts as cos 0, and the mean is clamped to [0, 1], so t stays in [0, 1] and the denominator in [1, k].
    Unclamped, cos -> -1/(k - 1) (e.g. two opposite deltas, which a 1x1 conv's per-row cosine in sd-mecha hits)
    drives the denominator to 0 and t to +-inf; a negative cos would extrapolate away from the fine-tuned models.
    """
    k = len(deltas)
    flat = [d.reshape(-1) for d in deltas]
    norms = [norm64(f) for f in flat]
    total = 0.0
    for i in range(k):
        for j in range(i + 1, k):
            denom = norms[i] * norms[j]
            cos = dot64(flat[i], flat[j]) / denom if denom > 0 else 0.0
            total += min(1.0, max(-1.0, cos)) if math.isfinite(cos) else 0.0
    cos = min(1.0, max(0.0, total / (k * (k - 1) / 2)))
    return k * cos / ((k - 1) * cos + 1)


def model_stock(base: Tensor, *models: Tensor) -> Tensor:
    """Model Stock (Jang et al. 2024, arXiv:2403.19522): t·avg(models) + (1 - t)·base.

    t = k·cos θ / ((k - 1)·cos θ + 1) with k fine-tuned models and cos θ their mean pairwise delta cosine; see
    model_stock_ratio for the guards against the degenerate cases. Computed as base + t·mean(deltas).
    Needs at least two models.
    """
    if len(models) < 2:
        raise ValueError(f"model_stock needs at least 2 fine-tuned models besides the base, got {len(models)}")
    deltas = _deltas(base, models)
    t = model_stock_ratio(deltas)
    mean = _total(deltas).div_(len(deltas))
    return base + mean.mul_(t)
