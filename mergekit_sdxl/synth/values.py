"""Synthetic tensor values: a pure function of (seed, key, shape), and deltas that relate one model to another.

Values are a pure function of (seed, key, shape): every tensor is cut into 1 Mi-element chunks and each chunk
draws from its own NumPy PCG64 generator seeded by sha256(seed, stream, key, chunk index), so results do not
depend on thread count, key order or which other keys are written. Floats are uniform with the variance of the
target distribution (like `torch.nn.Linear`'s default init; uniform numbers are 3-5x cheaper than normal ones,
which matters for 7 GB files): weights (2-D and more, conv included) mean 0, std 1/sqrt(fan_in); token and
position embeddings std 0.02; norm scales 1 +- std 0.02; biases std 0.01. Fixed values: `position_ids` =
0..76, `logit_scale` = ln 100, `v_pred`/`ztsnr` empty, `edm_vpred.sigma_max/min` = 120/0.002, SD1 EMA `decay`
0.9999 and `num_updates` 1000. NumPy's stream for a seed could change across NumPy releases; within one
environment a seed always gives byte-identical files.

Relations. `like=PATH, delta=...` copies every tensor of PATH and changes the float tensors of `components`
(default: UNet and text encoders):
- `"lowrank:R"`: every tensor with 2 or more dims gets W + U @ V (conv weights as the [out, in*k*k] matrix) with
  U [out, R], V [R, in*k*k] drawn from (seed, key) and scaled so that ||U V|| = 0.05 ||W|| (Frobenius); R is capped
  at min(out, in*k*k). Computed in float32, then cast: with dtype "F32" the difference to PATH has rank R up to
  rounding.
- `"noise:S"`: every tensor with more than one element gets W + S * std(W) * unit-variance noise ("fine-tune of
  A"; uniform noise, like the base values).
"""

from __future__ import annotations

import functools
import hashlib
import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from mergekit_sdxl.errors import ArchError, UsageError
from mergekit_sdxl.io.dtypes import is_float, parse_dtype, torch_dtype

DELTA_KINDS = ("lowrank", "noise")
CHUNK = 1 << 20  # elements per independently seeded chunk: part of the value definition, do not change
LOWRANK_RELATIVE_NORM = 0.05
_SERIAL_SLICE = 1 << 15  # torch's internal GRAIN_SIZE: smaller copies run on the calling thread
_SQRT3 = math.sqrt(3.0)
_LOCAL = threading.local()
_FIXED_FLOATS = {"logit_scale": math.log(100.0), "edm_vpred.sigma_max": 120.0, "edm_vpred.sigma_min": 0.002,
                 "model_ema.decay": 0.9999}


