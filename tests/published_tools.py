"""Stand-ins for A1111's checkpoint merger and SuperMerger, for tests: each writes a merged file the way that tool
does (its arithmetic, key selection, metadata fields and types, lineage, and safetensors' own writer), so the
recipe readers and the reproduction can be tested on files like the ones people download.

Written independently of the code under test from the tools' public source:
- A1111 v1.x `modules/extras.py` `run_modelmerger` and `modules/sd_models.py` (`read_metadata_from_safetensors`
  turns metadata values starting with "{" into objects; `checkpoint_info.name` is the file name, `.hash` the legacy
  hash, `.sha256` the full digest);
- SuperMerger (hako-mikan/sd-webui-supermerger, Nov 2025) `scripts/mergers/mergers.py` `smerge`, `blockfromkey`,
  `weighttoxl` and the recipe dict it saves. The block mapping here is SuperMerger's own code path (substring
  tests and BLOCKID tables), not `mergekit_sdxl.arch.blocks`, so a wrong block rule there cannot hide.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

SKIP_ON_MERGE = ["cond_stage_model.transformer.text_model.embeddings.position_ids"]


def _hashes(path: Path) -> tuple[str, str]:
    data = path.read_bytes()
    return hashlib.sha256(data).hexdigest(), hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]


def a1111_metadata_of(path: Path) -> dict[str, Any]:
    """`read_metadata_from_safetensors`: values starting with "{" parsed as JSON (left as text when invalid)."""
    with safe_open(path, "pt") as f:
        raw = f.metadata() or {}
    out: dict[str, Any] = {}
    for key, value in raw.items():
        out[key] = value
        if isinstance(value, str) and value[:1] == "{":
            try:
                out[key] = json.loads(value)
            except ValueError:
                pass
    return out


def a1111_merge(out: Path, primary: Path, secondary: Path | None, tertiary: Path | None, interp_method: str,
                multiplier: float, save_as_half: bool = False, custom_name: str = "", discard_weights: str = "",
                bake_in_vae: str = "None", copy_metadata: bool = False) -> Path:
    """A1111's `run_modelmerger` with save_metadata and add_merge_recipe on; `copy_metadata` is the UI's "Copy
    metadata from merged models" (on by default there): the inputs' metadata *as A1111 read it* (values starting
    with "{" parsed) is copied into the output, then only sd_merge_recipe / sd_merge_models are re-serialised, and
    safetensors' `save_file` raises TypeError on any other parsed value."""

    def weighted_sum(theta0, theta1, alpha):
        return ((1 - alpha) * theta0) + (alpha * theta1)

    def add_difference(theta0, theta1_2_diff, alpha):
        return theta0 + (alpha * theta1_2_diff)

    funcs = {"Weighted sum": (None, weighted_sum), "Add difference": (lambda a, b: a - b, add_difference),
             "No interpolation": (None, None)}
    func1, func2 = funcs[interp_method]
    theta_1 = load_file(secondary) if func2 else None
    if func1:
        theta_2 = load_file(tertiary)
        for key in theta_1:
            if key in SKIP_ON_MERGE:
                continue
            if "model" in key:
                theta_1[key] = func1(theta_1[key], theta_2[key]) if key in theta_2 else torch.zeros_like(theta_1[key])
        del theta_2
    theta_0 = load_file(primary)
    for key in theta_0:
        if theta_1 and "model" in key and key in theta_1:
            if key in SKIP_ON_MERGE:
                continue
            theta_0[key] = func2(theta_0[key], theta_1[key], multiplier)
            if save_as_half and theta_0[key].dtype == torch.float:
                theta_0[key] = theta_0[key].half()
    if save_as_half and not func2:
        theta_0 = {k: v.half() if v.dtype == torch.float else v for k, v in theta_0.items()}
    if discard_weights:
        regex = re.compile(discard_weights)
        theta_0 = {k: v for k, v in theta_0.items() if not re.search(regex, k)}
    infos = [p for p in (primary, secondary if func2 else None, tertiary if func1 else None)]
    shas = [_hashes(p)[0] if p else None for p in infos]
    recipe = {"type": "webui", "primary_model_hash": shas[0], "secondary_model_hash": shas[1],
              "tertiary_model_hash": shas[2], "interp_method": interp_method, "multiplier": multiplier,
              "save_as_half": save_as_half, "custom_name": custom_name, "config_source": 0,
              "bake_in_vae": bake_in_vae, "discard_weights": discard_weights, "is_inpainting": False,
              "is_instruct_pix2pix": False}
    metadata: dict[str, Any] = {}
    if copy_metadata:
        for path in infos:
            if path is not None:
                metadata.update(a1111_metadata_of(path))
    models: dict[str, Any] = {}
    for path in infos:
        if path is None:
            continue
        sha, legacy = _hashes(path)
        meta = a1111_metadata_of(path)
        models[sha] = {"name": path.name, "legacy_hash": legacy, "sd_merge_recipe": meta.get("sd_merge_recipe")}
        models.update(meta.get("sd_merge_models", {}))
    metadata.update({"format": "pt", "sd_merge_recipe": json.dumps(recipe), "sd_merge_models": json.dumps(models)})
    save_file({k: v.contiguous() for k, v in theta_0.items()}, out, metadata=metadata)
    return out


