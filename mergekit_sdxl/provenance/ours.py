"""Recipes from files this tool wrote (`mergekit_sdxl.recipe`: the resolved recipe plus every input's hashes).

The rebuilt recipe resolves to the same recorded recipe, so merging it with the same input files gives a
byte-identical file: models pinned by sha256 stay pinned (`{sha256: ...}`), the others are found by their full
AutoV3 (`{autov3: ...}`, a locator that is not recorded); steps, parameters (MBW vectors as named blocks, regex
overrides), conventions and output options are written out in full; metadata the recipe added is restored.
"""

from __future__ import annotations

import re
from typing import Any

from mergekit_sdxl import __version__
from mergekit_sdxl.arch.blocks import block_names
from mergekit_sdxl.errors import CheckpointError, MergekitError
from mergekit_sdxl.io.metadata import merge_metadata
from mergekit_sdxl.methods.registry import METHODS
from mergekit_sdxl.provenance.jsontext import load_metadata_json
from mergekit_sdxl.provenance.published import Fields, InputRef, PublishedFile, Reconstruction
from mergekit_sdxl.provenance.recipe_text import Flow, Noted

KEY = "mergekit_sdxl.recipe"
_STEP_LINE = re.compile(r"(?:^|; )step ([A-Za-z_][A-Za-z0-9_]*)(?: \(written\))?: ")
TOOL = "mergekit-sdxl"
DERIVED = frozenset({KEY, "sd_merge_recipe", "sd_merge_models", "mergekit_sdxl.version"})
_OUTPUT_FIELDS = ("dtype", "fp8_scaled", "vae", "prune_ema", "drop", "missing_keys", "compute_dtype", "seed")


def reconstruct(recorded: Any, pub: PublishedFile) -> Reconstruction:
    """The recipe that merges to the same file as the one recorded in `recorded` (parsed `mergekit_sdxl.recipe`)."""
    f = Fields(recorded, pub.where(KEY))
    if f.get("version", (int,), 1) != 1:
        raise CheckpointError(f"{f.where}.version: {recorded.get('version')!r}; this tool reads version 1")
    models = Fields(f.get("models", (dict,)), f"{f.where}.models")
    inputs_raw = Fields(f.get("inputs", (dict,), {}), f"{f.where}.inputs")
    data: dict[str, Any] = {"version": 1}
    name = f.get("name", (str, type(None)), None)
    if name is not None:
        data["name"] = name
    data["arch"] = f.get("arch", (str,))
    data["convention"] = f.get("convention", (str,))
    inputs: list[InputRef] = []
    data["models"] = {}
    for alias in models.data:
        entry, ref = _model(alias, Fields(models.get(alias, (dict,)), f"{models.where}.{alias}"),
                            inputs_raw.get(alias, (dict, type(None)), None), f"{inputs_raw.where}.{alias}")
        data["models"][alias] = entry
        inputs.append(ref)
    steps = Fields(f.get("steps", (dict,)), f"{f.where}.steps")
    data["steps"] = {name: _step(name, steps, data["arch"], data["convention"]) for name in steps.data}
    output_step = f.get("output_step", (str,))
    if output_step not in data["steps"]:
        raise CheckpointError(f"{f.where}.output_step: {output_step!r} is not one of the recorded steps")
    data["steps"] = _in_recorded_order(data["steps"], output_step, pub)
    data["output"] = _output(Fields(f.get("output", (dict,)), f"{f.where}.output"), pub, data["arch"])
    made_with = pub.metadata.get("mergekit_sdxl.version", "?")
    header = [f"Reconstructed by `mergekit-sdxl recipe-from` from {pub.name}: the recipe mergekit-sdxl {made_with} "
              f"recorded ({KEY}). Merged with the same input files it gives the same bytes."]
    warnings = [] if made_with == __version__ else [
        f"{pub.name} was made with mergekit-sdxl {made_with}, this is {__version__}: the tensors should match, the "
        "recorded version (and so the file's bytes) will differ"]
    return Reconstruction(TOOL, data, header, inputs, warnings)


def _in_recorded_order(steps: dict[str, Any], output_step: str, pub: PublishedFile) -> dict[str, Any]:
    """Steps in the order the original recipe listed them (its step lines in `sd_merge_recipe.interp_method`; the
    recorded recipe itself has sorted keys): that order decides the output step (the last one) and the order of
    the step lines this merge records. Without those lines, sorted by name with the output step last."""
    recorded: list[str] = []
    try:
        summary = load_metadata_json(pub.metadata.get("sd_merge_recipe", "{}"), pub.where("sd_merge_recipe"))
    except MergekitError:
        summary = None
    if isinstance(summary, dict) and isinstance(summary.get("interp_method"), str):
        recorded = _STEP_LINE.findall(summary["interp_method"])
    names = [n for n in recorded if n in steps] + sorted(n for n in steps if n not in recorded)
    if output_step != "output":
        names = [n for n in names if n != output_step] + [output_step]
    return {name: steps[name] for name in dict.fromkeys(names)}


