"""Recipes from A1111's checkpoint merger (`sd_merge_recipe` with `"type": "webui"`).

What A1111 (v1.x `modules/extras.py`, `run_modelmerger`) records and does, re-derived from its public code:
- fields: `interp_method` ("Weighted sum", "Add difference", "No interpolation"), `multiplier` (number),
  `primary_model_hash` / `secondary_model_hash` / `tertiary_model_hash` (full sha256, or null when A1111 had not
  hashed the model yet), `save_as_half`, `custom_name`, `config_source`, `bake_in_vae` (a VAE file *name*,
  "None" when none), `discard_weights` (a regex), `is_inpainting`, `is_instruct_pix2pix`;
- arithmetic: on every key of A whose name contains "model" and that B also has (the SD1 `position_ids` key
  excepted): weighted sum `((1 - m) * A) + (m * B)`, add difference `A + (m * (B - C))` with B - C taken first
  (a key C lacks gets B - C = 0), each operation in the tensors' own dtype (fp16 inputs: fp16 arithmetic, one
  rounding per operation); fp32 results are halved when `save_as_half`; keys only B has are dropped;
- then the VAE bake (`first_stage_model.` + each key of the VAE file) and `discard_weights` (`re.search`).
"""

from __future__ import annotations

from typing import Any

from mergekit_sdxl.errors import CheckpointError
from mergekit_sdxl.provenance.published import (
    DTYPE_NAMES,
    Assumptions,
    Fields,
    InputRef,
    PublishedFile,
    Reconstruction,
    recorded_name,
    sd_merge_models,
)
from mergekit_sdxl.provenance.recipe_text import Flow, Noted

TYPE = "webui"
TOOL = "A1111's checkpoint merger"
METHODS = {"Weighted sum": "weighted_sum", "Add difference": "add_difference", "No interpolation": "copy"}
SKIP_KEY = "cond_stage_model.transformer.text_model.embeddings.position_ids"  # A1111 never merges it
_ROLES = (("model_a", "primary_model_hash", "model A (primary)"),
          ("model_b", "secondary_model_hash", "model B (secondary)"),
          ("model_c", "tertiary_model_hash", "model C (tertiary)"))


def reconstruct(recipe: Any, pub: PublishedFile, assume: Assumptions) -> Reconstruction:
    """The recipe that redoes the A1111 merge recorded in `recipe` (the parsed `sd_merge_recipe`)."""
    f = Fields(recipe, pub.where("sd_merge_recipe"))
    interp = f.get("interp_method", (str,))
    if interp not in METHODS:
        raise CheckpointError(f"{f.where}.interp_method: {interp!r} is not one of A1111's methods "
                              f"({', '.join(METHODS)})")
    for flag, what in (("is_inpainting", "an inpainting"), ("is_instruct_pix2pix", "an instruct-pix2pix")):
        if f.get(flag, (bool,), False):
            raise CheckpointError(f"{f.where}: {what} merge (A1111 merged B into A's first 4 input channels); "
                                  "recipes cannot express that yet")
    method = METHODS[interp]
    multiplier = f.number("multiplier") if method != "copy" else f.number("multiplier", 0.0)
    half = f.get("save_as_half", (bool,), False)
    custom = f.get("custom_name", (str,), "") or ""
    vae = f.get("bake_in_vae", (str, type(None)), None)
    discard = f.get("discard_weights", (str, type(None)), "") or ""
    lineage = sd_merge_models(pub)
    needed = {"copy": 1, "weighted_sum": 2, "add_difference": 3}[method]
    inputs = []
    for alias, key, role in _ROLES[:needed]:
        sha = f.sha256(key)
        name, legacy = recorded_name(lineage, sha)
        inputs.append(InputRef(alias, role, sha, None, name, legacy))
    models: dict[str, Any] = {ref.alias: _model(ref, key) for ref, (_, key, _) in zip(inputs, _ROLES)}
    header = [f"Reconstructed by `mergekit-sdxl recipe-from` from {pub.name}: sd_merge_recipe written by {TOOL} "
              f'(type "webui", method "{interp}").']
    output: dict[str, Any] = {"path": Noted(f"{pub.path.stem}-reproduced.safetensors",
                                            "a new name, so the reproduction never replaces the published file")}
    _dtypes(output, pub, half, [ref.sha256 for ref in inputs], assume)
    output["missing_keys"] = Noted("take_first", "A1111 keeps every key of A that B (or C) lacks")
    if vae and vae != "None":
        models["vae"] = Noted(None, f"A1111 baked in the VAE {vae!r} (sd_merge_recipe.bake_in_vae) and records only "
                                    "its file name: give it with -m vae=PATH")
        output["vae"] = "vae"
    if discard:
        output["drop"] = Noted([discard], "sd_merge_recipe.discard_weights (keys A1111 removed, re.search)")
    data: dict[str, Any] = {"version": 1, "name": custom or pub.path.stem}
    if pub.arch:
        data["arch"] = Noted(pub.arch, "from the published file's keys")
    data["models"] = models
    data["steps"] = {"merged": Noted(_step(method, multiplier, pub), _explain(interp, multiplier))}
    data["output"] = output
    return Reconstruction(TOOL, data, header, inputs)