# ----------------------------------------------------------------------------------------------- SuperMerger

BLOCKID = ["BASE", "IN00", "IN01", "IN02", "IN03", "IN04", "IN05", "IN06", "IN07", "IN08", "IN09", "IN10", "IN11",
           "M00", "OUT00", "OUT01", "OUT02", "OUT03", "OUT04", "OUT05", "OUT06", "OUT07", "OUT08", "OUT09", "OUT10",
           "OUT11"]
BLOCKIDXLL = ["BASE", "IN00", "IN01", "IN02", "IN03", "IN04", "IN05", "IN06", "IN07", "IN08", "M00", "OUT00", "OUT01",
              "OUT02", "OUT03", "OUT04", "OUT05", "OUT06", "OUT07", "OUT08", "VAE"]


def _sm_block(key: str, isxl: bool, before_rule_change: bool = False) -> str:
    """SuperMerger's `blockfromkey(key, isxl)[1]` (the 26/20-block id) as of Nov 2025 (with `before_rule_change`:
    as of 2023-07 to 2025-11-26, when SDXL `label_emb`/`time_embed` were "Not Merge")."""
    if not isxl:
        weight_index = -1
        if "time_embed" in key:
            weight_index = 0
        elif ".out." in key:
            weight_index = 24
        else:
            m = re.search(r"\.input_blocks\.(\d+)\.", key)
            if m:
                weight_index = int(m.group(1))
            elif re.search(r"\.middle_block\.(\d+)\.", key):
                weight_index = 12
            else:
                m = re.search(r"\.output_blocks\.(\d+)\.", key)
                if m:
                    weight_index = 13 + int(m.group(1))
        return BLOCKID[weight_index + 1]
    if not ("weight" in key or "bias" in key):
        return "Not Merge"
    if "label_emb" in key or "time_embed" in key:
        return "Not Merge" if before_rule_change else "IN00"
    if "conditioner.embedders.0." in key or "conditioner.embedders.1." in key or "first_stage_model" in key:
        return "BASE"
    if "model.diffusion_model" in key:
        if "model.diffusion_model.out." in key:
            return "OUT08"
        block = re.findall(r"input|mid|output", key)
        block = block[0].upper().replace("PUT", "") if block else ""
        nums = re.sub(r"\D", "", key)[:1 if "MID" in block else 2] + ("0" if "MID" in block else "")
        if len(nums) == 0:
            return "M00"
        return block + "0" + nums[0] if "MID" not in block else "M00"
    return "Not Merge"


