"""Change an adapter's rank (`resize-lora`) and merge adapters into one (`merge-lora`): ΔW per module, re-factored.

Any readable format goes in (LoRA, LoCon, LoHa, LoKr, full); a kohya LoRA/LoCon comes out. The retained energy
of each layer is measured against the input ΔW (for merges: against the weighted sum of the inputs' ΔW).
DoRA layers are refused: their change depends on the checkpoint's weights.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from mergekit_sdxl import __version__
from mergekit_sdxl.arch.lora_names import LoraModule, arch_from_kohya_version, arch_from_sgm_unet_names, lora_modules
from mergekit_sdxl.arch.registry import ARCH_NAMES
from mergekit_sdxl.errors import CheckpointError, UsageError
from mergekit_sdxl.io.dtypes import parse_dtype
from mergekit_sdxl.io.reader import open_checkpoint
from mergekit_sdxl.lora.extract import LayerReport
from mergekit_sdxl.lora.formats import Adapter, AdapterLayer, guess_arch, refuse_checkpoint
from mergekit_sdxl.lora.kohya import (
    LayerFactors,
    adapter_tensors,
    kohya_hashes,
    kohya_metadata,
    with_alpha,
    write_adapter,
)
from mergekit_sdxl.lora.svd import RankRule, SolverOptions, factorize
from mergekit_sdxl.platform.text import file_name


@dataclass(frozen=True)
class ResizeOptions:
    """Target ranks (linear / 1x1 and k x k conv), solver, storage dtype, alphas, and the arch when files can't tell."""

    rank: RankRule = RankRule("fixed", 32)
    conv_rank: RankRule = RankRule("fixed", 16)
    solver: SolverOptions = SolverOptions()
    save_dtype: str = "F16"
    alpha: float | None = None
    conv_alpha: float | None = None
    arch: str | None = None


def adapter_arch(path: str | os.PathLike[str], given: str | None = None) -> str:
    """The architecture of an adapter file: `given`, else from key names, else from `ss_base_model_version`.

    Raises:
        CheckpointError: the file is a checkpoint, not an adapter.
        UsageError: nothing tells the architecture (pass --arch).
    """
    with open_checkpoint(path) as reader:
        refuse_checkpoint(reader.keys(), path)
        if given:
            return given
        arch = guess_arch(reader.keys()) or arch_from_kohya_version(reader.metadata.get("ss_base_model_version", ""))
        arch = arch or arch_from_sgm_unet_names(reader.keys())
    if arch is None:
        raise UsageError(f"{path}: cannot tell whether this adapter is for {' or '.join(ARCH_NAMES.values())}; "
                         "pass --arch")
    return arch


def adapter_shapes(path: str | os.PathLike[str], arch: str) -> dict[str, tuple[int, ...]]:
    """Checkpoint key -> shape implied by the adapter's own tensors (so tiny and full-size adapters both work)."""
    table = lora_modules(arch)
    adapter = Adapter(path, arch, table)
    try:
        shapes: dict[str, tuple[int, ...]] = {}
        for layer in adapter.layers.values():
            module = layer.module
            shape = _layer_shape(adapter, layer)
            if module.transpose:
                shape = (shape[1], shape[0])
            if module.part >= 0:
                shape = (shape[0] * 3, *shape[1:])
            shapes[module.key] = shape
            if module.bias_key:
                shapes[module.bias_key] = (shape[0],)
        return shapes
    finally:
        adapter.close()


def _layer_shape(adapter: Adapter, layer: AdapterLayer) -> tuple[int, ...]:
    info = adapter.reader.info
    keys, table_shape = layer.keys, layer.module.shape
    if "down" in keys and "up" in keys:
        down, up = info(keys["down"]).shape, info(keys["up"]).shape
        if "mid" in keys:
            return (up[0], down[1], *info(keys["mid"]).shape[2:])
        if len(down) == 4:
            return (up[0], *down[1:])
        return (up[0], down[1], *table_shape[2:]) if len(table_shape) == 4 and table_shape[2:] == (1, 1) \
            else (up[0], down[1])
    if "diff" in keys:
        return info(keys["diff"]).shape
    if "w_norm" in keys:
        return info(keys["w_norm"]).shape
    return table_shape


def resize_lora(src: str | os.PathLike[str], output: str | os.PathLike[str], options: ResizeOptions = ResizeOptions(),
                *, overwrite: bool = False, progress: Callable[[int, int], None] | None = None) -> list[LayerReport]:
    """Re-factor every layer of `src` under the new rank rules and write a kohya adapter."""
    return merge_loras([(str(src), 1.0)], output, options, overwrite=overwrite, progress=progress, title="resize")


