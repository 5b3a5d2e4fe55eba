"""`export --format diffusers`: a complete diffusers pipeline folder, streamed tensor by tensor.

Layout (what `StableDiffusionXLPipeline.from_pretrained(DIR, local_files_only=True)` / `StableDiffusionPipeline`
reads, with no network):

    model_index.json  scheduler/scheduler_config.json  tokenizer/  tokenizer_2/ (SDXL)
    unet/config.json + diffusion_pytorch_model.safetensors     vae/ (same names)
    text_encoder/config.json + model.safetensors                text_encoder_2/ (SDXL, same names)

Configs come from the checkpoint's shapes (real and tiny models alike); weights go through the project's key map
(`arch/keymap.py`). One LDM tensor is read, converted, cast and written (positional writes into the four
preallocated component files) before the next is read, so memory stays at about one tensor whatever the model
size. Keys with no diffusers equivalent (`position_ids`, `logit_scale`, schedule buffers, `v_pred`/`ztsnr` markers,
EMA weights, ...) are listed in the report; the markers set the scheduler's prediction type / zero-SNR instead.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from mergekit_sdxl.arch.configs import load_config
from mergekit_sdxl.arch.keymap import TEXT_ENCODER, TEXT_ENCODER_2, UNET, VAE
from mergekit_sdxl.export.folder import check_output, diffusers_version, staged_folder, write_common, write_json
from mergekit_sdxl.export.source import ExportSource, ExportStats
from mergekit_sdxl.io.dtypes import DTYPES
from mergekit_sdxl.io.writer import SafetensorsWriter, TensorSpec

WEIGHT_FILES = {UNET: "diffusion_pytorch_model.safetensors", VAE: "diffusion_pytorch_model.safetensors",
                TEXT_ENCODER: "model.safetensors", TEXT_ENCODER_2: "model.safetensors"}
SAFETENSORS_METADATA = {"format": "pt"}  # transformers refuses safetensors files without it


@dataclass
class ExportReport:
    """What an export wrote."""

    path: Path
    arch: str
    format: str
    dtype: str
    files: dict[str, int] = field(default_factory=dict)  # relative path -> bytes
    tensors: int = 0
    unmapped: list[str] = field(default_factory=list)
    filled: list[str] = field(default_factory=list)
    clamped: int = 0
    markers: tuple[str, ...] = ()
    seconds: float = 0.0


def component_configs(source: ExportSource) -> dict[str, dict]:
    """component -> the config.json written beside its weights."""
    out: dict[str, dict] = {}
    for component in source.components:
        config = dict(source.configs[component])
        if component in (UNET, VAE):
            shipped = load_config(source.arch, component)
            config = {"_class_name": shipped["_class_name"], "_diffusers_version": diffusers_version(), **config}
        else:
            config["torch_dtype"] = DTYPES[source.code].torch_name
        out[component] = config
    return out


def write_diffusers_weights(folder: Path, source: ExportSource, progress: Callable[[int], None] | None = None,
                            stats: ExportStats | None = None) -> None:
    """Stream every component's weights into `folder/<component>/<weights file>`."""
    stats = stats if stats is not None else ExportStats()
    with ExitStack() as stack:
        writers: dict[str, SafetensorsWriter] = {}
        for component in source.components:
            (folder / component).mkdir(parents=True, exist_ok=True)
            specs = [TensorSpec(t.key, source.dtype_of(t), t.shape) for t in source.targets[component]]
            writers[component] = stack.enter_context(
                SafetensorsWriter(folder / component / WEIGHT_FILES[component], specs, SAFETENSORS_METADATA))
        for target, tensor in source.iter_tensors(stats=stats, progress=progress):
            writers[target.component].write(target.key, tensor)
            stats.tensors[target.component] = stats.tensors.get(target.component, 0) + 1
            stats.bytes[target.component] = stats.bytes.get(target.component, 0) + tensor.numel() * \
                tensor.element_size()


def export_diffusers(src: str | os.PathLike[str], out: str | os.PathLike[str], dtype: str = "fp16", *,
                     overwrite: bool = False, progress: Callable[[int], None] | None = None) -> ExportReport:
    """Write the diffusers pipeline folder `out` for single-file checkpoint `src`.

    Args:
        dtype: fp16 (default), bf16 or fp32; every float tensor is cast (clamped to the target's range).
        overwrite: replace `out` when it is an earlier export (a folder with model_index.json).
        progress: callable(bytes read) for a progress bar.

    Raises:
        UsageError (bad dtype, diffusers/transformers missing), CheckpointError / ArchError (unreadable or
        incomplete checkpoint, unsupported architecture), OutputError (target exists, disk full).
    """
    start = time.perf_counter()
    out = Path(out)
    check_output(out, overwrite, src)
    with ExportSource(src, dtype) as source, staged_folder(out, overwrite) as tmp:
        write_common(tmp, source.arch, source.markers)
        for component, config in component_configs(source).items():
            write_json(tmp / component / "config.json", config)
        stats = ExportStats()
        write_diffusers_weights(tmp, source, progress, stats)
        files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
        report = ExportReport(out, source.arch, "diffusers", source.code, files, sum(stats.tensors.values()),
                              list(source.unmapped_keys), source.filled, stats.clamped, source.markers)
    report.seconds = time.perf_counter() - start
    return report
