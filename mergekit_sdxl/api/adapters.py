"""LoRA from Python: `extract_lora` (tuned − base as an adapter) and `bake` (adapters into a checkpoint)."""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Union

from mergekit_sdxl.api.progress import ProgressEvent, ProgressFn
from mergekit_sdxl.api.results import BakeResult, ExtractResult

if TYPE_CHECKING:
    from mergekit_sdxl.lora.bake import AdapterSpec
    from mergekit_sdxl.lora.extract import ExtractReport, LayerReport

PathLike = Union[str, "os.PathLike[str]"]
LayerFn = Callable[["LayerReport", int, int], None]


def extract_lora(base: PathLike, tuned: PathLike, out: PathLike, *, rank: int = 64, conv_rank: int = 32,
                 dynamic: str | None = None, conv_dynamic: str | None = None, preset: str = "attn",
                 text_encoders: str = "auto", te_threshold: float | None = None, exact: bool = False,
                 niter: int = 2, oversample: int = 10, seed: int = 0, clamp_quantile: float | None = None,
                 alpha: float | None = None, conv_alpha: float | None = None, save_dtype: str = "fp16",
                 fmt: str = "kohya", device: str = "cpu", report_path: PathLike | None = None,
                 hash_inputs: bool = True, overwrite: bool = False, progress: ProgressFn | None = None,
                 on_layer: LayerFn | None = None) -> ExtractResult:
    """Extract `tuned` − `base` as a LoRA/LoCon adapter at `out` (each option as `mergekit-sdxl extract-lora`).

    Args:
        rank, conv_rank: ranks of Linear/1x1 and 3x3 conv layers (the caps in dynamic modes).
        dynamic, conv_dynamic: per-layer rank rules "fro:τ", "ratio:ρ", "threshold:t" or "cumulative:q".
        preset: "attn", "attn+conv" or "all".
        text_encoders: "auto" (keep a layer above the noise floor), "on" or "off"; te_threshold overrides the floor.
        exact, niter, oversample, seed: the SVD (randomized unless exact; reproducible by seed).
        clamp_quantile, alpha, conv_alpha, save_dtype, fmt ("kohya" or "peft"): what is written.
        report_path: also write the per-layer report as JSON (checked before the extraction starts).
        hash_inputs: record the inputs' hashes in the adapter's metadata.
        progress: "extracting" events, one per candidate layer (unit "layers").
        on_layer: called with (row, done, total) after each layer (the CLI's --verbose lines).

    Returns:
        The per-layer decisions and summary; `warnings` holds what the extraction warned about (e.g. no layer
        differs).

    Raises:
        UsageError: option out of range. ArchError, CheckpointError: inputs that do not pair. OutputError.
    """
    from mergekit_sdxl.dtypes import parse_dtype
    from mergekit_sdxl.engine.device import resolve_device
    from mergekit_sdxl.lora.extract import ExtractOptions
    from mergekit_sdxl.lora.extract import extract_lora as run_extract
    from mergekit_sdxl.lora.svd import RankRule, SolverOptions

    options = ExtractOptions(
        rank=RankRule.parse(dynamic, rank), conv_rank=RankRule.parse(conv_dynamic, conv_rank), preset=preset,
        text_encoders=text_encoders, te_floor=te_threshold,
        solver=SolverOptions(exact=exact, niter=niter, oversample=oversample, seed=seed),
        clamp_quantile=clamp_quantile, alpha=alpha, conv_alpha=conv_alpha, save_dtype=parse_dtype(save_dtype),
        device=str(resolve_device(device)), fmt=fmt)
    report_file = Path(report_path) if report_path is not None else None
    if report_file is not None:  # refuse an unusable report path before the extraction, not after it
        from mergekit_sdxl.io.commit import check_target

        check_target(report_file, overwrite=overwrite, inputs=(base, tuned))
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = run_extract(base, tuned, out, options, overwrite=overwrite, progress=_layers(progress, on_layer),
                             input_hashes=_input_hashes if hash_inputs else None)
    if report_file is not None:
        _write_report(report, report_file, overwrite)
    return ExtractResult(path=Path(out), arch=report.arch, layers=tuple(report.layers), summary=report.summary(),
                         te_floor=report.te_floor, warnings=tuple(str(w.message) for w in caught),
                         report_path=report_file, seconds=time.perf_counter() - start)


def bake(checkpoint: PathLike, adapters: Sequence[PathLike | AdapterSpec], out: PathLike, *, dtype: str | None = None,
         ignore_unknown: bool = False, device: str = "cpu", overwrite: bool = False,
         progress: ProgressFn | None = None) -> BakeResult:
    """Bake adapters (LoRA, LoCon, LoHa, LoKr, full, norms, DoRA; kohya or peft names) into `checkpoint`.

    W += strength · ΔW for every adapter, computed in fp32; untouched tensors are copied byte for byte.

    Args:
        adapters: adapter files (strength 1), or `AdapterSpec(path, strength, te_strength, blocks)` for
            strengths and LoRA Block Weight / MBW vectors.
        dtype: store changed and float tensors in this dtype (default: keep each tensor's).
        ignore_unknown: skip adapter keys that match no module (counted in `result.unconsumed`).
        device: "cpu", "cuda" or "cuda:N".
        progress: "baking" events, one per output tensor (unit "keys").

    Raises:
        ArchError: an adapter of another architecture. CheckpointError: unknown adapter keys (unless
        ignore_unknown), bad shapes, non-finite results. OutputError.
    """
    from mergekit_sdxl.engine.device import resolve_device
    from mergekit_sdxl.lora.bake import AdapterSpec
    from mergekit_sdxl.lora.bake import bake as run_bake

    specs = [a if isinstance(a, AdapterSpec) else AdapterSpec(os.fspath(a)) for a in adapters]
    start = time.perf_counter()

    def on_key(done: int, total: int) -> None:
        if progress is not None:
            progress(ProgressEvent("baking", done, total, "keys"))

    summary = run_bake(checkpoint, specs, out, overwrite=overwrite, ignore_unknown=ignore_unknown, dtype=dtype,
                       device=str(resolve_device(device)), progress=on_key)
    return BakeResult(path=Path(out), arch=str(summary["arch"]), adapters=len(specs),
                      changed_keys=int(summary["changed_keys"]), total_keys=int(summary["total_keys"]),
                      unconsumed=int(summary["unconsumed"]), seconds=time.perf_counter() - start)


def _layers(progress: ProgressFn | None, on_layer: LayerFn | None) -> LayerFn:
    def on(row: LayerReport, done: int, total: int) -> None:
        if on_layer is not None:
            on_layer(row, done, total)
        if progress is not None:
            progress(ProgressEvent("extracting", done, total, "layers"))
    return on


def _input_hashes(path: Path) -> dict[str, str | None]:
    from mergekit_sdxl.io.hashes import hashes_for

    h = hashes_for(path)
    return {"autov2": h.autov2, "autov3": h.autov3_short, "sha256": h.sha256, "legacy": h.legacy}


def _write_report(report: ExtractReport, path: Path, overwrite: bool) -> None:
    from mergekit_sdxl.io.commit import write_file

    rows = [row.__dict__ for row in report.layers]
    write_file(path, json.dumps({"summary": report.summary(), "layers": rows}, indent=1, sort_keys=True).encode(),
               overwrite=overwrite)
