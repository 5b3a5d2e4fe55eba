"""Reductions whose rounding does not depend on the thread count.

`torch.sum` over one long vector splits the work across threads, so the last bits of a dot product change with
`torch.get_num_threads()`. Summing fixed rows of ROW elements (each row is reduced by one thread, in order)
and then the row sums, level by level, gives the same bits whatever the thread count.

The float64 variants (`dot64`, `norm64`) are for angles and norms of weights: a square of an fp32 value overflows
fp32 from |x| ~ 1.8e19 and underflows below ~1e-19, while in float64 the square of every fp32 value (and
the sum of up to ~1e9 of them) is finite and normal. They convert block by block, so the float64 copies stay small.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

ROW = 4096


def fixed_sum(x: Tensor) -> Tensor:
    """Sum of all elements (0-dim, in x's dtype), reduced in a fixed order of ROW-element rows."""
    flat = x.reshape(-1)
    while flat.numel() > ROW:
        rows = flat.numel() // ROW
        parts = flat[: rows * ROW].view(rows, ROW).sum(dim=1)
        flat = torch.cat([parts, flat[rows * ROW :].sum().reshape(1)])
    return flat.sum()


BLOCK = 256 * ROW  # elements converted to float64 at a time: 8 MiB per temporary


def dot64(x: Tensor, y: Tensor) -> float:
    """Dot product of the flattened tensors, accumulated in float64; thread-count independent (a fixed_sum per
    BLOCK, then a fixed_sum of those)."""
    fx, fy = x.reshape(-1), y.reshape(-1)
    parts = []
    for start in range(0, fx.numel(), BLOCK):
        bx = fx[start : start + BLOCK].to(torch.float64)
        by = bx if y is x else fy[start : start + BLOCK].to(torch.float64)
        parts.append(fixed_sum(bx * by).reshape(1))
    return float(fixed_sum(torch.cat(parts))) if parts else 0.0


def norm64(x: Tensor) -> float:
    """Euclidean norm of the flattened tensor, computed in float64 (see dot64)."""
    return math.sqrt(dot64(x, x))
