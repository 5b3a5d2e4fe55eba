"""Extract a LoRA from two checkpoints (ΔW = tuned − base), streaming one layer at a time.

Memory holds a few layers (the one being factorised and the next one being read) plus the factors written so far
(a rank-64 SDXL LoRA is ~0.4 GB in fp16). Layers are chosen by state-dict key (arch/lora_names.py).

Text encoders (`auto`): a text-encoder layer is kept when ‖ΔW‖_F / ‖W‖_F exceeds the noise floor
    floor = max(1e-3, 4 · u / √3),
where u is the unit roundoff of the coarser stored dtype of the two inputs (fp16 2⁻¹¹, bf16 2⁻⁸, fp32 2⁻²⁴).
u / √3 is the RMS relative error of rounding a weight once, so re-saving a model in another precision
(‖ΔW‖/‖W‖ ≈ 3e-4 for fp16, 2e-3 for bf16) stays below the floor while a real fine-tune (1e-3 and up) passes.
Every decision is reported with its number.

Attention blocks are decided whole: A1111 applies a LoRA to CLIP-G's attention (`nn.MultiheadAttention`, q/k/v
fused in `in_proj_weight`) only when the q, k, v and out projections of that layer are all present, and silently
skips a partial block. So a text-encoder attention block is kept when any of its four projections passes the
floor (in `on` mode: changed at all), and then all four are written; a projection that did not change at all gets
rank-1 zero factors.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from mergekit_sdxl import __version__
from mergekit_sdxl.arch.detect import detect_arch
from mergekit_sdxl.arch.lora_names import PRESETS, LoraModule, lora_modules, select
from mergekit_sdxl.arch.registry import arch_name
from mergekit_sdxl.dtypes import WEIGHTS, parse_dtype
from mergekit_sdxl.engine.memory import limit_arenas
from mergekit_sdxl.errors import ArchError, CheckpointError, UsageError
from mergekit_sdxl.io.dtypes import torch_dtype
from mergekit_sdxl.io.reader import CheckpointReader, open_checkpoint
from mergekit_sdxl.lora.kohya import (
    FORMATS,
    LayerFactors,
    adapter_tensors,
    kohya_hashes,
    kohya_metadata,
    with_alpha,
    write_adapter,
)
from mergekit_sdxl.lora.svd import RankRule, SolverOptions, factorize
from mergekit_sdxl.platform.text import file_name

TE_MODES = ("auto", "on", "off")
HashFn = Callable[[Path], dict[str, "str | None"]]
UNIT_ROUNDOFF = {"F32": 2.0**-24, "F64": 2.0**-53, "F16": 2.0**-11, "BF16": 2.0**-8, "F8_E4M3": 2.0**-4,
                 "F8_E5M2": 2.0**-3}
MIN_FLOOR = 1e-3
_ATTN_PROJECTION = re.compile(r"^(lora_te\d?_.+_self_attn)_(?:q|k|v|out)_proj$")


@dataclass(frozen=True)
class ExtractOptions:
    """Everything `extract-lora` can be told (see the CLI help for each)."""

    rank: RankRule = RankRule("fixed", 64)
    conv_rank: RankRule = RankRule("fixed", 32)
    preset: str = "attn"
    text_encoders: str = "auto"
    te_floor: float | None = None
    solver: SolverOptions = SolverOptions()
    clamp_quantile: float | None = None
    alpha: float | None = None
    conv_alpha: float | None = None
    save_dtype: str = "F16"
    device: str = "cpu"
    fmt: str = "kohya"

    def check(self) -> None:
        """UsageError for option values outside their ranges."""
        if self.preset not in PRESETS:
            raise UsageError(f"--preset {self.preset!r}: use one of {', '.join(PRESETS)}")
        if self.text_encoders not in TE_MODES:
            raise UsageError(f"--text-encoders {self.text_encoders!r}: use one of {', '.join(TE_MODES)}")
        if self.fmt not in FORMATS:
            raise UsageError(f"--format {self.fmt!r}: use one of {', '.join(FORMATS)}")
        parse_dtype(self.save_dtype, WEIGHTS, "--save-dtype")


@dataclass
class LayerReport:
    """One candidate layer: its rank and retained energy, or why it was dropped."""

    name: str
    key: str
    component: str
    rank: int
    energy: float
    rel_change: float
    kept: bool
    reason: str = ""


@dataclass
class ExtractReport:
    """What an extraction did: per-layer rows and the file-level summary."""

    arch: str
    layers: list[LayerReport] = field(default_factory=list)
    te_floor: float = 0.0
    output: str = ""

    @property
    def kept(self) -> list[LayerReport]:
        """The layers written."""
        return [row for row in self.layers if row.kept]

    def summary(self) -> dict[str, object]:
        """File-level numbers: layers kept/dropped per component, mean/min energy, total retained energy."""
        kept = self.kept
        components: dict[str, dict[str, int]] = {}
        for row in self.layers:
            entry = components.setdefault(row.component, {"kept": 0, "dropped": 0})
            entry["kept" if row.kept else "dropped"] += 1
        energies = [row.energy for row in kept]
        return {
            "arch": self.arch,
            "layers": len(kept),
            "components": components,
            "mean_energy": round(sum(energies) / len(energies), 6) if energies else 1.0,
            "min_energy": round(min(energies), 6) if energies else 1.0,
            "te_floor": self.te_floor,
        }


def noise_floor(dtypes: list[str]) -> float:
    """The text-encoder noise floor for inputs stored in `dtypes` (module docstring)."""
    u = max(UNIT_ROUNDOFF.get(d, 2.0**-11) for d in dtypes) if dtypes else 2.0**-11
    return max(MIN_FLOOR, 4 * u / math.sqrt(3))


def extract_lora(base: str | os.PathLike[str], tuned: str | os.PathLike[str], output: str | os.PathLike[str],
                 options: ExtractOptions = ExtractOptions(), *, overwrite: bool = False,
                 progress: Callable[[LayerReport, int, int], None] | None = None,
                 input_hashes: HashFn | None = None) -> ExtractReport:
    """Extract tuned − base as an adapter file and return the report.

    Args:
        base, tuned: the two checkpoints (same architecture; checked before any tensor is read).
        output: the adapter to write.
        options: ranks, preset, solver, dtype, format.
        overwrite: replace an existing output.
        progress: called after each layer with (row, done, total).
        input_hashes: path -> hash dict stored in the metadata (default: no hashes).

    Raises:
        ArchError: the inputs are of different architectures (or unknown).
        CheckpointError: a selected key is missing or differs in shape between the inputs.
    """
    limit_arenas(1)  # one malloc arena: bounds RSS fragmentation from the reader thread's many small tensors
    options.check()
    device = torch.device(options.device)
    with open_checkpoint(base) as rb, open_checkpoint(tuned) as rt:
        arch = _check_pair(rb.keys(), rt.keys(), Path(base), Path(tuned))
        shapes = {k: rb.info(k).shape for k in rb.keys()}
        sources = ((base, dict(rb.metadata)), (tuned, dict(rt.metadata)))  # they date the adapter
        modules = _selected(arch, shapes, options)
        _check_shapes(modules, rb, rt, Path(base), Path(tuned))
        floor = options.te_floor if options.te_floor is not None else noise_floor(
            sorted({rb.info(m.key).dtype for m in modules} | {rt.info(m.key).dtype for m in modules}))
        report = ExtractReport(arch, te_floor=floor, output=str(output))
        layers: list[LayerFactors] = []
        total = len(modules)
        for row, factors in _extract_all(modules, _deltas(modules, rb, rt, device), options, floor):
            report.layers.append(row)
            if factors is not None:
                layers.append(factors)
            if progress is not None:
                progress(row, len(report.layers), total)
    if not layers:
        warnings.warn(f"{tuned}: no layer differs from {base}; writing an empty adapter", stacklevel=2)
    tensors = adapter_tensors(layers, parse_dtype(options.save_dtype), options.fmt)
    metadata = _metadata(arch, layers, report, options, Path(base), Path(tuned), Path(output), input_hashes,
                         sources)
    if options.fmt == "kohya":
        metadata.update(kohya_hashes(tensors, metadata))
    write_adapter(output, tensors, metadata, overwrite=overwrite, inputs=(base, tuned))
    return report


def _check_pair(base_keys: list[str], tuned_keys: list[str], base: Path, tuned: Path) -> str:
    arch_b = detect_arch(base_keys, str(base))
    arch_t = detect_arch(tuned_keys, str(tuned))
    if arch_b != arch_t:
        raise ArchError(f"{base} is {arch_name(arch_b)} but {tuned} is {arch_name(arch_t)}: a LoRA needs two "
                        "checkpoints of the same architecture")
    return arch_b


def _selected(arch: str, shapes: dict[str, tuple[int, ...]], options: ExtractOptions) -> list[LoraModule]:
    components = ["unet"] if options.text_encoders == "off" else None
    return select(lora_modules(arch, shapes), options.preset, components)


def _check_shapes(modules: list[LoraModule], rb: CheckpointReader, rt: CheckpointReader, base: Path,
                  tuned: Path) -> None:
    for module in modules:
        if module.key not in rt:
            raise CheckpointError(f"{tuned}: has no tensor {module.key!r} (present in {base})")
        sb, st = rb.info(module.key).shape, rt.info(module.key).shape
        if sb != st:
            raise CheckpointError(f"{module.key}: shape {list(sb)} in {base} but {list(st)} in {tuned}")


def _deltas(modules: list[LoraModule], rb: CheckpointReader, rt: CheckpointReader,
            device: torch.device) -> Iterator[tuple[LoraModule, torch.Tensor, float]]:
    """(module, ΔW in the module's layout as fp32 on `device`, ‖W_base‖) in order; the next key is read meanwhile."""

    def load(key: str) -> tuple[torch.Tensor, torch.Tensor]:
        return rb.read(key), rt.read(key)

    keys = list(dict.fromkeys(m.key for m in modules))
    by_key: dict[str, list[LoraModule]] = {}
    for module in modules:
        by_key.setdefault(module.key, []).append(module)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="mergekit-lora-read") as pool:
        pending = pool.submit(load, keys[0]) if keys else None
        for i, key in enumerate(keys):
            assert pending is not None
            wb, wt = pending.result()
            pending = pool.submit(load, keys[i + 1]) if i + 1 < len(keys) else None
            base = wb.to(device, torch.float32)
            delta = wt.to(device, torch.float32) - base
            del wb, wt
            for module in by_key[key]:
                rows = module.rows()
                d = delta if rows is None else delta[rows[0]:rows[1]]
                w = base if rows is None else base[rows[0]:rows[1]]
                if module.transpose:
                    d, w = d.T, w.T
                yield module, d, float(torch.linalg.vector_norm(w))


