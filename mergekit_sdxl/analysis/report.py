"""The `inspect` report of a checkpoint: what it is, from its header alone (no tensor data is read by default),
as JSON-able data (schema `SCHEMA`), and its plain-text rendering."""

from __future__ import annotations

import contextlib
import json
import os
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from mergekit_sdxl.arch.blocks import CONVENTIONS, DEFAULT_CONVENTION, block_names, block_of
from mergekit_sdxl.arch.detect import (
    canonical_key,
    component_of,
    detect_arch,
    markers,
    missing_mandatory,
    param_counts,
    unknown_keys,
)
from mergekit_sdxl.arch.tables import ARCH_NAMES, COMPONENTS, key_table, numel
from mergekit_sdxl.dtypes import is_float_dtype
from mergekit_sdxl.errors import ArchError, CheckpointError
from mergekit_sdxl.io import jsonio
from mergekit_sdxl.io.dtypes import SCALE_SUFFIX as _SUFFIX
from mergekit_sdxl.io.dtypes import is_marker

# Scaled fp8: `<prefix>.scale_weight` scales and the empty `scaled_fp8` flags are not parameters, nor unknown keys
SCALE_SUFFIX = "." + _SUFFIX

SCHEMA = "mergekit-sdxl.inspect/1"
LINEAGE_KEYS = ("sd_merge_recipe", "sd_merge_models")
TEXT_LIST_LIMIT = 10
RECORDED = "recorded"  # build_report(convention=RECORDED): the convention the file's recipe recorded
RECIPE_KEY = "mergekit_sdxl.recipe"

# (label, total bytes) -> a context manager giving `advance(bytes)`; the CLI passes a rich progress bar
ProgressFactory = Callable[[str, int], contextlib.AbstractContextManager[Callable[[int], None]]]


@contextlib.contextmanager
def no_progress(label: str, total: int) -> Iterator[Callable[[int], None]]:
    """A ProgressFactory that shows nothing."""
    yield lambda n: None


def build_report(checkpoint: Any, path: Path, *, convention: str | None = None, hash_mode: str = "legacy",
                 check_values: bool = False, progress: ProgressFactory = no_progress) -> dict[str, Any]:
    """The inspect report (schema `SCHEMA`, described in `mergekit-sdxl inspect --help`) of an opened checkpoint.

    `convention` adds the per-block table (RECORDED: the convention the file's merge recipe recorded, else the
    default); `hash_mode` is "none", "legacy" (64 KiB read) or "full" (whole file);
    `progress(label, total_bytes)` is entered around the long reads (full hash, value check).
    """
    infos = {key: checkpoint.info(key) for key in checkpoint.keys()}
    arch, arch_error = _arch(infos, path)
    params = {k: i for k, i in infos.items() if not (k.endswith(SCALE_SUFFIX) or is_marker(k))}
    components = _components(params, arch)
    metadata = dict(checkpoint.metadata)
    return {
        "schema": SCHEMA,
        "file": str(path),
        "size_bytes": os.path.getsize(path) if path.is_file() else None,
        "format": _format(checkpoint),
        "n_keys": len(infos),
        "n_params": sum(c["params"] for c in components.values()),
        "architecture": arch,
        "architecture_error": arch_error,
        "components": components,
        "markers": markers(infos),
        "metadata": metadata,
        "lineage": _lineage(metadata),
        "hashes": _hashes(path, metadata, hash_mode, progress),
        "oddities": _oddities(checkpoint, infos, params, arch, check_values, progress),
        "blocks": _blocks(params, arch, *_convention(convention, metadata)) if convention and arch else None,
    }


def recorded_convention(metadata: Mapping[str, str]) -> str | None:
    """The block convention a merge of ours recorded (`mergekit_sdxl.recipe` -> convention), None without one."""
    recipe = _json_or_text(metadata[RECIPE_KEY]) if RECIPE_KEY in metadata else None
    convention = recipe.get("convention") if isinstance(recipe, dict) else None
    return convention if convention in CONVENTIONS else None