def merge_loras(inputs: Sequence[tuple[str, float]], output: str | os.PathLike[str],
                options: ResizeOptions = ResizeOptions(), *, overwrite: bool = False,
                progress: Callable[[int, int], None] | None = None, title: str = "merge") -> list[LayerReport]:
    """Σ weight_i · ΔW_i per module over the inputs, re-factored under the rank rules; returns per-layer rows."""
    if not inputs:
        raise UsageError("merge-lora needs at least one adapter")
    archs = {adapter_arch(path, options.arch) for path, _ in inputs}
    if len(archs) != 1:
        raise UsageError(f"the adapters are for different architectures ({', '.join(sorted(archs))})")
    arch = archs.pop()
    shapes: dict[str, tuple[int, ...]] = {}
    for path, _ in inputs:
        for key, shape in adapter_shapes(path, arch).items():
            if shapes.setdefault(key, shape) != shape:
                raise CheckpointError(f"{path}: {key} has shape {list(shape)} here but {list(shapes[key])} in "
                                      "another adapter")
    modules = {m.name: m for m in lora_modules(arch, shapes)}
    adapters = [Adapter(path, arch, modules.values()) for path, _ in inputs]
    sources = [(a.path, a.metadata) for a in adapters]  # they date the output (kohya.modelspec_date)
    try:
        _refuse_unknown_and_dora(adapters)
        names = sorted({name for a in adapters for name in a.layers})
        rows, layers = [], []
        for done, name in enumerate(names, start=1):
            row, factors = _one(modules[name], adapters, [w for _, w in inputs], options)
            rows.append(row)
            if factors is not None:
                layers.append(factors)
            if progress is not None:
                progress(done, len(names))
    finally:
        for a in adapters:
            a.close()
    tensors = adapter_tensors(layers, parse_dtype(options.save_dtype))
    info = {"tool": f"mergekit-sdxl {__version__}", "operation": title,
            "inputs": [{"name": file_name(p), "weight": w} for p, w in inputs],
            "rank": options.rank.describe(), "conv_rank": options.conv_rank.describe(),
            "mean_energy": round(sum(r.energy for r in rows) / len(rows), 6) if rows else 1.0}
    extra = {"mergekit_sdxl.lora": json.dumps(info, sort_keys=True),
             "mergekit_sdxl.lora_layers": json.dumps({r.name: [r.rank, round(r.energy, 6)] for r in rows},
                                                     sort_keys=True)}
    has_kxk = any(lf.module.is_conv and lf.module.shape[2:] != (1, 1) for lf in layers)
    # kohya's dynamic resize writes "Dynamic" for both dim and alpha
    dynamic = options.rank.mode != "fixed" or (has_kxk and options.conv_rank.mode != "fixed")
    metadata = kohya_metadata(arch, layers, rank=options.rank.rank,
                              conv_rank=options.conv_rank.rank if has_kxk else None,
                              title=Path(output).stem, sources=sources, dynamic=dynamic, extra=extra)
    metadata.update(kohya_hashes(tensors, metadata))
    write_adapter(output, tensors, metadata, overwrite=overwrite, inputs=tuple(p for p, _ in inputs))
    return rows


def _refuse_unknown_and_dora(adapters: list[Adapter]) -> None:
    for adapter in adapters:
        if adapter.unknown:
            raise CheckpointError(f"{adapter.path}: {len(adapter.unknown)} key(s) match no module or known format, "
                                  f"e.g. {adapter.unknown[0]!r}")
        dora = [name for name, layer in adapter.layers.items() if layer.has_dora]
        if dora:
            raise CheckpointError(f"{adapter.path}: module {dora[0]} is DoRA; its change depends on the checkpoint's "
                                  "weights, so it cannot be resized or merged without them (bake it instead)")


def _one(module: LoraModule, adapters: list[Adapter], weights: list[float],
         options: ResizeOptions) -> tuple[LayerReport, LayerFactors | None]:
    total: torch.Tensor | None = None
    for adapter, weight in zip(adapters, weights):
        layer = adapter.layers.get(module.name)
        if layer is None or weight == 0:
            continue
        delta = adapter.layer_delta(layer).weight
        if delta is None:
            continue
        total = delta * weight if total is None else total.add_(delta, alpha=weight)
    row = LayerReport(module.name, module.key, module.component, 0, 1.0, 0.0, False)
    if total is None or not bool(total.any()):
        row.reason = "zero"
        return row, None
    kxk = module.is_conv and module.shape[2:] != (1, 1)
    rule = options.conv_rank if kxk else options.rank
    factors = factorize(total.reshape(total.shape[0], -1), rule, options.solver, module.name)
    row.rank, row.energy, row.kept = factors.rank, factors.energy, True
    row.rel_change = math.nan
    alpha = options.conv_alpha if kxk else options.alpha
    return row, with_alpha(module, factors.up, factors.down, alpha)
