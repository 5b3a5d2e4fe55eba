"""Convert a checkpoint's storage dtype (and prune/drop keys), streaming tensor by tensor (`mergekit-sdxl convert`).

One tensor is read (into a reused buffer), cast and written before the next is read, so peak memory is about
the largest tensor twice, whatever the model size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from mergekit_sdxl.errors import UsageError
from mergekit_sdxl.patterns import compile_user
from mergekit_sdxl.platform.text import file_name

if TYPE_CHECKING:
    import torch

    from mergekit_sdxl.io.reader import CheckpointReader
    from mergekit_sdxl.io.writer import SafetensorsWriter, TensorSpec

STALE_HASH_KEYS = ("sshs_model_hash", "sshs_legacy_hash")  # describe the old bytes; wrong after a dtype change
EMA_PREFIX = "model_ema."


@dataclass
class ConvertReport:
    """What a conversion did."""

    tensors: int = 0
    cast: int = 0
    scaled: int = 0
    dequantized: int = 0
    dropped: list[str] = field(default_factory=list)
    clamped: dict[str, int] = field(default_factory=dict)
    bytes_in: int = 0
    bytes_out: int = 0


@dataclass(frozen=True)
class _Item:
    key: str
    dtype: str
    scaled: bool = False
    scale_of: str | None = None  # input scale key to dequantize this tensor with


def convert_checkpoint(reader: CheckpointReader, dst: Path, dtype: str, *, scaled_fp8: bool = False,
                       prune_ema: bool = False, drop: tuple[str, ...] = (), overwrite: bool = False,
                       progress: Callable[[int], None] | None = None) -> ConvertReport:
    """Convert the opened checkpoint `reader` to `dst` (safetensors) with float tensors stored as `dtype`.

    Args:
        dtype: any name io.dtypes.parse_dtype accepts (fp16, bf16, fp32, fp8_e4m3fn, fp8_e5m2).
        scaled_fp8: ComfyUI's scaled-fp8 layout (arch/scaled_fp8.py): the UNet's Linear weights in fp8_e4m3fn
            with a scale each, every other float tensor in fp16; needs dtype fp8_e4m3fn.
        prune_ema: drop `model_ema.*`.
        drop: regular expressions; keys matching any (re.search) are dropped.
        progress: callable(bytes) advanced by the bytes read.

    Raises:
        UsageError: bad dtype, --scaled-fp8 without fp8_e4m3fn or on a file without UNet Linear weights, invalid
            regex. CheckpointError / OutputError from io.
    """
    from mergekit_sdxl import __version__
    from mergekit_sdxl.dtypes import CHECKPOINT, parse_dtype
    from mergekit_sdxl.io.dtypes import SCALED_DTYPE, SCALED_MARKER
    from mergekit_sdxl.io.metadata import a1111_safe, json_value
    from mergekit_sdxl.io.writer import SafetensorsWriter, cleanup_stale_temps

    code = parse_dtype(dtype, CHECKPOINT, "--dtype")
    if scaled_fp8 and code != SCALED_DTYPE:
        raise UsageError(f"--scaled-fp8 needs --dtype fp8_e4m3fn (ComfyUI reads every scaled weight as e4m3fn), "
                         f"not {dtype}")
    patterns = _compile(drop)
    report = ConvertReport()
    items = _plan(reader, code, scaled_fp8, prune_ema, patterns, report)
    with_marker = any(i.scaled for i in items)
    if scaled_fp8 and not with_marker:
        raise UsageError(f"--scaled-fp8: {file_name(reader.path)} has no UNet Linear weights (2-D "
                         "model.diffusion_model.*.weight), the only tensors ComfyUI reads scaled")
    specs = _specs(reader, items, with_marker)
    metadata = {k: v for k, v in reader.metadata.items() if k not in STALE_HASH_KEYS}
    metadata["mergekit.convert"] = json_value({
        "tool": f"mergekit-sdxl {__version__}", "source": file_name(reader.path), "dtype": code,
        "scaled_fp8": scaled_fp8, "prune_ema": prune_ema, "drop": list(drop), "dropped": len(report.dropped),
        "removed_metadata": sorted(set(reader.metadata) & set(STALE_HASH_KEYS)),
    })
    metadata = a1111_safe(metadata)  # copied values too: A1111's merger must be able to re-save the output
    if dst.parent.is_dir():
        cleanup_stale_temps(dst.parent, dst.name)
    with SafetensorsWriter(dst, specs, metadata, overwrite=overwrite, inputs=[reader.path]) as writer:
        if with_marker:
            writer.write(SCALED_MARKER, _empty(SCALED_DTYPE))
        _stream(reader, writer, items, report, progress)
        report.bytes_out = writer.size
    return report


def _compile(drop: tuple[str, ...]) -> list[Any]:
    """--drop patterns, matched in linear time whatever they are (patterns.py)."""
    return [compile_user(pattern, f"--drop {pattern!r}") for pattern in drop]


def _plan(reader: CheckpointReader, code: str, scaled_fp8: bool, prune_ema: bool, patterns: list[Any],
          report: ConvertReport) -> list[_Item]:
    """Which input tensors go out, in which dtype; input scales and scaled-fp8 markers are consumed, not copied."""
    from mergekit_sdxl.io.dtypes import is_float, is_marker, is_scalable, scale_key, scaled_key_of, storage_dtype

    keys = reader.keys()
    present = set(keys)
    input_scales = {k for k in keys if scaled_key_of(k) in present}
    items = []
    for key in keys:
        if key in input_scales or is_marker(key):
            continue
        if (prune_ema and key.startswith(EMA_PREFIX)) or any(p.search(key) for p in patterns):
            report.dropped.append(key)
            continue
        info = reader.info(key)
        scale_of = scale_key(key) if key.endswith(".weight") and scale_key(key) in input_scales else None
        if not is_float(info.dtype):
            items.append(_Item(key, info.dtype))
        elif scaled_fp8:
            items.append(_Item(key, storage_dtype(key, info.shape), is_scalable(key, info.shape), scale_of))
        else:
            items.append(_Item(key, code, False, scale_of))
    return items


def _specs(reader: CheckpointReader, items: list[_Item], with_marker: bool) -> list[TensorSpec]:
    from mergekit_sdxl.arch.scaled_fp8 import MARKER_SHAPE, SCALE_DTYPE, SCALE_SHAPE
    from mergekit_sdxl.io.dtypes import SCALED_DTYPE, SCALED_MARKER, scale_key
    from mergekit_sdxl.io.writer import TensorSpec

    specs = []
    for item in items:
        shape = reader.info(item.key).shape
        specs.append(TensorSpec(item.key, item.dtype, shape))
        if item.scaled:
            specs.append(TensorSpec(scale_key(item.key), SCALE_DTYPE, SCALE_SHAPE))
    if with_marker:
        specs.append(TensorSpec(SCALED_MARKER, SCALED_DTYPE, MARKER_SHAPE))
    taken = [s.key for s in specs]
    if len(taken) != len(set(taken)):
        dup = next(k for k in taken if taken.count(k) > 1)
        raise UsageError(f"the output would hold {dup!r} twice (the input already has a tensor by that name)")
    return specs


def _empty(code: str) -> torch.Tensor:
    import torch

    from mergekit_sdxl.io.dtypes import torch_dtype

    return torch.empty(0, dtype=torch_dtype(code))


@runtime_checkable
class _ReadsInto(Protocol):
    """A reader that can fill a caller's buffer (safetensors files); others allocate per tensor."""

    def read_into(self, key: str, buffer: torch.Tensor) -> torch.Tensor: ...