def _convention(convention: str, metadata: Mapping[str, str]) -> tuple[str, str]:
    """(convention, where it came from) for the block table."""
    if convention != RECORDED:
        return convention, "given"
    recorded = recorded_convention(metadata)
    return (recorded, f"recorded in {RECIPE_KEY}") if recorded else (DEFAULT_CONVENTION, "default")


def _arch(infos: Mapping[str, Any], path: Path) -> tuple[str | None, str | None]:
    try:
        return detect_arch(infos, source=str(path)), None
    except ArchError as exc:
        return None, str(exc)


def _format(checkpoint: Any) -> str:
    name = type(checkpoint).__name__
    return {"SafetensorsReader": "safetensors", "TorchCheckpoint": "ckpt"}.get(name, name)


def _components(infos: Mapping[str, Any], arch: str | None) -> dict[str, dict[str, Any]]:
    groups: dict[str, dict[str, Any]] = {}
    for key, info in infos.items():
        component = component_of(key, arch) if arch else "other"
        group = groups.setdefault(component, {"keys": 0, "params": 0, "bytes": 0, "dtypes": Counter()})
        group["keys"] += 1
        group["bytes"] += info.nbytes
        group["dtypes"][info.dtype] += 1
    counts = param_counts(infos, arch) if arch else {"other": _float_params(infos)}
    ordered = {}
    for component in COMPONENTS:
        if component in groups:
            group = groups[component]
            ordered[component] = {**group, "params": counts[component], "dtypes": dict(group["dtypes"].most_common())}
    return ordered


def _float_params(infos: Mapping[str, Any]) -> int:
    return sum(numel(i.shape) for i in infos.values() if is_float_dtype(str(i.dtype)))


def _lineage(metadata: Mapping[str, str]) -> dict[str, Any]:
    """Parsed merge recipes: A1111's sd_merge_recipe / sd_merge_models and this tool's `mergekit*` entries."""
    lineage: dict[str, Any] = {key: _json_or_text(metadata[key]) if key in metadata else None for key in LINEAGE_KEYS}
    lineage["mergekit"] = {key: _json_or_text(value) for key, value in sorted(metadata.items())
                           if key.startswith("mergekit")}
    return lineage


def _json_or_text(value: str) -> Any:
    try:  # size- and depth-limited: a hostile entry is shown as text, never a RecursionError
        return jsonio.loads(value, "metadata", max_bytes=16 << 20, max_depth=32)
    except CheckpointError:
        return value


def _hashes(path: Path, metadata: Mapping[str, str], mode: str, progress: ProgressFactory) -> dict[str, Any]:
    result: dict[str, Any] = dict.fromkeys(("legacy", "sha256", "autov2", "data_sha256", "autov3", "source"))
    result["metadata"] = {key: metadata.get(key) for key in ("sshs_model_hash", "sshs_legacy_hash")}
    if mode == "none" or not path.is_file():
        return result
    from mergekit_sdxl.io import hashes

    result["legacy"] = hashes.legacy_hash(path)
    found, result["source"] = hashes.cached_hashes(path), "cache"
    if found is None and mode == "full":
        with progress("hashing", path.stat().st_size) as advance:
            found, result["source"] = hashes.hashes_for(path, advance), "computed"
    if found is None:
        result["source"] = None
    else:
        result.update(sha256=found.sha256, autov2=found.autov2, data_sha256=found.autov3,
                      autov3=found.autov3_short)
    return result


def _oddities(checkpoint: Any, infos: Mapping[str, Any], params: Mapping[str, Any], arch: str | None,
              check_values: bool, progress: ProgressFactory) -> dict[str, Any]:
    found: dict[str, Any] = {"missing_mandatory": [], "unknown_keys": [], "shape_mismatches": [],
                             "fp8_scales": sum(k.endswith(SCALE_SUFFIX) for k in infos), "non_finite": None}
    if arch:
        found["missing_mandatory"] = missing_mandatory(params, arch)
        found["unknown_keys"] = unknown_keys(params, arch)
        found["shape_mismatches"] = _shape_mismatches(params, arch)
    if check_values:
        found["non_finite"] = _non_finite(checkpoint, infos, progress)
    return found