def attention_block(module: LoraModule) -> str | None:
    """The text-encoder attention block (name without the projection) `module` is one projection of, else None."""
    match = _ATTN_PROJECTION.match(module.name) if module.is_text else None
    return match.group(1) if match else None


Delta = tuple[LoraModule, torch.Tensor, float]


def _extract_all(modules: list[LoraModule], deltas: Iterator[Delta], options: ExtractOptions,
                 floor: float) -> Iterator[tuple[LayerReport, LayerFactors | None]]:
    """Rows and factors in stream order; the projections of a text-encoder attention block are held until the
    block is complete (they arrive together: q/k/v share one key, out is the next) and decided together."""
    sizes = Counter(block for block in map(attention_block, modules) if block is not None)
    pending: dict[str, list[Delta]] = {}
    for item in deltas:
        block = attention_block(item[0])
        if block is None:
            yield _extract_one(*item, options, floor)
            continue
        pending.setdefault(block, []).append(item)
        if len(pending[block]) == sizes[block]:
            yield from _extract_block(pending.pop(block), options, floor)
    for items in pending.values():  # a block the preset selects only partly: decided on what it has
        yield from _extract_block(items, options, floor)


def _extract_block(items: list[Delta], options: ExtractOptions,
                   floor: float) -> Iterator[tuple[LayerReport, LayerFactors | None]]:
    """One attention block, all projections or none (module docstring)."""
    rels = [_relative(delta, weight_norm) for _, delta, weight_norm in items]
    changed = [rel > 0 for rel in rels]
    keep = any(changed) if options.text_encoders != "auto" else any(rel > floor for rel in rels)
    for (module, delta, weight_norm), rel, moved in zip(items, rels, changed):
        if not keep:
            yield _extract_one(module, delta, weight_norm, options, floor, block_rel=max(rels))
        elif not moved:
            yield _zero_layer(module, options)
        else:
            row, factors = _extract_one(module, delta, weight_norm, options, -1.0)
            if options.text_encoders == "auto" and rel <= floor:
                row.reason = f"below noise floor ({rel:.2e} <= {floor:.2e}) but kept with its attention block"
            yield row, factors


