"""`inspect` on an adapter file: what kind of LoRA/LyCORIS it is, from its header (and its small alpha tensors).

The summary (schema `SCHEMA`): key naming (kohya, peft, diffusers), algorithms (lora, loha, lokr, full, norm; DoRA),
the architecture and what told it (key names, kohya's `ss_base_model_version`, `modelspec.architecture`, SGM UNet
names), per component the module count and the ranks and alphas with their counts, and which blocks the modules
cover (LoRA Block Weight / MBW names: BASE = the text encoders).
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

from mergekit_sdxl.arch.blocks import DEFAULT_CONVENTION, block_names, block_of
from mergekit_sdxl.arch.detect import detect_arch
from mergekit_sdxl.arch.lora_names import (
    LoraModule,
    adapter_arch_from_keys,
    arch_from_kohya_version,
    arch_from_sgm_unet_names,
    lora_modules,
    name_index,
    normalize_name,
)
from mergekit_sdxl.arch.registry import SPECS, arch_name
from mergekit_sdxl.errors import ArchError
from mergekit_sdxl.lora.keys import ALGOS, algo_of, split_key

SCHEMA = "mergekit-sdxl.inspect-lora/1"
NAMINGS = {"peft": (".lora_A.weight", ".lora_B.weight"),  # the key endings that tell a naming
           "diffusers": (".lora.down.weight", ".lora.up.weight", ".lora_linear_layer.down.weight")}
RANK_PART = {"lora": "down", "loha": "hada_w1_b", "lokr": "lokr_w2_b"}  # the part whose first dim is the rank


def is_adapter(keys: Iterable[str]) -> bool:
    """True when `keys` are an adapter's: no checkpoint fingerprint, and at least one adapter key."""
    keys = list(keys)
    try:
        detect_arch(keys)
        return False
    except ArchError:
        return any(split_key(key) is not None for key in keys)


def adapter_summary(reader: Any, path: str | os.PathLike[str]) -> dict[str, Any]:
    """The summary of an opened adapter file (module docstring; the schema is in `mergekit-sdxl inspect --help`)."""
    keys = reader.keys()
    metadata = dict(reader.metadata)
    arch, arch_source = adapter_arch_source(keys, metadata)
    index = name_index(lora_modules(arch)) if arch else {}
    layers: dict[str, dict[str, str]] = {}
    unknown: list[str] = []
    for key in keys:
        split = split_key(key)
        name = normalize_name(split[0], arch) if split and arch else split[0] if split else None
        if split is None or name is None or (arch and name not in index):
            unknown.append(key)
            continue
        layers.setdefault(name, {})[split[1]] = key
    algos = {name: algo_of(parts) for name, parts in layers.items()}
    unknown += [key for name, algo in algos.items() if not algo for key in layers[name].values()]
    known = {name: parts for name, parts in layers.items() if algos[name]}
    return {
        "schema": SCHEMA, "file": str(path), "size_bytes": os.path.getsize(path) if os.path.isfile(path) else None,
        "kind": "adapter", "naming": _naming(keys),
        "algorithms": {a: n for a, n in Counter(algos[name] for name in known).most_common()},
        "dora_modules": sum("dora_scale" in parts for parts in known.values()),
        "architecture": arch, "architecture_source": arch_source, "n_keys": len(keys), "n_modules": len(known),
        "components": _components(reader, known, algos, index),
        "blocks": _coverage(known, index, arch) if arch else None,
        "unknown_keys": sorted(unknown), "metadata": metadata,
    }


def adapter_arch_source(keys: list[str], metadata: Mapping[str, str]) -> tuple[str | None, str | None]:
    """(architecture, what told it), (None, None) when nothing does."""
    found = [(adapter_arch_from_keys(keys), "key names"),
             (arch_from_kohya_version(metadata.get("ss_base_model_version", "")), "ss_base_model_version"),
             (next((spec.id for spec in SPECS.values()
                    if spec.modelspec.lora_architecture == metadata.get("modelspec.architecture")), None),
              "modelspec.architecture"),
             (arch_from_sgm_unet_names(split[0] for split in map(split_key, keys) if split), "SGM UNet names")]
    return next(((arch, source) for arch, source in found if arch), (None, None))