def _shape_mismatches(infos: Mapping[str, Any], arch: str) -> list[dict[str, Any]]:
    table = key_table(arch)
    rows = []
    for key, info in infos.items():
        expected = table.get(canonical_key(key, arch))
        if expected is not None and tuple(info.shape) != expected.shape:
            rows.append({"key": key, "shape": list(info.shape), "expected": list(expected.shape)})
    return rows


def _non_finite(checkpoint: Any, infos: Mapping[str, Any], progress: ProgressFactory) -> dict[str, int]:
    """NaN/Inf count per float tensor that has any (reads every float tensor once)."""
    import torch

    floats = [(k, i) for k, i in infos.items() if is_float_dtype(str(i.dtype))]
    bad: dict[str, int] = {}
    with progress("checking values", sum(i.nbytes for _, i in floats)) as advance:
        for key, info in floats:
            tensor = checkpoint.read(key)
            if tensor.element_size() == 1:  # fp8: isfinite is not implemented for it
                tensor = tensor.float()
            count = int((~torch.isfinite(tensor)).sum())
            if count:
                bad[key] = count
            advance(info.nbytes)
    return bad


def _blocks(infos: Mapping[str, Any], arch: str, convention: str, source: str) -> dict[str, Any]:
    rows = {name: {"keys": 0, "params": 0} for name in block_names(arch, convention)}
    kept = []
    for key, info in infos.items():
        block = block_of(key, arch, convention)
        if block is None:
            kept.append(key)
            continue
        rows[block]["keys"] += 1
        rows[block]["params"] += numel(info.shape) if is_float_dtype(str(info.dtype)) else 0
    return {"convention": convention, "convention_source": source, "blocks": rows, "kept_from_a": sorted(kept)}


# ---- text rendering -------------------------------------------------------------------------------------------

def render_text(report: Mapping[str, Any]) -> str:
    """The report as aligned plain text (no markup: keys, paths and prompts print verbatim)."""
    lines = [f"file          {report['file']} ({_size(report['size_bytes'])}, {report['format']})"]
    arch = report["architecture"]
    lines.append(f"architecture  {ARCH_NAMES[arch] if arch else 'unknown'}")
    if report["architecture_error"]:
        lines.append(f"              {report['architecture_error']}")
    lines.append(f"tensors       {report['n_keys']:,} keys, {report['n_params']:,} float parameters")
    lines += _component_lines(report["components"])
    lines.append("markers       " + (", ".join(report["markers"]) + " (v-prediction / ZTSNR model)"
                                     if report["markers"] else "none"))
    lines += _hash_lines(report["hashes"])
    lines += _metadata_lines(report["metadata"], report["lineage"])
    lines += _oddity_lines(report["oddities"])
    if report["blocks"]:
        lines += _block_lines(report["blocks"])
    return "\n".join(lines)


def _size(n: int | None) -> str:
    if n is None:
        return "folder"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def _component_lines(components: Mapping[str, Any]) -> list[str]:
    lines = ["components"]
    for name, c in components.items():
        dtypes = ", ".join(f"{d} {n}" for d, n in c["dtypes"].items())
        lines.append(f"  {name:<7} {c['keys']:>6,} keys {c['params']:>15,} params  {_size(c['bytes']):>9}  {dtypes}")
    return lines


def _hash_lines(h: Mapping[str, Any]) -> list[str]:
    shown = [f"{label} {h[key]}" for label, key in (("legacy", "legacy"), ("AutoV2", "autov2"), ("AutoV3", "autov3"))
             if h[key]]
    line = "hashes        " + ("  ".join(shown) if shown else "not computed")
    if h["legacy"] and not h["autov2"]:
        line += "  (AutoV2/AutoV3: use --hash)"
    elif h["source"] == "cache":
        line += "  (from the hash cache)"
    lines = [line]
    lines += [f"              {key} (metadata): {value}" for key, value in h["metadata"].items() if value]
    return lines


