"""Reductions whose rounding does not depend on the thread count.

`torch.sum` over one long vector splits the work across threads, so the last bits of a dot product change with
`torch.get_num_threads()`. Summing fixed rows of ROW elements (each row is reduced by one thread, in order)
and then the row sums, level by level, gives the same bits whatever the thread count.
"""

from __future__ import annotations

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


def fixed_dot(x: Tensor, y: Tensor) -> Tensor:
    """Dot product of the flattened tensors (0-dim), thread-count independent."""
    return fixed_sum(x.reshape(-1) * y.reshape(-1))


def fixed_norm(x: Tensor) -> Tensor:
    """Euclidean norm of the flattened tensor (0-dim), thread-count independent."""
    return fixed_dot(x, x).sqrt()
