"""What each API call returns: frozen records of paths, hashes, timings and decisions (nothing is printed).

Torch-free at import: tensors appear only as values of `StateDictResult.tensors`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from mergekit_sdxl.lora.extract import LayerReport
    from mergekit_sdxl.provenance.verify import VerifyReport
    from mergekit_sdxl.recipe.planner import Plan
    from mergekit_sdxl.sampler.grid import CellRecord


@dataclass(frozen=True)
class MergeResult:
    """A merge written to `path`.

    Attributes:
        input_hashes: alias -> {legacy, autov2, autov3, autov3_full, sha256} of every input read (empty dicts
            skipped: inputs are not hashed with `hash_inputs=False`).
        warnings: the plan's warnings (one line each), e.g. keys kept from the first model.
        clamped: values clamped to the output dtype's range.
        verified: the comparison with `verify_against`, if one was asked; check `verified.passed`.
    """

    path: Path
    arch: str
    dtype: str
    inputs: Mapping[str, str]
    input_hashes: Mapping[str, Mapping[str, str | None]]
    keys: int
    bytes_read: int
    bytes_written: int
    seconds: float
    clamped: int
    warnings: tuple[str, ...]
    plan: Plan
    verified: VerifyReport | None = None

    def as_dict(self) -> dict[str, Any]:
        """The JSON summary `mergekit-sdxl merge --json` prints."""
        summary: dict[str, Any] = {
            "output": str(self.path), "keys": self.keys, "seconds": round(self.seconds, 3),
            "bytes_read": self.bytes_read, "bytes_written": self.bytes_written, "clamped": self.clamped,
            "warnings": list(self.warnings), "inputs": {a: dict(h) for a, h in self.input_hashes.items()}}
        if self.verified is not None:
            summary["verify"] = self.verified.as_dict()
        return summary


@dataclass(frozen=True)
class MergePlanResult:
    """What a merge would do, from the headers alone (no tensor data read).

    Attributes:
        lines: the human description (inputs, steps, output size and dtype, keys per kind, warnings).
        cached_hashes: alias -> hashes the cache already knows (None: computed during the merge).
        output: where the merge would write (None when neither `out` nor the recipe's output.path says).
        peak_memory: estimated peak bytes of the run.
    """

    plan: Plan
    lines: tuple[str, ...]
    cached_hashes: Mapping[str, Mapping[str, str | None] | None]
    output: Path | None
    peak_memory: int


@dataclass(frozen=True)
class StateDictResult:
    """A merge kept in memory: `tensors` holds exactly what the file merge would write (same dtypes, same bits)."""

    tensors: dict[str, torch.Tensor]
    arch: str
    dtype: str
    inputs: Mapping[str, str]
    warnings: tuple[str, ...]
    seconds: float
    plan: Plan


@dataclass(frozen=True)
class ConvertResult:
    """A dtype conversion: counts of tensors cast, scaled, dequantized; keys dropped; values clamped per key."""

    path: Path
    source: Path
    dtype: str
    tensors: int
    cast: int
    scaled: int
    dequantized: int
    dropped: tuple[str, ...]
    clamped: Mapping[str, int]
    bytes_in: int
    bytes_out: int
    seconds: float


@dataclass(frozen=True)
class InspectResult:
    """What a file is: for a checkpoint (`kind` "checkpoint") the inspect report (schema "mergekit-sdxl.inspect/1"),
    for a LoRA/LyCORIS file (`kind` "adapter") the adapter summary; both described in `mergekit-sdxl inspect --help`.
    """

    path: Path
    kind: str
    report: Mapping[str, Any]
    seconds: float

    @property
    def architecture(self) -> str | None:
        """"sdxl", "sd15", or None when the layout is not recognised (`report["architecture_error"]` says why)."""
        arch = self.report["architecture"]
        return str(arch) if arch is not None else None

    def text(self) -> str:
        """The plain-text rendering `mergekit-sdxl inspect` prints."""
        from mergekit_sdxl.analysis.report import render_text
        from mergekit_sdxl.lora.summary import render_adapter_text

        return render_adapter_text(self.report) if self.kind == "adapter" else render_text(self.report)


@dataclass(frozen=True)
class HashResult:
    """A file's hashes: A1111 legacy, AutoV2 (10 hex), AutoV3 (12 hex; None for non-safetensors), full sha256."""

    path: Path
    size: int
    legacy: str
    autov2: str
    autov3: str | None
    autov3_full: str | None
    sha256: str
    from_cache: bool
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        """The JSON object `mergekit-sdxl hash --json` prints for the file."""
        return {"file": str(self.path), "size": self.size, "legacy": self.legacy, "autov2": self.autov2,
                "autov3": self.autov3, "autov3_full": self.autov3_full, "sha256": self.sha256}


@dataclass(frozen=True)
class ExtractResult:
    """An adapter extracted to `path`: one row per candidate layer (rank and energy, or why it was dropped)."""

    path: Path
    arch: str
    layers: tuple[LayerReport, ...]
    summary: Mapping[str, Any]
    te_floor: float
    warnings: tuple[str, ...]
    report_path: Path | None
    seconds: float


@dataclass(frozen=True)
class BakeResult:
    """Adapters baked into `path`: how many tensors changed, and adapter keys that matched nothing."""

    path: Path
    arch: str
    adapters: int
    changed_keys: int
    total_keys: int
    unconsumed: int
    seconds: float


@dataclass(frozen=True)
class GridResult:
    """A rendered grid: grid.png (and one page per z value), index.html, and every cell's PNG."""

    out_dir: Path
    grid: Path
    pages: tuple[Path, ...]
    report: Path
    cells: tuple[CellRecord, ...]
    models: int
    seconds_per_cell: float
    seconds_loading: float
    seconds: float
