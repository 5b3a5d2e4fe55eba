"""Single checkpoints from Python: `convert` (storage dtype), `inspect` (what a file is), `hash_file`."""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Union

from mergekit_sdxl.api.progress import ProgressFn, byte_counter, byte_tasks
from mergekit_sdxl.api.results import ConvertResult, HashResult, InspectResult
from mergekit_sdxl.errors import CheckpointError, UsageError

if TYPE_CHECKING:
    from mergekit_sdxl.io.hashes import FileHashes

PathLike = Union[str, "os.PathLike[str]"]
HASH_MODES = ("none", "legacy", "full")


def convert(src: PathLike, dst: PathLike, dtype: str, *, scaled_fp8: bool = False, prune_ema: bool = False,
            drop: Sequence[str] = (), overwrite: bool = False, progress: ProgressFn | None = None) -> ConvertResult:
    """Write checkpoint `src` to the safetensors file `dst` with float tensors stored as `dtype`.

    Streams tensor by tensor (peak memory about twice the largest tensor) and keeps the metadata, adding a
    `mergekit.convert` entry. Values beyond the target range are clamped and counted in `result.clamped`.

    Args:
        src: .safetensors, .ckpt/.pt/.pth (weights only, never unpickled) or a diffusers folder.
        dtype: fp16, bf16, fp32, fp8_e4m3fn or fp8_e5m2.
        scaled_fp8: fp8 with one float32 scale per weight (ComfyUI's layout); needs an fp8 dtype.
        prune_ema: drop `model_ema.*`.
        drop: regular expressions (re.search); matching keys are dropped.
        overwrite: replace `dst` if it exists (never an input).
        progress: "converting NAME" byte events.

    Raises:
        UsageError: bad dtype or regex, scaled_fp8 without fp8. CheckpointError, OutputError.
    """
    from mergekit_sdxl.engine.convert import convert_checkpoint
    from mergekit_sdxl.io.reader import open_checkpoint

    source, target = Path(src), Path(dst)
    start = time.perf_counter()
    with open_checkpoint(source) as reader:
        total = sum(reader.info(k).nbytes for k in reader.keys())
        report = convert_checkpoint(reader, target, dtype, scaled_fp8=scaled_fp8, prune_ema=prune_ema,
                                    drop=tuple(drop), overwrite=overwrite,
                                    progress=byte_counter(progress, f"converting {source.name}", total))
    return ConvertResult(path=target, source=source, dtype=dtype, tensors=report.tensors, cast=report.cast,
                         scaled=report.scaled, dequantized=report.dequantized, dropped=tuple(report.dropped),
                         clamped=dict(report.clamped), bytes_in=report.bytes_in, bytes_out=report.bytes_out,
                         seconds=time.perf_counter() - start)


def inspect(path: PathLike, *, blocks: bool = False, convention: str | None = None, hash_mode: str = "legacy",
            check_values: bool = False, progress: ProgressFn | None = None) -> InspectResult:
    """What the checkpoint at `path` is, from its header alone unless asked for more.

    Args:
        blocks: add keys and parameters per MBW block.
        convention: the block convention of that table (default: the one the file's merge recipe recorded, else
            the default convention).
        hash_mode: "none", "legacy" (A1111's hash from a 64 KiB read, plus cached AutoV2/AutoV3) or "full"
            (AutoV2 and AutoV3 computed unless cached: reads the whole file).
        check_values: read every float tensor and count NaN/Inf values.
        progress: byte events of the long reads (full hash, value check).

    An unknown architecture is reported (`result.architecture` None), not an error. A LoRA/LyCORIS file gets the
    adapter summary instead (`result.kind` "adapter"; schema in `mergekit-sdxl inspect --help`).

    Raises:
        UsageError: an unknown hash_mode or convention. CheckpointError: unreadable or malformed file.
    """
    from mergekit_sdxl.analysis.report import RECORDED, build_report
    from mergekit_sdxl.arch.blocks import CONVENTIONS
    from mergekit_sdxl.io.reader import open_checkpoint
    from mergekit_sdxl.lora.summary import adapter_summary, is_adapter

    if hash_mode not in HASH_MODES:
        raise UsageError(f"hash_mode={hash_mode!r}: use one of {', '.join(HASH_MODES)}")
    if convention is not None and convention not in CONVENTIONS:
        raise UsageError(f"convention={convention!r}: use one of {', '.join(CONVENTIONS)}")
    file, start = Path(path), time.perf_counter()
    with open_checkpoint(file) as checkpoint:
        if is_adapter(checkpoint.keys()):  # a LoRA/LyCORIS file gets the adapter summary
            return InspectResult(path=file, kind="adapter", report=adapter_summary(checkpoint, file),
                                 seconds=time.perf_counter() - start)
        report = build_report(checkpoint, file, convention=(convention or RECORDED) if blocks else None,
                              hash_mode=hash_mode, check_values=check_values, progress=byte_tasks(progress))
    return InspectResult(path=file, kind="checkpoint", report=report, seconds=time.perf_counter() - start)


def hash_file(path: PathLike, *, use_cache: bool = True, progress: ProgressFn | None = None) -> HashResult:
    """Legacy A1111, AutoV2, AutoV3 and sha256 of one file, in one streaming pass (8 MiB chunks).

    Results are cached by path, size and mtime; `use_cache=False` reads the file again (and refreshes the cache).

    Raises:
        CheckpointError: not a regular file (a FIFO would block forever), or unreadable.
    """
    from mergekit_sdxl.io import hashes

    file, start = Path(path), time.perf_counter()
    try:
        if not stat.S_ISREG(os.stat(file).st_mode):
            raise CheckpointError(f"{file}: is not a regular file (a FIFO or device?); nothing to hash")
        size = os.path.getsize(file)
        advance = byte_counter(progress, f"hashing {file.name}", size)
        found: FileHashes | None = hashes.cached_hashes(file) if use_cache else None
        from_cache = found is not None
        if found is None:
            found = hashes.hash_file(file, advance)
            hashes.store_cached_hashes(file, found)
        else:
            advance(size)
    except OSError as exc:
        raise CheckpointError(f"{file}: cannot read: {exc.strerror or exc}") from exc
    return HashResult(path=file, size=size, legacy=found.legacy, autov2=found.autov2, autov3=found.autov3_short,
                      autov3_full=found.autov3, sha256=found.sha256, from_cache=from_cache,
                      seconds=time.perf_counter() - start)