def _metadata_lines(metadata: Mapping[str, str], lineage: Mapping[str, Any]) -> list[str]:
    if not metadata:
        return ["metadata      none"]
    lines = [f"metadata      {len(metadata)} entries"]
    parsed = {key for key in LINEAGE_KEYS if lineage[key] is not None} | set(lineage["mergekit"])
    for key in sorted(metadata):
        if key not in parsed:
            value = metadata[key].replace("\n", " ")
            lines.append(f"  {key}: {value if len(value) <= 120 else value[:117] + '...'}")
    if lineage["sd_merge_recipe"] is not None:
        lines.append("  sd_merge_recipe:")
        lines += _indent(json.dumps(lineage["sd_merge_recipe"], indent=2), 4)
    for key, value in lineage["mergekit"].items():
        lines.append(f"  {key}:")
        lines += _indent(json.dumps(value, indent=2) if not isinstance(value, str) else value, 4)
    lines += _ancestor_lines(lineage["sd_merge_models"])
    return lines


def _ancestor_lines(models: Any) -> list[str]:
    """sd_merge_models: {sha256: {name, legacy_hash, sd_merge_recipe}} -> one line per ancestor."""
    if models is None:
        return []
    if not isinstance(models, dict):
        return [f"  sd_merge_models: {models}"]
    lines = [f"  lineage (sd_merge_models, {len(models)} ancestors):"]
    for sha, entry in models.items():
        entry = entry if isinstance(entry, dict) else {}
        recipe = entry.get("sd_merge_recipe")
        how = ""
        if isinstance(recipe, dict):
            how = " <- " + ", ".join(f"{k}={recipe[k]}" for k in ("type", "interp_method", "method", "multiplier")
                                     if k in recipe)
        lines.append(f"    {entry.get('name', '?')} [{entry.get('legacy_hash', '?')}] sha256 {str(sha)[:10]}{how}")
    return lines


def _indent(text: str, n: int) -> list[str]:
    return [" " * n + line for line in text.splitlines()]


def _oddity_lines(odd: Mapping[str, Any]) -> list[str]:
    lines = []
    for label, key in (("missing mandatory keys", "missing_mandatory"), ("unknown keys", "unknown_keys")):
        lines += _listed(label, odd[key])
    mismatches = [f"{m['key']} {tuple(m['shape'])} (real: {tuple(m['expected'])})" for m in odd["shape_mismatches"]]
    lines += _listed("shapes unlike a real checkpoint", mismatches)
    if odd["fp8_scales"]:
        lines.append(f"  {odd['fp8_scales']} scaled-fp8 scale tensors (*{SCALE_SUFFIX})")
    if odd["non_finite"]:
        lines += _listed("tensors with NaN/Inf", [f"{k}: {n:,} values" for k, n in odd["non_finite"].items()])
    lines = ["oddities", *lines] if lines else ["oddities      none"]
    if odd["non_finite"] == {}:
        lines.append("values        all finite")
    return lines


def _listed(label: str, items: list[str]) -> list[str]:
    if not items:
        return []
    lines = [f"  {label} ({len(items):,}):"] + [f"    {item}" for item in items[:TEXT_LIST_LIMIT]]
    if len(items) > TEXT_LIST_LIMIT:
        lines.append(f"    ... and {len(items) - TEXT_LIST_LIMIT:,} more (--json lists all)")
    return lines


def _block_lines(blocks: Mapping[str, Any]) -> list[str]:
    lines = [f"blocks        convention {blocks['convention']} ({blocks['convention_source']})"]
    for name, row in blocks["blocks"].items():
        lines.append(f"  {name:<6} {row['keys']:>5,} keys {row['params']:>15,} params")
    kept = blocks["kept_from_a"]
    lines.append(f"  kept from A ({len(kept)}): " + (", ".join(kept) if kept else "none"))
    return lines