SCHEDULE_KEYS = frozenset({
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2"})


@dataclass(frozen=True)
class Delta:
    """A relation to a base model: `lowrank` (value = rank) or `noise` (value = scale)."""

    kind: str
    value: float

    @classmethod
    def parse(cls, text: str | Delta) -> Delta:
        """`"lowrank:8"` or `"noise:0.01"` -> Delta; UsageError for anything else."""
        if isinstance(text, Delta):
            return text
        kind, _, value = str(text).partition(":")
        try:
            number = float(value)
        except ValueError:
            number = -1.0
        ok = kind in DELTA_KINDS and number > 0 and math.isfinite(number)
        if ok and kind == "lowrank" and number != int(number):
            ok = False
        if not ok:
            raise UsageError(f"bad delta {text!r}: expected lowrank:RANK (integer > 0) or noise:SCALE (> 0)")
        return cls(kind, int(number) if kind == "lowrank" else number)

    def __str__(self) -> str:
        return f"{self.kind}:{self.value:g}"


def base_tensor(key: str, shape: tuple[int, ...], seed: int = 0, dtype: str = "F16") -> torch.Tensor:
    """The synthetic value of `key` with `shape` (float keys in `dtype`): a pure function of its arguments."""
    fixed = _fixed_value(key, shape)
    if fixed is not None:
        return fixed if not fixed.is_floating_point() else fixed.to(torch_dtype(float_code(dtype)))
    mean, std = _init_stats(key, shape)
    out = torch.empty(math.prod(shape), dtype=torch_dtype(float_code(dtype)))
    return _fill(out, seed, "init", key, mean, std).view(shape)


def unit_noise(seed: int, stream: str, key: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Float32 noise of mean 0 and variance 1 (uniform on +-sqrt(3)), a pure function of its arguments."""
    out = torch.empty(math.prod(shape), dtype=torch.float32)
    return _fill(out, seed, stream, key, 0.0, 1.0).view(shape)


def apply_delta(key: str, base: torch.Tensor, delta: str | Delta, seed: int) -> torch.Tensor:
    """`base` (any float dtype) plus the delta of (seed, key), as float32; unchanged copy where it does not apply.

    Only elementwise NumPy kernels and float64 pairwise sums are used (no BLAS, no torch reductions), so the
    result does not depend on thread counts.
    """
    delta = Delta.parse(delta)
    w = serial_cast(base, torch.float32)
    flat = w.numpy().reshape(-1)
    if delta.kind == "lowrank" and w.dim() >= 2 and w.numel() > 0:
        matrix = flat.reshape(w.shape[0], -1)
        rank = min(int(delta.value), *matrix.shape)
        u = unit_noise(seed, "lowrank.u", key, (matrix.shape[0], rank)).numpy()
        v = unit_noise(seed, "lowrank.v", key, (rank, matrix.shape[1])).numpy()
        w_norm, d_norm = math.sqrt(_sum_squares(flat)), _lowrank_norm(u, v)
        if w_norm > 0 and d_norm > 0:
            u *= np.float32(LOWRANK_RELATIVE_NORM * w_norm / d_norm)
            _add_product(matrix, u, v)
    elif delta.kind == "noise" and w.numel() > 1:
        scale = delta.value * _std(flat)
        for start, chunk in _uniform_chunks(seed, "noise", key, flat.size):
            flat[start:start + chunk.size] += _affine(chunk, 0.0, scale)
    return w


def serial_cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A contiguous copy of `tensor` in `dtype`, cast in slices small enough to stay on this thread."""
    src = tensor.reshape(-1)
    out = torch.empty(src.numel(), dtype=dtype)
    for i in range(0, src.numel(), _SERIAL_SLICE):
        out[i:i + _SERIAL_SLICE].copy_(src[i:i + _SERIAL_SLICE])
    return out.view(tensor.shape)


def _sum_squares(flat: np.ndarray) -> float:
    """Sum of squares in float64, chunk by chunk (deterministic: einsum without BLAS)."""
    return sum(float(np.einsum("i,i->", c, c)) for c in _f64_chunks(flat))


def _std(flat: np.ndarray) -> float:
    """Population standard deviation in float64 (two passes, deterministic)."""
    mean = sum(float(c.sum()) for c in _f64_chunks(flat)) / flat.size
    return math.sqrt(sum(float(np.einsum("i,i->", c - mean, c - mean)) for c in _f64_chunks(flat)) / flat.size)


def _f64_chunks(flat: np.ndarray) -> Iterator[np.ndarray]:
    for start in range(0, flat.size, CHUNK):
        yield flat[start:start + CHUNK].astype(np.float64)


def _lowrank_norm(u: np.ndarray, v: np.ndarray) -> float:
    """||u @ v||_F from the two rank x rank Gram matrices: sqrt(sum((u'u) * (v v')))."""
    u64, v64 = u.astype(np.float64), v.astype(np.float64)
    gram_u, gram_v = np.einsum("ir,is->rs", u64, u64), np.einsum("rj,sj->rs", v64, v64)
    return math.sqrt(max(0.0, float(np.einsum("rs,rs->", gram_u, gram_v))))


def _add_product(matrix: np.ndarray, u: np.ndarray, v: np.ndarray) -> None:
    """matrix += u @ v, by row blocks of about CHUNK / 16 elements with einsum (no BLAS: thread-independent)."""
    step = max(1, (CHUNK // 16) // matrix.shape[1])
    block = np.empty((min(step, matrix.shape[0]), matrix.shape[1]), dtype=np.float32)
    for start in range(0, matrix.shape[0], step):
        rows = block[: min(step, matrix.shape[0] - start)]
        np.einsum("ir,rj->ij", u[start:start + step], v, out=rows)
        matrix[start:start + step] += rows


def _uniform_chunks(seed: int, stream: str, key: str, n: int) -> Iterator[tuple[int, np.ndarray]]:
    """(start, float32 U[0, 1) array) for each CHUNK-sized piece of an n-element tensor; the buffer is reused.

    Chunk i draws from PCG64 with state and increment taken from sha256(seed, stream, key, i) (set directly:
    a SeedSequence per chunk would cost 8x more than the draws of a typical tiny tensor).
    """
    bits, generator = _generator()
    buffer = np.empty(min(n, CHUNK), dtype=np.float32)
    for index, start in enumerate(range(0, n, CHUNK)):
        piece = buffer[: min(CHUNK, n - start)]
        digest = hashlib.sha256(f"{seed}\x1f{stream}\x1f{key}\x1f{index}".encode()).digest()
        bits.state = {"bit_generator": "PCG64", "has_uint32": 0, "uinteger": 0,
                      "state": {"state": int.from_bytes(digest[:16], "little"),
                                "inc": int.from_bytes(digest[16:], "little") | 1}}
        generator.random(out=piece, dtype=np.float32)
        yield start, piece


def _fill(out: torch.Tensor, seed: int, stream: str, key: str, mean: float, std: float) -> torch.Tensor:
    """Fill the flat tensor `out` with uniform values of `mean` and `std` drawn from (seed, stream, key)."""
    # Casts go slice by slice below torch's parallel grain size: torch's intra-op threads cost 2-4x more CPU
    # than they save when the cores are busy (the writer thread, other processes). Small tensors are cast by
    # NumPy (less per-call overhead); both round to nearest even, so the bytes are the same either way.
    small = out.numel() < _SERIAL_SLICE and out.dtype in (torch.float16, torch.float32)
    array = out.numpy() if small else None  # shares out's memory
    for start, chunk in _uniform_chunks(seed, stream, key, out.numel()):
        values = _affine(chunk, mean, std)
        if array is not None:
            array[start:start + chunk.size] = values
            continue
        source = torch.from_numpy(values)
        for i in range(0, chunk.size, _SERIAL_SLICE):
            out[start + i:start + min(i + _SERIAL_SLICE, chunk.size)].copy_(source[i:i + _SERIAL_SLICE])
    return out


def _generator() -> tuple[np.random.PCG64, np.random.Generator]:
    """This thread's reusable (bit generator, generator) pair; its state is always set before use."""
    pair = getattr(_LOCAL, "pair", None)
    if pair is None:
        bits = np.random.PCG64(0)
        pair = _LOCAL.pair = (bits, np.random.Generator(bits))
    return pair


def _affine(u: np.ndarray, mean: float, std: float) -> np.ndarray:
    """U[0, 1) -> uniform with `mean` and `std`, in place (NumPy: far less per-call overhead than torch)."""
    np.multiply(u, np.float32(2.0 * _SQRT3 * std), out=u)
    np.add(u, np.float32(mean - _SQRT3 * std), out=u)
    return u


def _init_stats(key: str, shape: tuple[int, ...]) -> tuple[float, float]:
    """(mean, std) of a generated float tensor, from its name and shape."""
    if len(shape) >= 2:
        if key.endswith(("token_embedding.weight", "position_embedding.weight", "positional_embedding")):
            return 0.0, 0.02
        return 0.0, 1.0 / math.sqrt(max(1, math.prod(shape[1:])))
    if len(shape) == 1 and key.endswith("weight"):
        return 1.0, 0.02
    if len(shape) == 1 and key.endswith("bias"):
        return 0.0, 0.01
    raise ArchError(f"{key!r} {list(shape)}: no rule for synthetic values of this key")


def _fixed_value(key: str, shape: tuple[int, ...]) -> torch.Tensor | None:
    """Keys whose value is fixed (ids, markers, scalars, schedule buffers); None for generated ones."""
    if key.endswith("position_ids"):
        return torch.arange(shape[-1], dtype=torch.int64).expand(shape).contiguous()
    if key in ("v_pred", "ztsnr"):
        return torch.zeros(shape, dtype=torch.int64)
    if key == "model_ema.num_updates":
        return torch.full(shape, 1000, dtype=torch.int32)
    for name, value in _FIXED_FLOATS.items():
        if key == name or key.endswith("." + name):
            return torch.full(shape, value, dtype=torch.float32)
    if key in SCHEDULE_KEYS and len(shape) == 1:
        return torch.from_numpy(_ldm_schedule(shape[0])[key]).to(torch.float32)
    return None


@functools.cache
def _ldm_schedule(steps: int) -> dict[str, np.ndarray]:
    """LDM's registered schedule buffers for the scaled-linear betas 0.00085 -> 0.012 (as `register_schedule`)."""
    betas = np.linspace(0.00085**0.5, 0.012**0.5, steps, dtype=np.float64) ** 2
    alphas = 1.0 - betas
    ac = np.cumprod(alphas)
    ac_prev = np.append(1.0, ac[:-1])
    variance = betas * (1.0 - ac_prev) / (1.0 - ac)
    return {
        "betas": betas, "alphas_cumprod": ac, "alphas_cumprod_prev": ac_prev,
        "sqrt_alphas_cumprod": np.sqrt(ac), "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - ac),
        "log_one_minus_alphas_cumprod": np.log(1.0 - ac), "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / ac),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / ac - 1.0), "posterior_variance": variance,
        "posterior_log_variance_clipped": np.log(np.maximum(variance, 1e-20)),
        "posterior_mean_coef1": betas * np.sqrt(ac_prev) / (1.0 - ac),
        "posterior_mean_coef2": (1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac),
    }


def float_code(dtype: str) -> str:
    code = parse_dtype(dtype)
    if not is_float(code):
        raise UsageError(f"dtype {dtype!r} is not a float dtype")
    return code