def _model(alias: str, model: Fields, recorded: Any, where: str) -> tuple[Any, InputRef]:
    pinned = model.sha256("sha256")
    hashes = Fields(recorded, where) if recorded is not None else None
    sha = hashes.sha256("sha256") if hashes else None
    autov3 = hashes.sha256("autov3_full") if hashes else None
    file = model.get("file", (str, type(None)), None)
    legacy = hashes.get("legacy_hash", (str, type(None)), None) if hashes else None
    ref = InputRef(alias, f"model {alias}", pinned or sha, autov3, file, legacy)
    named = f' "{file}"' if file else ""
    if pinned:
        return Noted(Flow({"sha256": pinned}), f"{alias}{named}: pinned by sha256 in the recorded recipe"), ref
    if autov3:
        return Noted(Flow({"autov3": autov3}), f"{alias}{named}, sha256 {sha or '?'}: found by its full AutoV3 "
                                                "(the recorded recipe pinned no hash)"), ref
    return Noted(None, f"{alias}{named}: no hash was recorded (merged with --no-input-hashes?); give the file with "
                       f"-m {alias}=PATH"), ref


def _step(name: str, steps: Fields, arch: str, convention: str) -> Any:
    where = f"{steps.where}.{name}"
    step = Fields(steps.get(name, (dict,)), where)
    if "formula" in step.data:
        return step.get("formula", (str,))
    if "lora" in step.data:
        out: dict[str, Any] = {"model": step.get("model", (str,))}
        adapters = []
        for i, item in enumerate(step.get("lora", (list,))):
            a = Fields(item, f"{where}.lora[{i}]")
            adapter: dict[str, Any] = {"path": a.get("file", (str,)), "strength": a.number("strength", 1.0)}
            te = a.get("te_strength", (int, float, type(None)), None)
            if te is not None:
                adapter["te_strength"] = float(te)
            blocks = a.get("blocks", (list, str, dict, type(None)), None)
            if blocks is not None:
                adapter["blocks"] = blocks
            adapters.append(adapter)
        out["lora"] = Noted(adapters, "adapters are recorded by file name only: put them next to this recipe")
        _convention(out, step, convention)
        return out
    method = step.get("method", (str,))
    if method not in METHODS:
        raise CheckpointError(f"{where}.method: {method!r} is not a method this version knows "
                              f"({', '.join(sorted(METHODS))})")
    spec = METHODS[method]
    inputs = step.get("inputs", (list,))
    if len(inputs) < len(spec.inputs) or (len(inputs) > len(spec.inputs) and not spec.variadic):
        raise CheckpointError(f"{where}.inputs: {len(inputs)} inputs for {method} ({spec.arity()})")
    out = {"method": method, **dict(zip(spec.inputs, inputs))}
    if spec.variadic:
        out["models"] = list(inputs[len(spec.inputs):])
    own = _convention(out, step, convention)
    params = Fields(step.get("params", (dict,), {}), f"{where}.params")
    for param in params.data:
        out[param] = _param(params.get(param, (int, float, bool, str, dict)), arch, own)
    return out


def _convention(out: dict[str, Any], step: Fields, convention: str) -> str:
    own = step.get("convention", (str,), convention)
    if own != convention:
        out["convention"] = own
    return str(own)


def _param(value: Any, arch: str, convention: str) -> Any:
    """A recorded parameter: a constant, {"blocks": {BLOCK: w}} (written as the vector in block order when it
    covers exactly the blocks of the architecture), or {"value": ..., "overrides": [...]}."""
    if isinstance(value, dict) and "overrides" in value:
        return {"value": _param(value.get("value"), arch, convention), "overrides": value["overrides"]}
    if isinstance(value, dict) and "blocks" in value:
        blocks = dict(value["blocks"])
        try:
            order = list(block_names(arch, convention))
        except MergekitError:
            order = []
        return Noted(list(blocks.values()), ", ".join(_spans(order))) if list(blocks) == order else Flow(blocks)
    return value


def _spans(order: list[str]) -> list[str]:
    """`BASE, IN00..IN08, M00, OUT00..OUT08` for a block list."""
    out: list[str] = []
    for name in order:
        prefix = name.rstrip("0123456789")
        if out and out[-1].split("..")[0].rstrip("0123456789") == prefix and prefix in ("IN", "OUT"):
            out[-1] = f"{out[-1].split('..')[0]}..{name}"
        else:
            out.append(name)
    return out


def _output(out: Fields, pub: PublishedFile, arch: str) -> dict[str, Any]:
    result: dict[str, Any] = {"path": Noted(pub.name, "the recorded name (the title and sd_merge_recipe record it): "
                                                      "write it into another folder with -o")}
    for field_name in _OUTPUT_FIELDS:
        if field_name in out.data:
            result[field_name] = out.data[field_name]
    if result.get("vae") is None:
        result.pop("vae", None)
    extra = _extra_metadata(pub, arch, str(result.get("dtype", "fp16")))
    if extra:
        result["metadata"] = Noted(extra, "metadata the recipe added (output.metadata)")
    return result


def _extra_metadata(pub: PublishedFile, arch: str, dtype: str) -> dict[str, str]:
    """Metadata the recorded recipe added or overrode: whatever a merge with no `output.metadata` would not write."""
    standard = merge_metadata(arch=arch, recipe={}, records=[], summary="", output_name=pub.name, dtype=dtype)
    return {key: value for key, value in pub.metadata.items()
            if key not in DERIVED and (key not in standard or standard[key] != value)}