def supermerger_merge(out: Path, model_a: Path, model_b: Path, model_c: Path | None, mode: str, weights_a: str,
                      base_alpha: float = 0.0, useblocks: bool = True, version: str = "2025-11") -> Path:
    """SuperMerger `smerge` with calcmode "normal", the default settings (lerp, no float32 option), no elemental
    merge, include/exclude "Off"; `weights_a` is the MBW text as typed (BASE first: 20 values for SDXL, 26 for
    SD1). `version` "2025-11" is the code of 2025-11-27 on; "2025-01" the code of 2025-01-20 to 2025-11-26 (add
    difference in fp32 on B - C kept in B's dtype, SDXL time_embed/label_emb not merged)."""
    old = version == "2025-01"
    weights_a_text = weights_a
    excluded = [float(w) for w in weights_a_text.split(",")] if useblocks else [None] * 110
    if useblocks:
        head, rest = weights_a_text.split(",", 1)
        base_alpha = float(head)
        weights = [float(w) for w in rest.split(",")]
    theta_1 = load_file(model_b)
    isxl = "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.weight" in theta_1
    if isxl and useblocks:
        if len(weights) == 25:
            weights = weights[:9] + weights[12:22] + [0]
        if len(weights) == 19:
            weights = weights + [0]
    if "Add" in mode:
        theta_2 = load_file(model_c)
        for key in theta_1:
            if "model" in key and ("weight" in key or "bias" in key):
                if key in theta_2:
                    theta_1[key] = (theta_1[key].to(torch.float32) - theta_2[key].to(torch.float32)).to(
                        theta_1[key].dtype)
                else:
                    theta_1[key] = torch.zeros_like(theta_1[key].to(torch.float16))
        del theta_2
    theta_0 = load_file(model_a)
    for key in list(theta_0):
        if not ("model" in key and key in theta_1) or not ("weight" in key or "bias" in key):
            continue
        blocks26 = _sm_block(key, isxl, old)
        if isxl and blocks26 in BLOCKIDXLL:
            weight_index = BLOCKIDXLL.index(blocks26)
        elif blocks26 in BLOCKID:
            weight_index = BLOCKID.index(blocks26)
        else:
            continue
        alpha = base_alpha
        if useblocks and weight_index > 0:
            alpha = weights[weight_index - 1]
        a = theta_0[key]
        if "Add" in mode and old:
            theta_0[key] = torch.lerp(a.to(torch.float32), a.to(torch.float32) + alpha * theta_1[key].to(torch.float32),
                                      1.0).to(a.dtype)
        elif "Add" in mode:
            theta_0[key] = torch.lerp(a, a + alpha * theta_1[key], 1.0)
        elif alpha == 1:
            theta_0[key] = theta_1[key]
        elif alpha != 0:
            theta_0[key] = torch.lerp(a.to(torch.float32), theta_1[key].to(torch.float32), alpha).to(a.dtype)
    for key in theta_1:
        if key not in SKIP_ON_MERGE and "model" in key and key not in theta_0:
            theta_0[key] = theta_1[key]
    shas = {p: _hashes(p) for p in (model_a, model_b, model_c or model_a)}
    recipe = {
        "type": "sd-webui-supermerger",
        "weights_alpha": weights if useblocks else None,
        "weights_beta": None,
        "weights_alpha_orig": ",".join(str(x) for x in excluded if x is not None) if useblocks else None,
        "weights_beta_orig": None,
        "model_a": shas[model_a][0], "model_b": shas[model_b][0], "model_c": shas[model_c or model_a][0],
        "base_alpha": base_alpha, "base_beta": 0.25, "mode": mode, "mbw": useblocks, "elemental_merge": "",
        "calcmode": "normal", "Off": [] + [""],
    }
    models = {shas[p][0]: {"name": p.stem, "legacy_hash": shas[p][1]} for p in (model_a, model_b, model_c or model_a)}
    metadata = {"format": "pt", "sd_merge_recipe": json.dumps(recipe), "sd_merge_models": json.dumps(models)}
    save_file({k: v.contiguous() for k, v in theta_0.items()}, out, metadata=metadata)
    return out