def _stream(reader: CheckpointReader, writer: SafetensorsWriter, items: list[_Item], report: ConvertReport,
            progress: Callable[[int], None] | None) -> None:
    """Read, convert and write one tensor at a time, reading into one reused buffer where the reader allows."""
    import torch

    from mergekit_sdxl.io.dtypes import dequantize_scaled, scale_key, to_storage

    filler = reader if isinstance(reader, _ReadsInto) and items else None
    buffer = torch.empty(max(reader.info(i.key).nbytes for i in items), dtype=torch.uint8) if filler else None
    for item in items:
        info = reader.info(item.key)
        tensor = filler.read_into(item.key, buffer) if filler and buffer is not None else reader.read(item.key)
        if item.scale_of is not None:
            tensor = dequantize_scaled(tensor, reader.read(item.scale_of), "F32", f"{reader.path}: tensor {item.key!r}")
            report.dequantized += 1
        report.bytes_in += info.nbytes
        stored = to_storage(tensor, item.dtype, scaled=item.scaled)
        if stored.n_clamped:
            report.clamped[item.key] = stored.n_clamped
        report.cast += int(stored.tensor.dtype != tensor.dtype or item.scale_of is not None)
        writer.write(item.key, stored.tensor)
        if item.scaled:
            assert stored.scale is not None  # to_storage(scaled=True) always returns the scale
            writer.write(scale_key(item.key), stored.scale)
            report.scaled += 1
        report.tensors += 1
        del tensor, stored
        if progress is not None:
            progress(info.nbytes)