def _naming(keys: list[str]) -> str:
    for naming, endings in NAMINGS.items():
        if any(key.endswith(endings) for key in keys):
            return naming
    return "kohya" if any(key.startswith("lora_") for key in keys) else "other"


def _components(reader: Any, layers: Mapping[str, dict[str, str]], algos: Mapping[str, str],
                index: Mapping[str, LoraModule]) -> dict[str, dict[str, Any]]:
    """component -> {modules, ranks: {rank: n}, alphas: {alpha: n}}; "-" where a module has no rank or alpha."""
    rows: dict[str, dict[str, Counter[str]]] = {}
    for name, parts in sorted(layers.items()):
        module = index.get(name)
        row = rows.setdefault(module.component if module else "unknown", {"ranks": Counter(), "alphas": Counter()})
        part = RANK_PART.get(algos[name])
        rank = reader.info(parts[part]).shape[0] if part in parts else None
        row["ranks"][str(rank) if rank is not None else "-"] += 1
        row["alphas"][_alpha(reader, parts.get("alpha"))] += 1
    return {component: {"modules": sum(row["ranks"].values()), "ranks": dict(row["ranks"].most_common()),
                        "alphas": dict(row["alphas"].most_common())} for component, row in rows.items()}


def _alpha(reader: Any, key: str | None) -> str:
    """The stored alpha as kohya writes it ("16.0"), "-" when none is stored (then alpha = rank)."""
    if key is None:
        return "-"
    return str(float(reader.read(key).float().reshape(-1)[0]))


def _coverage(layers: Mapping[str, dict[str, str]], index: Mapping[str, LoraModule], arch: str) -> dict[str, Any]:
    """Modules per block (every block listed, 0 where the adapter changes nothing)."""
    counts = Counter(block_of(index[name].key, arch, DEFAULT_CONVENTION) for name in layers)
    return {"convention": DEFAULT_CONVENTION,
            "modules": {block: counts.get(block, 0) for block in block_names(arch, DEFAULT_CONVENTION)}}


def render_adapter_text(summary: Mapping[str, Any]) -> str:
    """The summary as aligned plain text."""
    size = summary["size_bytes"]
    algos = ", ".join(f"{a} {n}" for a, n in summary["algorithms"].items()) or "none"
    dora = f"; DoRA {summary['dora_modules']}" if summary["dora_modules"] else ""
    arch = summary["architecture"]
    lines = [f"file          {summary['file']} ({f'{size:,} bytes' if size is not None else '?'})",
             f"type          LoRA/LyCORIS adapter, {summary['naming']} names ({algos}{dora})",
             "architecture  " + (f"{arch_name(arch)} (from {summary['architecture_source']})" if arch else
                                 "unknown (no key name or metadata tells it; bake/resize-lora take --arch)"),
             f"modules       {summary['n_modules']:,} ({summary['n_keys']:,} keys)"]
    for component, row in summary["components"].items():
        ranks = ", ".join(f"{r} x{n}" for r, n in row["ranks"].items())
        alphas = ", ".join(f"{a} x{n}" for a, n in row["alphas"].items())
        lines.append(f"  {component:<8} {row['modules']:>5,} modules  rank {ranks}  alpha {alphas}")
    if summary["blocks"]:
        cover = summary["blocks"]["modules"]
        lines.append(f"blocks        {sum(1 for n in cover.values() if n)} of {len(cover)} covered: "
                     + " ".join(f"{block}:{n}" for block, n in cover.items()))
    if summary["unknown_keys"]:
        shown = ", ".join(summary["unknown_keys"][:10])
        lines.append(f"unknown keys  {len(summary['unknown_keys'])}: {shown}")
    meta = summary["metadata"]
    lines.append(f"metadata      {len(meta)} entries" if meta else "metadata      none")
    for key in sorted(meta):
        value = meta[key].replace("\n", " ")
        lines.append(f"  {key}: {value if len(value) <= 120 else value[:117] + '...'}")
    return "\n".join(lines)


__all__ = ["ALGOS", "SCHEMA", "adapter_arch_source", "adapter_summary", "is_adapter", "render_adapter_text"]
