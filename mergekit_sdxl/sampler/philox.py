"""CUDA's `torch.randn` stream reproduced on the CPU (A1111's "NV" noise source), in NumPy.

torch draws normal numbers on CUDA from Philox-4x32-10 (Salmon et al. 2011, "Parallel random numbers: as easy
as 1, 2, 3"): element k of a draw uses the counter (offset, 0, k, 0) under the 64-bit key `seed` (low word,
high word), and turns the first two 32-bit outputs into one normal number by the Box-Muller transform as cuRAND
does. Each draw advances the offset by one. This is the layout A1111's `rng_philox` uses, so a CPU-only machine
gets the noise an NVIDIA GPU would give (A1111 seed 0, shape (3, 4) starts -0.92466259, -0.42534415, ...).
"""

from __future__ import annotations

import numpy as np

PHILOX_M = (0xD2511F53, 0xCD9E8D57)  # round multipliers
PHILOX_W = (0x9E3779B9, 0xBB67AE85)  # key increments (golden ratio, sqrt(3) - 1)
ROUNDS = 10
# cuRAND's Box-Muller constants, as float32
TWO_POW32_INV = np.float32(2.3283064e-10)
TWO_POW32_INV_2PI = np.float32(2.3283064e-10 * 6.2831855)
MASK32 = np.uint64(0xFFFFFFFF)


def _mulhilo(a: int, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """High and low 32-bit words of the 64-bit products a * b."""
    product = b.astype(np.uint64) * np.uint64(a)
    return (product >> np.uint64(32)).astype(np.uint32), (product & MASK32).astype(np.uint32)


def philox4x32(counter: np.ndarray, key: tuple[int, int], rounds: int = ROUNDS) -> np.ndarray:
    """Philox-4x32 of `counter` ([4, N] uint32) under `key` (two 32-bit words); returns [4, N] uint32."""
    c = [counter[i].astype(np.uint32) for i in range(4)]
    k0, k1 = np.uint32(key[0]), np.uint32(key[1])
    for r in range(rounds):
        hi0, lo0 = _mulhilo(PHILOX_M[0], c[0])
        hi1, lo1 = _mulhilo(PHILOX_M[1], c[2])
        c = [hi1 ^ c[1] ^ k0, lo1, hi0 ^ c[3] ^ k1, lo0]
        if r < rounds - 1:
            k0 = np.uint32((int(k0) + PHILOX_W[0]) & 0xFFFFFFFF)
            k1 = np.uint32((int(k1) + PHILOX_W[1]) & 0xFFFFFFFF)
    return np.stack(c)


def box_muller(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """cuRAND's Box-Muller, first output only: sqrt(-2 ln u) sin(2 pi v) with u, v in (0, 1)."""
    u = x * TWO_POW32_INV + TWO_POW32_INV / 2  # uint32 x float32 -> float64, as A1111 computes it
    v = y * TWO_POW32_INV_2PI + TWO_POW32_INV_2PI / 2
    return (np.sqrt(-2.0 * np.log(u)) * np.sin(v)).astype(np.float32)


class PhiloxGenerator:
    """A seeded stream of CUDA-equivalent normal draws: `randn(shape)` then the next draw, and so on."""

    def __init__(self, seed: int) -> None:
        self.seed = int(seed) & 0xFFFFFFFFFFFFFFFF
        self.offset = 0

    def randn(self, shape: tuple[int, ...]) -> np.ndarray:
        """The next float32 draw of `shape` (at most 2**32 elements)."""
        n = int(np.prod(shape, dtype=np.int64))
        if n >= 2**32:
            raise ValueError("a single Philox draw holds at most 2**32 numbers")
        counter = np.zeros((4, n), dtype=np.uint32)
        counter[0] = self.offset
        counter[2] = np.arange(n, dtype=np.uint32)
        self.offset += 1
        bits = philox4x32(counter, (self.seed & 0xFFFFFFFF, self.seed >> 32))
        return box_muller(bits[0], bits[1]).reshape(shape)
