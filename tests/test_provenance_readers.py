"""Recipe readers on metadata laid out exactly as A1111's checkpoint merger, SuperMerger and this tool write it:
fields, types, conventions, unsupported modes named in errors, and hostile metadata (huge, deep, wrong types)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from mergekit_sdxl.errors import CheckpointError
from mergekit_sdxl.provenance.jsontext import MAX_JSON_CHARS, MAX_JSON_DEPTH, load_metadata_json
from mergekit_sdxl.provenance.lineage import build_tree, render_tree
from mergekit_sdxl.provenance.published import Assumptions, read_published
from mergekit_sdxl.provenance.recipe_text import plain
from mergekit_sdxl.provenance.reconstruct import recipe_text, reconstruct

SHA = {k: c * 64 for k, c in zip("abc", "123")}
SDXL_KEYS = {"conditioner.embedders.1.model.ln_final.weight": torch.zeros(4, dtype=torch.float16),
             "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2, 2, dtype=torch.float16)}
SD1_KEYS = {"cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": torch.zeros(4, 2),
            "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2, 2),
            "alphas_cumprod": torch.ones(3)}


def _file(tmp_path: Path, metadata: dict[str, str], tensors: dict | None = None, name: str = "merged") -> Path:
    path = tmp_path / f"{name}.safetensors"
    save_file(tensors or SDXL_KEYS, path, metadata=metadata)
    return path


def _a1111_recipe(**changes) -> dict:
    recipe = {"type": "webui", "primary_model_hash": SHA["a"], "secondary_model_hash": SHA["b"],
              "tertiary_model_hash": None, "interp_method": "Weighted sum", "multiplier": 0.3, "save_as_half": False,
              "custom_name": "mix", "config_source": 0, "bake_in_vae": "None", "discard_weights": "",
              "is_inpainting": False, "is_instruct_pix2pix": False}
    recipe.update(changes)
    return recipe


def _models() -> dict:
    return {SHA["a"]: {"name": "anime/a.safetensors", "legacy_hash": "0badcafe", "sd_merge_recipe": None},
            SHA["b"]: {"name": "b.safetensors", "legacy_hash": "12345678", "sd_merge_recipe": None}}


def _read(path: Path, **assume) -> tuple[dict, str]:
    rebuilt = reconstruct(read_published(path), Assumptions(**assume))
    text = recipe_text(rebuilt, "mergekit-sdxl merge r.yaml")
    assert yaml.safe_load(text) == plain(rebuilt.data)
    return plain(rebuilt.data), text


def test_a1111_weighted_sum(tmp_path):
    path = _file(tmp_path, {"format": "pt", "sd_merge_recipe": json.dumps(_a1111_recipe()),
                            "sd_merge_models": json.dumps(_models())})
    data, text = _read(path)
    assert data["models"] == {"model_a": {"sha256": SHA["a"]}, "model_b": {"sha256": SHA["b"]}}
    assert data["steps"] == {"merged": {"method": "weighted_sum", "a": "model_a", "b": "model_b", "alpha": 0.3}}
    out = data["output"]
    assert out["dtype"] == "fp16" and out["compute_dtype"] == "fp16" and out["missing_keys"] == "take_first"
    assert data["name"] == "mix" and data["arch"] == "sdxl"
    assert '"anime/a.safetensors", legacy hash 0badcafe' in text and "sd_merge_recipe.multiplier" in text


def test_a1111_add_difference_sd1_keeps_unmerged_keys_from_a(tmp_path):
    recipe = _a1111_recipe(interp_method="Add difference", tertiary_model_hash=SHA["c"], multiplier=1,
                           save_as_half=True, discard_weights="^model_ema\\.", bake_in_vae="kl-f8.safetensors")
    path = _file(tmp_path, {"sd_merge_recipe": json.dumps(recipe)}, SD1_KEYS)
    data, text = _read(path)
    step = data["steps"]["merged"]
    assert (step["method"], step["c"]) == ("add_difference", "model_c")
    assert step["alpha"] == {"value": 1.0, "overrides": [{"match": ".", "value": 0.0},
                                                          {"match": "model", "value": 1.0}]}
    assert data["output"]["drop"] == ["^model_ema\\."] and data["output"]["vae"] == "vae"
    assert data["models"]["vae"] is None and "kl-f8.safetensors" in text
    # fp32 file saved with save_as_half off? here save_as_half on and no index: arithmetic dtype unknown -> fp32
    assert data["output"]["dtype"] == "fp32" and data["output"]["compute_dtype"] == "fp32"


def test_a1111_compute_dtype_follows_the_indexed_inputs(tmp_path):
    path = _file(tmp_path, {"sd_merge_recipe": json.dumps(_a1111_recipe(save_as_half=True))})
    data, _ = _read(path, input_dtype=lambda sha: "F16")
    assert data["output"]["compute_dtype"] == "fp16"
    data, _ = _read(path, input_dtype=lambda sha: "F32" if sha == SHA["a"] else "F16")
    assert data["output"]["compute_dtype"] == "fp32"


def test_a1111_null_hash_asks_for_the_path(tmp_path):
    path = _file(tmp_path, {"sd_merge_recipe": json.dumps(_a1111_recipe(primary_model_hash=None))})
    data, text = _read(path)
    assert data["models"]["model_a"] is None and "-m model_a=PATH" in text


@pytest.mark.parametrize(("change", "message"), [
    ({"interp_method": "Smooth"}, "interp_method: 'Smooth' is not one of"),
    ({"multiplier": "0.3"}, "multiplier: expected a number, got a string"),
    ({"multiplier": True}, "multiplier: expected a number, got true"),
    ({"multiplier": float("nan")}, "not a finite number"),
    ({"primary_model_hash": "xyz"}, "primary_model_hash: 'xyz' is not a sha256"),
    ({"primary_model_hash": ["a"]}, "primary_model_hash: expected a string or null, got a list"),
    ({"is_inpainting": True}, "inpainting merge"),
    ({"save_as_half": "yes"}, "save_as_half: expected true/false"),
])
def test_a1111_wrong_types_are_named(tmp_path, change, message):
    path = _file(tmp_path, {"sd_merge_recipe": json.dumps(_a1111_recipe(**change))})
    with pytest.raises(CheckpointError) as info:
        reconstruct(read_published(path))
    assert message in str(info.value) and "merged.safetensors: metadata sd_merge_recipe" in str(info.value)


def _sm_recipe(**changes) -> dict:
    recipe = {"type": "sd-webui-supermerger", "weights_alpha": [0.1 * i for i in range(19)] + [0],
              "weights_beta": None, "weights_alpha_orig": "0.5," + ",".join(str(0.1 * i) for i in range(19)),
              "weights_beta_orig": None, "model_a": SHA["a"], "model_b": SHA["b"], "model_c": SHA["a"],
              "base_alpha": 0.5, "base_beta": 0.25, "mode": "Weight sum", "mbw": True, "elemental_merge": "",
              "calcmode": "normal", "Off": [""]}
    recipe.update(changes)
    return recipe


def test_supermerger_weight_sum_mbw_sdxl(tmp_path):
    path = _file(tmp_path, {"sd_merge_recipe": json.dumps(_sm_recipe())})
    data, text = _read(path)
    step = data["steps"]["merged"]
    assert step == {"method": "weighted_sum", "a": "model_a", "b": "model_b",
                    "alpha": [0.5] + [0.1 * i for i in range(19)]}
    assert data["convention"] == "supermerger" and data["output"]["compute_dtype"] == "fp32"
    assert "model_c" not in data["models"] and "does not record when it merged" in text


@pytest.mark.parametrize(("date", "convention", "method", "compute"), [
    ("2023-08-01", "supermerger-2023", "add_difference", "fp16"),  # everything in the inputs' dtype
    ("2024-01-15", "supermerger-2023", "add_difference", "fp16"),
    ("2025-06-01", "supermerger-2023", "add_rounded_difference", "fp32"),  # B - C in fp16, the rest in fp32
    ("2025-12-01", "supermerger", "add_difference", "fp16"),
])
def test_supermerger_date_picks_block_rule_and_arithmetic(tmp_path, date, convention, method, compute):
    path = _file(tmp_path, {"sd_merge_recipe": json.dumps(_sm_recipe(mode="Add difference", model_c=SHA["c"])),
                            "modelspec.date": f"{date}T10:00:00"})
    data, text = _read(path)
    assert data["convention"] == convention and f"merged {date} (modelspec.date)" in text
    assert data["steps"]["merged"]["method"] == method and data["output"]["compute_dtype"] == compute
    data, _ = _read(path, date="2025-12-01")  # --date wins over the metadata
    assert data["convention"] == "supermerger" and data["steps"]["merged"]["method"] == "add_difference"


def test_supermerger_weight_sum_before_lerp_is_fp16_arithmetic(tmp_path):
    path = _file(tmp_path, {"sd_merge_recipe": json.dumps(_sm_recipe())})
    assert _read(path, date="2023-09-01")[0]["output"]["compute_dtype"] == "fp16"
    assert _read(path, date="2023-11-10")[0]["output"]["compute_dtype"] == "fp32"


def test_supermerger_without_mbw_and_sd1_vectors(tmp_path):
    path = _file(tmp_path, {"sd_merge_recipe": json.dumps(_sm_recipe(mbw=False, weights_alpha=None,
                                                                     base_alpha="0.4"))})
    data, _ = _read(path)
    assert data["steps"]["merged"]["alpha"] == {"default": 0.4}
    sd1 = _file(tmp_path, {"sd_merge_recipe": json.dumps(_sm_recipe(weights_alpha=[0.5] * 25, mode="sum Twice",
                                                                     weights_beta=[1] * 25, base_beta=0))},
                SD1_KEYS, "sd1")
    data, _ = _read(sd1)
    step = data["steps"]["merged"]
    assert step["method"] == "sum_twice" and step["alpha"] == [0.5] * 26 and step["beta"] == [0.0] + [1.0] * 25


@pytest.mark.parametrize(("change", "message"), [
    ({"calcmode": "cosineA"}, "calcmode: SuperMerger's 'cosineA' has no formula here"),
    ({"calcmode": "magic"}, "'magic' (unknown to this version)"),
    ({"elemental_merge": ["IN05:attn2:0.5"]}, "elemental merge"),
    ({"Exclude": ["IN05"]}, "include/exclude"),
    ({"weights_alpha": [0.1] * 109}, "extended per-layer XL"),
    ({"weights_alpha": [0.1] * 7}, "7 block weights for SDXL; expected 19 or 20"),
    ({"weights_alpha": [0.1] * 19 + ["x"]}, "weights_alpha[19]: 'x' is not a number"),
    ({"weights_alpha": "0,0.1"}, "weights_alpha: expected a list"),
    ({"model_b": 5}, "model_b: expected a string or null, got a number"),
    ({"mode": None}, "mode: expected a string, got null"),
])
def test_supermerger_unsupported_and_wrong_types(tmp_path, change, message):
    path = _file(tmp_path, {"sd_merge_recipe": json.dumps(_sm_recipe(**change))})
    with pytest.raises(CheckpointError) as info:
        reconstruct(read_published(path))
    assert message in str(info.value)


def test_supermerger_train_difference(tmp_path):
    path = _file(tmp_path, {"sd_merge_recipe": json.dumps(_sm_recipe(calcmode="trainDifference", mode="Add",
                                                                     model_c=SHA["c"]))})
    data, _ = _read(path)
    assert data["steps"]["merged"]["method"] == "train_difference" and data["models"]["model_c"]


@pytest.mark.parametrize(("metadata", "message"), [
    ({}, "carries no merge recipe"),
    ({"sd_merge_recipe": "[1, 2]"}, "expected a JSON object, got a list"),
    ({"sd_merge_recipe": json.dumps({"type": "meh"})}, "unknown tool (type 'meh')"),
    ({"sd_merge_recipe": "{not json"}, "not valid JSON"),
    ({"sd_merge_recipe": "[" * 100 + "]" * 100}, f"nested deeper than {MAX_JSON_DEPTH}"),
    ({"sd_merge_recipe": json.dumps({"type": "webui", "x": "a" * (MAX_JSON_CHARS + 1)})}, "the limit is"),
    ({"sd_merge_recipe": "[" + "0," * 300_000 + "0]"}, "more than 200,000 JSON values"),
])
def test_hostile_or_missing_recipes(tmp_path, metadata, message):
    path = _file(tmp_path, metadata)
    with pytest.raises(CheckpointError) as info:
        reconstruct(read_published(path))
    assert message in str(info.value) and "merged.safetensors" in str(info.value)


def test_hostile_lineage_is_bounded(tmp_path):
    # a cycle through sd_merge_models, a wrong-typed entry, and a deep chain
    models = {SHA["a"]: {"name": "a", "sd_merge_recipe": {"type": "webui", "interp_method": "Weighted sum",
                                                          "primary_model_hash": SHA["b"], "multiplier": 1}},
              SHA["b"]: {"name": "b", "sd_merge_recipe": json.dumps({"type": "webui", "interp_method": "Weighted sum",
                                                                     "primary_model_hash": SHA["a"],
                                                                     "secondary_model_hash": 7})},
              SHA["c"]: "not an object"}
    chain = {f"{i:064x}": {"name": f"m{i}", "sd_merge_recipe": {"type": "webui", "interp_method": "No interpolation",
                                                                  "primary_model_hash": f"{i + 1:064x}"}}
             for i in range(100)}
    models.update(chain)
    recipe = _a1111_recipe(secondary_model_hash=f"{0:064x}")
    path = _file(tmp_path, {"sd_merge_recipe": json.dumps(recipe), "sd_merge_models": json.dumps(models)})
    lines = render_tree(build_tree(read_published(path), lambda sha: None))
    text = "\n".join(lines)
    assert "cycle: already an ancestor" in text and "lineage cut here" in text and len(lines) < 60


def test_metadata_json_limits_cost_bounded_time_and_memory():
    # VmHWM: this process's own peak (ru_maxrss would include the forked pytest parent's)
    code = ("from mergekit_sdxl.provenance.jsontext import load_metadata_json\n"
            "from mergekit_sdxl.errors import CheckpointError\n"
            "texts = ['\"' + '\\\\\"' * 2_000_000, '[' * 1_000_000, '{\"a\":' * 500_000,\n"
            "         '[' + '{},' * 1_300_000 + '{}]']\n"
            "for t in texts:\n"
            "    try:\n        load_metadata_json(t, 'f: k')\n    except CheckpointError:\n        pass\n"
            "print(next(line.split()[1] for line in open('/proc/self/status') if line.startswith('VmHWM')))\n")
    rss_kb = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert rss_kb < 70_000  # 27 MB measured; parsing the 1.3 M objects unchecked takes 110 MB


def test_load_metadata_json_accepts_real_values():
    assert load_metadata_json('{"a": "x\\"]]", "b": [1, {"c": null}]}', "f") == {"a": 'x"]]', "b": [1, {"c": None}]}
    with pytest.raises(CheckpointError, match="never closed"):
        load_metadata_json('{"a": "open', "f: k")



def test_lineage_tree_follows_nested_recipes(tmp_path):
    """A1111 stores ancestors' recipes parsed (objects), SuperMerger's inputs carry none; the tree follows both."""
    gen1 = {"type": "sd-webui-supermerger", "mode": "Add difference", "calcmode": "normal", "base_alpha": 0.5,
            "mbw": True, "model_a": SHA["b"], "model_b": SHA["c"], "model_c": SHA["b"]}
    models = {SHA["a"]: {"name": "base.safetensors", "legacy_hash": "0badcafe", "sd_merge_recipe": None},
              "d" * 64: {"name": "sm-mix.safetensors", "legacy_hash": "11111111", "sd_merge_recipe": gen1},
              SHA["b"]: {"name": "b.safetensors", "legacy_hash": "22222222"},
              SHA["c"]: {"name": "c.safetensors", "legacy_hash": "33333333"}}
    recipe = _a1111_recipe(secondary_model_hash="d" * 64)
    path = _file(tmp_path, {"sd_merge_recipe": json.dumps(recipe), "sd_merge_models": json.dumps(models)})
    present = {SHA["a"]: "/m/base.safetensors", SHA["c"]: "/m/c.safetensors"}
    lines = render_tree(build_tree(read_published(path), present.get))
    assert lines == [
        "merged.safetensors  <- A1111 Weighted sum 0.3",
        f"├── A: {SHA['a'][:10]} base.safetensors  [present: /m/base.safetensors]",
        f"└── B: {'d' * 10} sm-mix.safetensors  [absent]  <- SuperMerger Add difference (normal) alpha 0.5 MBW",
        f"    ├── A: {SHA['b'][:10]} b.safetensors  [absent]",
        f"    ├── B: {SHA['c'][:10]} c.safetensors  [present: /m/c.safetensors]",
        f"    └── C: {SHA['b'][:10]} b.safetensors  [absent]",
    ]
