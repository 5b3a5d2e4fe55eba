"""Metadata written into merged files: our resolved recipe, A1111's lineage keys and ModelSpec.

- `mergekit_sdxl.recipe`: the resolved recipe (JSON, sorted keys) with every input's alias, file name and hashes.
- `sd_merge_recipe` / `sd_merge_models`: the keys A1111's checkpoint merger writes, so A1111 and tools reading
  its format show the lineage. `sd_merge_models` maps each input's sha256 to {name, legacy_hash, sd_merge_recipe}
  and is extended with the inputs' own `sd_merge_models`, so lineage accumulates across generations of merges.
- `modelspec.*`: architecture, implementation, title (no date: the same recipe and inputs must give the same bytes;
  a recipe may add `modelspec.date` itself).

A1111 re-merge: A1111's metadata reader turns every value that starts with `{` into a parsed object, and its
checkpoint merger re-serialises only `sd_merge_recipe` / `sd_merge_models` before `safetensors` saves the copied
metadata (which must be str): any other `{`-valued key makes the merge fail with a TypeError. So every other
JSON-object value a checkpoint of ours carries is written with one leading space (`a1111_safe`): still a valid
JSON text (RFC 8259 allows whitespace before the value; `json.loads` reads it unchanged), no longer sniffed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

from mergekit_sdxl import __version__
from mergekit_sdxl.arch.registry import SPECS
from mergekit_sdxl.errors import CheckpointError
from mergekit_sdxl.io import jsonio

MAX_LINEAGE_BYTES = 16 << 20
MAX_LINEAGE_DEPTH = 32


@dataclass(frozen=True)
class InputRecord:
    """One merge input as recorded in the output's metadata."""

    alias: str
    name: str  # file name (no directories: paths are private)
    sha256: str | None
    autov3: str | None
    legacy: str | None
    metadata: Mapping[str, str]


A1111_JSON_KEYS = frozenset({"sd_merge_recipe", "sd_merge_models"})  # the only keys A1111 re-serialises


def _dumps(value: object) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def json_value(value: object) -> str:
    """`value` as compact JSON text (sorted keys) that A1111's reader leaves a string (see the module docstring)."""
    return _unsniffable(_dumps(value))


def a1111_safe(metadata: Mapping[str, str]) -> dict[str, str]:
    """`metadata` with every JSON-object value outside A1111_JSON_KEYS given a leading space, so A1111's checkpoint
    merger can copy and re-save it. Values A1111 would not parse (not JSON) are left as they are."""
    return {key: value if key in A1111_JSON_KEYS or not _sniffed(value) else _unsniffable(value)
            for key, value in metadata.items()}


def _sniffed(value: str) -> bool:
    """A1111's `read_metadata_from_safetensors` test: starts with "{" and parses as JSON."""
    if value[:1] != "{":
        return False
    try:
        json.loads(value)
    except (ValueError, RecursionError):
        return False
    return True


def _unsniffable(text: str) -> str:
    return " " + text if text[:1] == "{" else text


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


def a1111_recipe(records: list[InputRecord], summary: str, output_name: str, dtype: str, *,
                 multiplier: float = 0.0, vae: str | None = None) -> dict[str, object]:
    """`sd_merge_recipe` in A1111's shape and types (type, primary/secondary/tertiary hashes, method, ...).

    `multiplier` is a number as A1111 writes it (the output step's scalar `alpha` where it has one, else 0.0:
    a recipe has no single multiplier); `bake_in_vae` is A1111's VAE choice, a file name or the string "None".
    """
    hashes = [r.sha256 for r in records]
    return {"type": "mergekit-sdxl", "primary_model_hash": hashes[0] if hashes else None,
            "secondary_model_hash": hashes[1] if len(hashes) > 1 else None,
            "tertiary_model_hash": hashes[2] if len(hashes) > 2 else None,
            "interp_method": summary, "multiplier": float(multiplier), "save_as_half": dtype == "F16",
            "custom_name": output_name, "config_source": 0, "bake_in_vae": vae or "None", "discard_weights": "",
            "is_inpainting": False, "is_instruct_pix2pix": False}


def recipe_multiplier(recipe: Mapping[str, object]) -> float:
    """The output step's scalar `alpha` in a resolved recipe (recipe/record.py), else 0.0."""
    steps = recipe.get("steps")
    step = steps.get(recipe.get("output_step")) if isinstance(steps, dict) else None
    params = step.get("params") if isinstance(step, dict) else None
    alpha = params.get("alpha") if isinstance(params, dict) else None
    return float(alpha) if isinstance(alpha, (int, float)) and not isinstance(alpha, bool) else 0.0


def merge_metadata(*, arch: str, recipe: Mapping[str, object], records: list[InputRecord], summary: str,
                   output_name: str, dtype: str, extra: Mapping[str, str] | None = None,
                   vae: str | None = None) -> dict[str, str]:
    """All metadata for a merged file (every value a string, as safetensors requires; A1111-safe, see above).

    `vae`: file name of the model the VAE was taken from, when it is not one of the merged inputs' own.
    """
    resolved = dict(recipe)
    resolved["inputs"] = {r.alias: input_entry(r) for r in records}
    a1111 = a1111_recipe(records, summary, output_name, dtype, multiplier=recipe_multiplier(recipe), vae=vae)
    spec = SPECS.get(arch)
    meta = {
        "format": "pt",
        "mergekit_sdxl.version": __version__,
        "mergekit_sdxl.recipe": json_value(resolved),
        "sd_merge_recipe": _dumps(a1111),
        "sd_merge_models": _dumps(a1111_models(records)),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": spec.modelspec.architecture if spec else arch,
        "modelspec.implementation": spec.modelspec.implementation if spec else "",
        "modelspec.title": output_name.rsplit(".", 1)[0],
    }
    meta.update(extra or {})
    return a1111_safe(meta)


def _json_or_none(text: str | None) -> object:
    if not text:
        return None
    try:  # size- and depth-limited: a hostile lineage entry must not raise RecursionError here or later
        return jsonio.loads(text, "metadata", max_bytes=MAX_LINEAGE_BYTES, max_depth=MAX_LINEAGE_DEPTH)
    except CheckpointError:
        return None
