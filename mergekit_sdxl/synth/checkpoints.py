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

Values and deltas: `mergekit_sdxl.synth.values`.
"""

from __future__ import annotations

import json
import os
from collections import deque
from collections.abc import Callable, Collection, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from mergekit_sdxl.arch.detect import component_of, detect_arch
from mergekit_sdxl.arch.registry import DEFAULT_ARCH, arch_spec
from mergekit_sdxl.arch.tables import COMPONENTS, check_arch, key_table
from mergekit_sdxl.arch.tiny import tiny_shape
from mergekit_sdxl.errors import ArchError, UsageError
from mergekit_sdxl.io.dtypes import is_float, parse_dtype, torch_dtype
from mergekit_sdxl.io.metadata import json_value
from mergekit_sdxl.io.reader import CheckpointReader, open_checkpoint
from mergekit_sdxl.io.writer import SafetensorsWriter, TensorSpec, safetensors_order
from mergekit_sdxl.synth.values import Delta, apply_delta, base_tensor, float_code, serial_cast

SIZES = ("tiny", "full")
OPTIONAL_GROUPS = ("scheduler", "ema", "markers")
DELTA_COMPONENTS = ("unet", "clip_l", "clip_g")
_BACKGROUND_WRITE = 64 << 20  # files from this size are written by a background thread
_WRITE_WINDOW = 256 << 20  # bytes generated but not yet written, at most (plus one tensor)
METADATA_KEY = "mergekit_sdxl.synth"


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
    code = float_code(dtype)
    if like is not None:
        with open_checkpoint(like) as reader:
            _like_arch(reader, arch)
            return [_spec_like(reader, key, code) for key in sorted(reader.keys())]
    arch, size = check_arch(arch or DEFAULT_ARCH), _check_size(size or "tiny")
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
        arch: an architecture id (arch/registry.py); default `DEFAULT_ARCH`, or the architecture of `like`.
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


class _Source:
    """Specs and tensor values of one synthetic checkpoint (fresh, or `like` + delta)."""

    def __init__(self, arch: str | None, size: str | None, seed: int, dtype: str,
                 like: str | os.PathLike[str] | None, delta: str | Delta | None,
                 include_optional: bool | Collection[str], components: Collection[str] | None) -> None:
        self.seed, self.code = int(seed), float_code(dtype)
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
            self.arch, self.size = check_arch(arch or DEFAULT_ARCH), _check_size(size or "tiny")
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
        delta = self.delta
        changes = base.is_floating_point() and component_of(spec.key, self.arch) in self.components
        value = apply_delta(spec.key, base, delta, self.seed) if delta is not None and changes else base
        target = torch_dtype(spec.dtype)
        return serial_cast(value, target) if value.is_floating_point() and value.dtype != target else value

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
        return {"modelspec.architecture": arch_spec(self.arch).modelspec.architecture, "modelspec.title": title,
                METADATA_KEY: json_value(record)}  # A1111-safe: no leading "{" (io/metadata.py)

    def close(self) -> None:
        """Close the base checkpoint, if any."""
        if self.reader is not None:
            self.reader.close()
            self.reader = None


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