def _model(ref: InputRef, key: str) -> Any:
    where = f"sd_merge_recipe.{key}"
    if ref.sha256 is None:
        return Noted(None, f"{ref.role}: A1111 recorded no hash ({where} is null: it had not hashed the model "
                           "yet); give the file with -m " + f"{ref.alias}=PATH")
    named = f' "{ref.name}"' if ref.name else ""
    legacy = f", legacy hash {ref.legacy}" if ref.legacy else ""
    return Noted(Flow({"sha256": ref.sha256}), f"{ref.role}{named}{legacy} ({where}; name from sd_merge_models)")


def _step(method: str, multiplier: float, pub: PublishedFile) -> dict[str, Any]:
    step: dict[str, Any] = {"method": method, "a": "model_a"}
    if method == "copy":
        return step
    step["b"] = "model_b"
    if method == "add_difference":
        step["c"] = "model_c"
    floats = [key for key, (dtype, _) in pub.keys.items() if dtype in DTYPE_NAMES]
    unmerged = [key for key in floats if "model" not in key or key == SKIP_KEY]
    if not unmerged:
        step["alpha"] = multiplier
        return step
    rules: list[dict[str, Any]] = [{"match": ".", "value": 0.0}, {"match": "model", "value": multiplier}]
    if SKIP_KEY in unmerged:
        rules.append({"match": "^" + SKIP_KEY.replace(".", r"\.") + "$", "value": 0.0})
    step["alpha"] = Noted({"value": multiplier, "overrides": rules},
                          f"A1111 merges only keys whose name contains \"model\" (here {len(unmerged)} float key(s) "
                          f"do not, e.g. {unmerged[0]}): alpha 0 keeps them from A exactly")
    return step


def _explain(interp: str, multiplier: float) -> str:
    formula = {"Weighted sum": f"(1 - {multiplier:g})·A + {multiplier:g}·B",
               "Add difference": f"A + {multiplier:g}·(B - C)",
               "No interpolation": "A unchanged"}[interp]
    return (f'A1111 "{interp}": {formula}, multiplier from sd_merge_recipe.multiplier; alpha is the weight of B, '
            "as in A1111")


def _dtypes(output: dict[str, Any], pub: PublishedFile, half: bool, shas: list[str | None],
            assume: Assumptions) -> None:
    """Output dtype from the file; compute dtype = the inputs' storage dtype, which is what A1111 computes in."""
    saved = pub.dominant_dtype() or "F16"
    output["dtype"] = Noted(DTYPE_NAMES.get(saved, "fp16"), f"the published file's dtype (save_as_half: {half})")
    known = [assume.input_dtype(sha) if sha else None for sha in shas]
    storage: str | None
    if saved in ("F16", "BF16") and not half:  # A1111's result has the inputs' promoted dtype: they were all `saved`
        storage, how = saved, f"the file is {DTYPE_NAMES[saved]} and was not halved, so its inputs were too"
    elif known and all(known) and len(set(known)) == 1:
        storage, how = known[0], "the inputs' dtype, from the model index"
    else:
        storage, how = None, ""
    if storage in ("F16", "BF16"):
        output["compute_dtype"] = Noted(DTYPE_NAMES[storage], f"A1111 computes in the inputs' storage dtype, one "
                                        f"rounding per operation ({how}): this reproduces it bit for bit")
    else:
        output["compute_dtype"] = Noted("fp32", "A1111 computed in the inputs' dtype (fp32, or mixed dtypes "
                                        "promoted to fp32); if the inputs are all fp16, compute_dtype: fp16 "
                                        "matches its rounding exactly")
