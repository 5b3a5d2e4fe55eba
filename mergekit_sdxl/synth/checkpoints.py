"""Synthetic SDXL / SD1.5 single-file checkpoints with the key names of real ones (tests, benchmarks, demo).

Keys. The default key set is what a real fp16 release holds: every mandatory key of the architecture's key
table plus the text-encoder optionals (CLIP-L `position_ids` (int64), CLIP-L layer 11 and `final_layer_norm`;
for SDXL also bigG `ln_final`, `logit_scale`, `text_projection` and block 31). That is 2,515 keys for SDXL
(like `sd_xl_base_1.0.safetensors`) and 1,131 for SD1.5 (like a pruned EMA-only file). Other optional keys come in
groups (`include_optional=True` takes all of them, giving the full 2,531-key SDXL / 1,831-key SD1.5 table):
`"scheduler"` (the 12 LDM schedule buffers, computed from the real scaled-linear schedule), `"ema"` (SD1
`model_ema.*`) and `"markers"` (`v_pred`, `ztsnr`, `edm_vpred.sigma_*`: they turn the model into a v-prediction
/ zero-terminal-SNR one).

Shapes. `size="full"` uses the real shapes (SDXL: 3.469 B params, 6.94 GB in fp16); `size="tiny"` the shrunken but
internally consistent shapes of `mergekit_sdxl.arch.tiny` (SDXL: 14.3 M params, about 28.6 MB in fp16; most of it
the two 49,408-row token embeddings).

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
import json
import math
import os
import threading
from collections import deque
from collections.abc import Callable, Collection, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mergekit_sdxl.arch.detect import component_of, detect_arch
from mergekit_sdxl.arch.tables import COMPONENTS, check_arch, key_table
from mergekit_sdxl.arch.tiny import tiny_shape
from mergekit_sdxl.errors import ArchError, UsageError
from mergekit_sdxl.io.dtypes import is_float, parse_dtype, torch_dtype
from mergekit_sdxl.io.reader import CheckpointReader, open_checkpoint
from mergekit_sdxl.io.writer import SafetensorsWriter, TensorSpec, safetensors_order

SIZES = ("tiny", "full")
OPTIONAL_GROUPS = ("scheduler", "ema", "markers")
DELTA_COMPONENTS = ("unet", "clip_l", "clip_g")
DELTA_KINDS = ("lowrank", "noise")
CHUNK = 1 << 20  # elements per independently seeded chunk: part of the value definition, do not change
LOWRANK_RELATIVE_NORM = 0.05
_SERIAL_SLICE = 1 << 15  # torch's internal GRAIN_SIZE: smaller copies run on the calling thread
_BACKGROUND_WRITE = 64 << 20  # files from this size are written by a background thread
_WRITE_WINDOW = 256 << 20  # bytes generated but not yet written, at most (plus one tensor)
METADATA_KEY = "mergekit_sdxl.synth"
MODELSPEC_ARCH = {"sdxl": "stable-diffusion-xl-v1-base", "sd15": "stable-diffusion-v1"}
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


def checkpoint_keys(arch: str, include_optional: bool | Collection[str] = False) -> list[str]:
    """Sorted keys a synthetic `arch` checkpoint holds (see the module docstring for the groups)."""
    groups = _groups(include_optional) | {"release"}
    return [key for key, info in key_table(check_arch(arch)).items()
            if not info.optional or _optional_group(info.component) in groups]


def key_shape(arch: str, size: str, key: str) -> tuple[int, ...]:
    """Shape of `key` in a `size` ("tiny" or "full") checkpoint of `arch`."""
    if _check_size(size) == "tiny":
        return tiny_shape(arch, key)
    info = key_table(check_arch(arch)).get(key)
    if info is None:
        raise ArchError(f"{key!r} is not a key of a {arch} checkpoint")
    return info.shape


def plan_test_checkpoint(arch: str | None = None, size: str | None = None, dtype: str = "F16",
                         include_optional: bool | Collection[str] = False,
                         like: str | os.PathLike[str] | None = None) -> list[TensorSpec]:
    """The tensor specs (key, dtype code, shape) of a synthetic checkpoint, sorted by key; nothing is generated."""
    code = _float_code(dtype)
    if like is not None:
        with open_checkpoint(like) as reader:
            _like_arch(reader, arch)
            return [_spec_like(reader, key, code) for key in sorted(reader.keys())]
    arch, size = check_arch(arch or "sdxl"), _check_size(size or "tiny")
    table = key_table(arch)
    return [TensorSpec(key, code if is_float(_code(table[key].dtype)) else _code(table[key].dtype),
                       key_shape(arch, size, key)) for key in checkpoint_keys(arch, include_optional)]


def iter_test_tensors(arch: str | None = None, size: str | None = None, seed: int = 0, dtype: str = "F16",
                      like: str | os.PathLike[str] | None = None, delta: str | Delta | None = None,
                      include_optional: bool | Collection[str] = False,
                      components: Collection[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (key, tensor) of a synthetic checkpoint in key order, one tensor at a time.

    Arguments as for `write_test_checkpoint`.
    """
    source = _Source(arch, size, seed, dtype, like, delta, include_optional, components)
    try:
        for spec in source.specs:
            yield spec.key, source.tensor(spec)
    finally:
        source.close()


