"""Metadata written into merged files: our resolved recipe, A1111's lineage keys and ModelSpec.

- `mergekit_sdxl.recipe`: the resolved recipe (JSON, sorted keys) with every input's alias, file name and hashes.
- `sd_merge_recipe` / `sd_merge_models`: the keys A1111's checkpoint merger writes, so A1111 and tools reading
  its format show the lineage. `sd_merge_models` maps each input's sha256 to {name, legacy_hash, sd_merge_recipe}
  and is extended with the inputs' own `sd_merge_models`, so lineage accumulates across generations of merges.
- `modelspec.*`: architecture, implementation, title (no date: the same recipe and inputs must give the same bytes;
  a recipe may add `modelspec.date` itself).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

from mergekit_sdxl import __version__
from mergekit_sdxl.errors import CheckpointError
from mergekit_sdxl.io import jsonio

MAX_LINEAGE_BYTES = 16 << 20
MAX_LINEAGE_DEPTH = 32
MODELSPEC_ARCH = {"sdxl": "stable-diffusion-xl-v1-base", "sd15": "stable-diffusion-v1"}
MODELSPEC_IMPL = {"sdxl": "https://github.com/Stability-AI/generative-models",
                  "sd15": "https://github.com/Stability-AI/stablediffusion"}


@dataclass(frozen=True)
class InputRecord:
    """One merge input as recorded in the output's metadata."""

    alias: str
    name: str  # file name (no directories: paths are private)
    sha256: str | None
    autov3: str | None
    legacy: str | None
    metadata: Mapping[str, str]


def _dumps(value: object) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def input_entry(record: InputRecord) -> dict[str, object]:
    """The per-input block of our recipe metadata."""
    sha = record.sha256
    return {"file": record.name, "sha256": sha, "autov2": sha[:10] if sha else None,
            "autov3": record.autov3[:12] if record.autov3 else None, "autov3_full": record.autov3,
            "legacy_hash": record.legacy}


def a1111_models(records: list[InputRecord]) -> dict[str, object]:
    """`sd_merge_models`: sha256 -> {name, legacy_hash, sd_merge_recipe}, plus each input's own lineage."""
    models: dict[str, object] = {}
    for record in records:
        inherited = _json_or_none(record.metadata.get("sd_merge_models"))
        if isinstance(inherited, dict):
            models.update(inherited)
    for record in records:
        if record.sha256:
            models[record.sha256] = {"name": record.name, "legacy_hash": record.legacy,
                                     "sd_merge_recipe": _json_or_none(record.metadata.get("sd_merge_recipe"))}
    return models


def a1111_recipe(records: list[InputRecord], summary: str, output_name: str, dtype: str) -> dict[str, object]:
    """`sd_merge_recipe` in A1111's shape (type, primary/secondary/tertiary hashes, method, ...)."""
    hashes = [r.sha256 for r in records]
    return {"type": "mergekit-sdxl", "primary_model_hash": hashes[0] if hashes else None,
            "secondary_model_hash": hashes[1] if len(hashes) > 1 else None,
            "tertiary_model_hash": hashes[2] if len(hashes) > 2 else None,
            "interp_method": summary, "multiplier": None, "save_as_half": dtype == "F16",
            "custom_name": output_name, "config_source": 0, "bake_in_vae": None, "discard_weights": "",
            "is_inpainting": False, "is_instruct_pix2pix": False}


def merge_metadata(*, arch: str, recipe: Mapping[str, object], records: list[InputRecord], summary: str,
                   output_name: str, dtype: str, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """All metadata for a merged file (every value a string, as safetensors requires)."""
    resolved = dict(recipe)
    resolved["inputs"] = {r.alias: input_entry(r) for r in records}
    meta = {
        "format": "pt",
        "mergekit_sdxl.version": __version__,
        "mergekit_sdxl.recipe": _dumps(resolved),
        "sd_merge_recipe": _dumps(a1111_recipe(records, summary, output_name, dtype)),
        "sd_merge_models": _dumps(a1111_models(records)),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": MODELSPEC_ARCH.get(arch, arch),
        "modelspec.implementation": MODELSPEC_IMPL.get(arch, ""),
        "modelspec.title": output_name.rsplit(".", 1)[0],
    }
    meta.update(extra or {})
    return meta


def _json_or_none(text: str | None) -> object:
    if not text:
        return None
    try:  # size- and depth-limited: a hostile lineage entry must not raise RecursionError here or later
        return jsonio.loads(text, "metadata", max_bytes=MAX_LINEAGE_BYTES, max_depth=MAX_LINEAGE_DEPTH)
    except CheckpointError:
        return None