def _relative(delta: torch.Tensor, weight_norm: float) -> float:
    delta_norm = float(torch.linalg.vector_norm(delta))
    return delta_norm / weight_norm if weight_norm > 0 else (math.inf if delta_norm > 0 else 0.0)


def _zero_layer(module: LoraModule, options: ExtractOptions) -> tuple[LayerReport, LayerFactors]:
    """Rank-1 zero factors for an unchanged projection of a kept attention block (A1111 needs all four)."""
    row = LayerReport(module.name, module.key, module.component, 1, 1.0, 0.0, True,
                      "unchanged; zero factors written to complete its attention block")
    target = torch_dtype(parse_dtype(options.save_dtype))
    out_dim, in_dim = module.shape[0], math.prod(module.shape[1:])
    return row, with_alpha(module, torch.zeros(out_dim, 1, dtype=target), torch.zeros(1, in_dim, dtype=target), None)


def _extract_one(module: LoraModule, delta: torch.Tensor, weight_norm: float, options: ExtractOptions,
                 floor: float, block_rel: float | None = None) -> tuple[LayerReport, LayerFactors | None]:
    """One layer; `block_rel`: the largest change in its attention block, which decided it (dropped)."""
    rel = _relative(delta, weight_norm)
    row = LayerReport(module.name, module.key, module.component, 0, 1.0, rel, False)
    if rel == 0.0:
        row.reason = "unchanged"
        return row, None
    if module.is_text and options.text_encoders == "auto" and max(rel, block_rel or 0.0) <= floor:
        row.reason = f"below noise floor ({rel:.2e} <= {floor:.2e})" + (
            "" if block_rel is None else f"; its attention block too (max {block_rel:.2e})")
        row.energy = 0.0
        return row, None
    kxk = module.is_conv and module.shape[2:] != (1, 1)
    rule = options.conv_rank if kxk else options.rank
    alpha = options.conv_alpha if kxk else options.alpha
    factors = factorize(delta.reshape(delta.shape[0], -1), rule, options.solver, module.name, options.clamp_quantile)
    row.rank, row.energy, row.kept = factors.rank, factors.energy, True
    layer = with_alpha(module, factors.up, factors.down, alpha)
    # store in the save dtype right away: fp32 factors of a whole SDXL would hold ~1 GB until the end
    target = torch_dtype(parse_dtype(options.save_dtype))
    layer.up, layer.down = layer.up.to("cpu", target), layer.down.to("cpu", target)
    return row, layer