def write_test_checkpoint(path: str | os.PathLike[str], arch: str | None = None, size: str | None = None,
                          seed: int = 0, dtype: str = "F16", like: str | os.PathLike[str] | None = None,
                          delta: str | Delta | None = None, include_optional: bool | Collection[str] = False,
                          metadata: Mapping[str, str] | None = None, components: Collection[str] | None = None,
                          overwrite: bool = False, progress: Callable[[int], None] | None = None) -> Path:
    """Write a synthetic single-file checkpoint with the real key names, streamed one tensor at a time.

    Args:
        path: output `.safetensors` file (written to a temporary name, then renamed).
        arch: "sdxl" or "sd15"; default "sdxl", or the architecture of `like`.
        size: "tiny" (every key, small consistent shapes) or "full" (real shapes); default "tiny". Ignored
            with `like` (the shapes are those of `like`); a value that contradicts `like` raises UsageError.
        seed: seeds every value (with `like`: the delta).
        dtype: float dtype of the file ("F16", "BF16", "F32", "fp8_e4m3fn", ...); integer keys keep theirs.
        like: base checkpoint; the output has its keys and shapes and its values plus `delta`.
        delta: "lowrank:RANK" or "noise:SCALE" (see the module docstring); needs `like`.
        include_optional: True for every optional key of the table, or a collection of groups out of
            "scheduler", "ema", "markers". Without `like` only.
        metadata: extra `__metadata__` entries (they override the defaults: modelspec architecture and title, and
            `mergekit_sdxl.synth`, a JSON record of these arguments).
        components: components `delta` changes (default: "unet", "clip_l", "clip_g").
        overwrite: replace an existing `path`.
        progress: called with the number of bytes after each tensor is generated.

    Returns:
        `path` as a Path.

    Raises:
        UsageError: inconsistent arguments. ArchError: `like` is not an SDXL / SD1.x checkpoint, or `arch`
        contradicts it. OutputError: `path` exists (without overwrite) or is `like`, or the disk is full.
    """
    source = _Source(arch, size, seed, dtype, like, delta, include_optional, components)
    inputs = [like] if like is not None else []
    try:
        meta = {**source.metadata(), **(metadata or {})}
        with SafetensorsWriter(path, source.specs, meta, overwrite=overwrite, inputs=inputs) as writer:
            _write_all(writer, source, progress)
    finally:
        source.close()
    return Path(path)


def _write_all(writer: SafetensorsWriter, source: _Source, progress: Callable[[int], None] | None) -> None:
    """Generate tensors in file order; big files are written by one background thread, so generation and
    writing overlap and only one thread ever writes (concurrent pwrites to one file serialize in the kernel)."""
    specs = safetensors_order(source.specs)
    if sum(spec.nbytes for spec in specs) < _BACKGROUND_WRITE:
        for spec in specs:
            writer.write(spec.key, source.tensor(spec))
            if progress is not None:
                progress(spec.nbytes)
        return
    with ThreadPoolExecutor(max_workers=1) as pool:
        window: deque[tuple[Future, int]] = deque()
        in_flight = 0
        for spec in specs:
            window.append((pool.submit(writer.write, spec.key, source.tensor(spec)), spec.nbytes))
            in_flight += spec.nbytes
            while in_flight > _WRITE_WINDOW and len(window) > 1:
                future, nbytes = window.popleft()
                future.result()
                in_flight -= nbytes
            if progress is not None:
                progress(spec.nbytes)
        for future, _ in window:
            future.result()


def base_tensor(key: str, shape: tuple[int, ...], seed: int = 0, dtype: str = "F16") -> torch.Tensor:
    """The synthetic value of `key` with `shape` (float keys in `dtype`): a pure function of its arguments."""
    fixed = _fixed_value(key, shape)
    if fixed is not None:
        return fixed if not fixed.is_floating_point() else fixed.to(torch_dtype(_float_code(dtype)))
    mean, std = _init_stats(key, shape)
    out = torch.empty(math.prod(shape), dtype=torch_dtype(_float_code(dtype)))
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
    w = _serial_cast(base, torch.float32)
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


def _serial_cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
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


class _Source:
    """Specs and tensor values of one synthetic checkpoint (fresh, or `like` + delta)."""

    def __init__(self, arch: str | None, size: str | None, seed: int, dtype: str,
                 like: str | os.PathLike[str] | None, delta: str | Delta | None,
                 include_optional: bool | Collection[str], components: Collection[str] | None) -> None:
        self.seed, self.code = int(seed), _float_code(dtype)
        self.delta = Delta.parse(delta) if delta is not None else None
        self.components = tuple(sorted(set(components if components is not None else DELTA_COMPONENTS)))
        unknown = set(self.components) - set(COMPONENTS)
        if unknown:
            raise UsageError(f"unknown component(s) {sorted(unknown)}; known: {', '.join(COMPONENTS)}")
        self.reader: CheckpointReader | None = None
        self.groups = _groups(include_optional)
        if like is None:
            if self.delta is not None:
                raise UsageError("a delta needs a base checkpoint (like=...)")
            self.arch, self.size = check_arch(arch or "sdxl"), _check_size(size or "tiny")
            self.specs = plan_test_checkpoint(self.arch, self.size, self.code, include_optional)
            return
        if self.groups:
            raise UsageError("include_optional does not apply with like=...: the output has the keys of the base")
        self.reader = open_checkpoint(like)
        try:
            self.arch = _like_arch(self.reader, arch)
            self.size = _like_size(self.reader, self.arch, size)
            self.specs = [_spec_like(self.reader, key, self.code) for key in sorted(self.reader.keys())]
        except BaseException:
            self.close()
            raise

    def tensor(self, spec: TensorSpec) -> torch.Tensor:
        """The value of one spec'd tensor, in the spec's dtype."""
        if self.reader is None:
            return base_tensor(spec.key, spec.shape, self.seed, self.code)
        base = self.reader.read(spec.key)
        changes = (self.delta is not None and base.is_floating_point()
                   and component_of(spec.key, self.arch) in self.components)
        value = apply_delta(spec.key, base, self.delta, self.seed) if changes else base
        target = torch_dtype(spec.dtype)
        return _serial_cast(value, target) if value.is_floating_point() and value.dtype != target else value

    def metadata(self) -> dict[str, str]:
        """Default `__metadata__`: modelspec architecture and title, and a JSON record of the arguments."""
        record: dict[str, object] = {"arch": self.arch, "size": self.size, "seed": self.seed, "dtype": self.code,
                                     "optional": sorted(self.groups)}
        title = f"synthetic {self.arch} {self.size} seed {self.seed}"
        if self.reader is not None:
            like = self.reader.metadata.get(METADATA_KEY)
            record.update(delta=str(self.delta) if self.delta else None, components=list(self.components),
                          like=json.loads(like) if like else None)
            title += f" ({self.delta} of another)" if self.delta else " (copy)"
        return {"modelspec.architecture": MODELSPEC_ARCH[self.arch], "modelspec.title": title,
                METADATA_KEY: json.dumps(record, sort_keys=True, separators=(",", ":"))}

    def close(self) -> None:
        """Close the base checkpoint, if any."""
        if self.reader is not None:
            self.reader.close()
            self.reader = None


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
    target = out.numpy() if small else out
    for start, chunk in _uniform_chunks(seed, stream, key, out.numel()):
        values = _affine(chunk, mean, std)
        if small:
            target[start:start + chunk.size] = values
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


def _groups(include_optional: bool | Collection[str]) -> frozenset[str]:
    if include_optional is True:
        return frozenset(OPTIONAL_GROUPS)
    if include_optional is False or include_optional is None:
        return frozenset()
    if isinstance(include_optional, str):
        include_optional = [include_optional]
    unknown = set(include_optional) - set(OPTIONAL_GROUPS)
    if unknown:
        raise UsageError(f"unknown optional key group(s) {sorted(unknown)}; known: {', '.join(OPTIONAL_GROUPS)}")
    return frozenset(include_optional)


def _optional_group(component: str) -> str:
    """The group of an optional key: text-encoder optionals are always written (a real release has them)."""
    return {"other": "scheduler", "ema": "ema", "unet": "markers"}.get(component, "release")


def _check_size(size: str) -> str:
    if size not in SIZES:
        raise UsageError(f"unknown size {size!r}; expected one of: {', '.join(SIZES)}")
    return size


def _float_code(dtype: str) -> str:
    code = parse_dtype(dtype)
    if not is_float(code):
        raise UsageError(f"dtype {dtype!r} is not a float dtype")
    return code


def _code(table_dtype: str) -> str:
    return parse_dtype(table_dtype)


def _spec_like(reader: CheckpointReader, key: str, code: str) -> TensorSpec:
    info = reader.info(key)
    return TensorSpec(key, code if is_float(info.dtype) else info.dtype, tuple(info.shape))


def _like_arch(reader: CheckpointReader, arch: str | None) -> str:
    found = detect_arch(reader.keys(), source=str(reader.path))
    if arch is not None and check_arch(arch) != found:
        raise ArchError(f"{reader.path}: is a {found} checkpoint, not {arch}")
    return found


def _like_size(reader: CheckpointReader, arch: str, size: str | None) -> str:
    """"tiny" or "full" when every table key of `reader` has those shapes, else "custom"."""
    table = key_table(arch)
    keys = [k for k in reader.keys() if k in table]
    found = "custom"
    for candidate in SIZES:
        if keys and all(tuple(reader.info(k).shape) == key_shape(arch, candidate, k) for k in keys):
            found = candidate
            break
    if size is not None and _check_size(size) != found:
        raise UsageError(f"{reader.path}: has {found} shapes, not {size}")
    return found