def _metadata(arch: str, layers: list[LayerFactors], report: ExtractReport, options: ExtractOptions, base: Path,
              tuned: Path, output: Path, input_hashes: HashFn | None,
              sources: tuple[tuple[str | os.PathLike[str], dict[str, str]], ...]) -> dict[str, str]:
    summary = report.summary()
    info = {
        "tool": f"mergekit-sdxl {__version__}",
        "base": {"name": file_name(base), **(input_hashes(base) if input_hashes else {})},
        "tuned": {"name": file_name(tuned), **(input_hashes(tuned) if input_hashes else {})},
        "options": {
            "rank": options.rank.describe(), "conv_rank": options.conv_rank.describe(), "preset": options.preset,
            "text_encoders": options.text_encoders, "solver": "exact" if options.solver.exact else "randomized",
            **{k: v for k, v in asdict(options.solver).items() if k != "exact"},
            "clamp_quantile": options.clamp_quantile, "save_dtype": options.save_dtype,
        },
        "summary": summary,
    }
    per_layer = {row.name: [row.rank, round(row.energy, 6)] for row in report.kept}
    extra = {
        "mergekit_sdxl.lora": json.dumps(info, sort_keys=True),
        "mergekit_sdxl.lora_layers": json.dumps(per_layer, sort_keys=True),
        "ss_sd_model_name": file_name(base),
        "ss_output_name": file_name(output.stem),
    }
    has_kxk = any(m.module.is_conv and m.module.shape[2:] != (1, 1) for m in layers) or options.preset != "attn"
    dynamic = options.rank.mode != "fixed" or (has_kxk and options.conv_rank.mode != "fixed")
    return kohya_metadata(arch, layers, rank=options.rank.rank, conv_rank=options.conv_rank.rank if has_kxk else None,
                          title=output.stem, sources=sources, dynamic=dynamic, extra=extra)
