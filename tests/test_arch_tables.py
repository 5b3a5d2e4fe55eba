"""Key tables, architecture detection and the key-level helpers `inspect` uses."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from mergekit_sdxl.arch.detect import (
    FINGERPRINTS,
    canonical_key,
    component_of,
    detect_arch,
    markers,
    missing_mandatory,
    param_counts,
    unknown_keys,
)
from mergekit_sdxl.arch.tables import COMPONENTS, KeyInfo, key_table, mandatory_keys
from mergekit_sdxl.dtypes import is_float_dtype
from mergekit_sdxl.errors import ArchError

ROOT = Path(__file__).resolve().parents[1]

# Floating-point parameters of a full SDXL checkpoint, per component (the project's reference numbers).
SDXL_PARAMS = {"unet": 2_567_463_686, "clip_g": 694_659_841, "clip_l": 123_060_480, "vae": 83_653_863}


def _generator():
    spec = importlib.util.spec_from_file_location("gen_key_tables", ROOT / "scripts" / "gen_key_tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_package_data_is_what_the_generator_writes():
    generated = _generator().generate()  # from the source tables under tests/data/key_tables
    for arch, text in generated.items():
        packaged = ROOT / "mergekit_sdxl" / "arch" / "data" / f"{arch}.json"
        assert packaged.read_text(encoding="utf-8") == text, f"{packaged} is stale: run scripts/gen_key_tables.py"


def test_tables_load_with_normalised_components():
    sdxl, sd15 = key_table("sdxl"), key_table("sd15")
    assert len(sdxl) == 2531 and len(sd15) == 1831
    assert {i.component for i in sdxl.values()} == {"unet", "clip_l", "clip_g", "vae", "other"}
    assert {i.component for i in sd15.values()} == {"unet", "clip_l", "vae", "ema", "other"}
    info = sdxl["conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"]
    assert info == KeyInfo((3840, 1280), "float32", False, "clip_g")
    assert key_table("sdxl") is sdxl  # cached
    with pytest.raises(TypeError):
        sdxl["x"] = info  # read-only


def test_mandatory_key_counts_match_the_conventions_doc():
    unet = [k for k in mandatory_keys("sdxl") if k.startswith("model.diffusion_model.")]
    vae = [k for k in mandatory_keys("sdxl") if k.startswith("first_stage_model.")]
    assert len(unet) == 1680 and len(vae) == 248


def test_unknown_arch_is_refused():
    with pytest.raises(ArchError, match="sd21"):
        key_table("sd21")


@pytest.mark.parametrize("arch", ["sdxl", "sd15"])
def test_component_of_agrees_with_the_table(arch):
    mismatched = [k for k, i in key_table(arch).items() if component_of(k, arch) != i.component]
    assert mismatched == []


def test_component_of_keys_outside_the_table():
    assert component_of("model.diffusion_model.input_blocks.99.0.weight", "sdxl") == "unet"
    assert component_of("conditioner.embedders.1.model.foo", "sdxl") == "clip_g"
    assert component_of("conditioner.embedders.0.foo", "sdxl") == "clip_l"
    assert component_of("cond_stage_model.transformer.embeddings.token_embedding.weight", "sd15") == "clip_l"
    assert component_of("first_stage_model.foo", "sd15") == "vae"
    assert component_of("model_ema.decay", "sd15") == "ema"
    assert component_of("lora_unet_foo", "sdxl") == "other"
    assert component_of("v_pred", "sd15") == "unet"


def test_sdxl_parameter_counts_and_which_optional_keys_count():
    table = key_table("sdxl")
    counts = param_counts(table, "sdxl")
    assert {c: counts[c] for c in SDXL_PARAMS} == SDXL_PARAMS
    assert counts["other"] == 12 * 1000  # scheduler buffers
    mandatory = param_counts({k: i for k, i in table.items() if not i.optional}, "sdxl")
    # the reference UNet number includes the two float32 scalars edm_vpred.sigma_{min,max}
    assert mandatory["unet"] == SDXL_PARAMS["unet"] - 2
    edm = {k: table[k] for k in ("edm_vpred.sigma_max", "edm_vpred.sigma_min", "v_pred", "ztsnr")}
    assert param_counts(edm, "sdxl") == {"unet": 2}  # v_pred / ztsnr are int64 markers
    # CLIP-L: layer 11 and final_layer_norm count (7,089,408 params); int64 position_ids does not
    clip_l_optional = {k: i for k, i in table.items() if i.optional and i.component == "clip_l"}
    assert param_counts(clip_l_optional, "sdxl") == {"clip_l": 7_089_408}
    assert mandatory["clip_l"] + 7_089_408 == SDXL_PARAMS["clip_l"]
    # CLIP-G: every optional key counts: layer 31, ln_final, text_projection [1280,1280] and logit_scale (1)
    clip_g_optional = {k: i for k, i in table.items() if i.optional and i.component == "clip_g"}
    assert param_counts(clip_g_optional, "sdxl")["clip_g"] == SDXL_PARAMS["clip_g"] - mandatory["clip_g"]
    assert table["conditioner.embedders.1.model.logit_scale"].shape == ()
    assert sum(SDXL_PARAMS.values()) == 3_468_837_870  # "3.469 B params"


def test_sd15_parameter_counts():
    counts = param_counts(key_table("sd15"), "sd15")
    assert counts["unet"] == 859_520_964  # "859.5 M"
    assert counts["clip_l"] == 123_060_480 and counts["vae"] == 83_653_863
    assert counts["ema"] == 859_520_964 + 1  # + model_ema.decay; num_updates is int32


def test_param_counts_only_lists_present_components():
    infos = {"first_stage_model.x.weight": KeyInfo((2, 3), "F16", False, "vae"),
             "model.diffusion_model.x": KeyInfo((4,), "I64", False, "unet")}
    assert param_counts(infos, "sdxl") == {"unet": 0, "vae": 6}
    assert list(param_counts(key_table("sdxl"), "sdxl")) == [c for c in COMPONENTS if c not in ("ema",)]


@pytest.mark.parametrize("dtype, expected", [
    ("F16", True), ("BF16", True), ("F32", True), ("F64", True), ("F8_E4M3", True), ("F8_E5M2", True),
    ("float32", True), ("bfloat16", True), ("torch.float16", True),
    ("I64", False), ("int64", False), ("U8", False), ("BOOL", False), ("I32", False),
])
def test_is_float_dtype(dtype, expected):
    assert is_float_dtype(dtype) is expected


def _sdxl_keys() -> set[str]:
    return set(key_table("sdxl"))


def _sd15_keys() -> set[str]:
    return set(key_table("sd15"))


def _legacy_sd1(keys: set[str]) -> set[str]:
    return {k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer.") for k in keys}


def test_detect_full_checkpoints():
    assert detect_arch(_sdxl_keys()) == "sdxl"
    assert detect_arch(_sd15_keys()) == "sd15"
    assert detect_arch(iter(sorted(_sd15_keys()))) == "sd15"  # any iterable


def test_detect_pruned_sdxl_without_ln_final():
    keys = {k for k, i in key_table("sdxl").items() if not i.optional}
    assert "conditioner.embedders.1.model.ln_final.weight" not in keys
    assert detect_arch(keys) == "sdxl"
    unet_only = {k for k in keys if k.startswith("model.diffusion_model.")}
    assert detect_arch(unet_only) == "sdxl"  # label_emb
    unclip = unet_only | {"cond_stage_model.model.ln_final.weight"}  # SD2-unCLIP also has label_emb
    with pytest.raises(ArchError, match="SD 2.x"):
        detect_arch(unclip)


def test_detect_legacy_sd1_clip_layout():
    legacy = _legacy_sd1(_sd15_keys())
    assert "cond_stage_model.transformer.embeddings.token_embedding.weight" in legacy
    assert detect_arch(legacy) == "sd15"
    assert missing_mandatory(legacy, "sd15") == []
    assert unknown_keys(legacy, "sd15") == []
    assert canonical_key("cond_stage_model.transformer.encoder.layers.0.mlp.fc1.weight", "sd15") == (
        "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight")
    assert canonical_key("cond_stage_model.transformer.encoder.x", "sdxl") == "cond_stage_model.transformer.encoder.x"


def test_detect_unknown_names_the_source_and_the_fingerprints():
    with pytest.raises(ArchError) as exc:
        detect_arch(["model.diffusion_model.input_blocks.0.0.weight"], source="models/[v2].safetensors")
    message = str(exc.value)
    assert message.startswith("models/[v2].safetensors: unknown architecture")
    for prints in FINGERPRINTS.values():
        assert prints[0] in message


@pytest.mark.parametrize("key, hint", [
    ("lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight", "LoRA"),
    ("cond_stage_model.model.ln_final.weight", "SD 2.x"),
    ("down_blocks.0.resnets.0.conv1.weight", "diffusers"),
    ("conditioner.embedders.0.model.ln_final.weight", "SDXL refiner"),
])
def test_detect_hints(key, hint):
    with pytest.raises(ArchError, match=hint):
        detect_arch([key], source="x.safetensors")


def test_detect_empty_and_mixed():
    with pytest.raises(ArchError, match="no tensors"):
        detect_arch([], source="empty.safetensors")
    with pytest.raises(ArchError, match="both SDXL and SD1"):
        detect_arch(_sdxl_keys() | _sd15_keys(), source="mixed.safetensors")


def test_missing_and_unknown_keys():
    keys = _sdxl_keys()
    assert missing_mandatory(keys, "sdxl") == [] and unknown_keys(keys, "sdxl") == []
    keys.discard("model.diffusion_model.out.2.weight")
    keys.discard("v_pred")  # optional: never missing
    keys |= {"lora_te1_foo.alpha", "model.diffusion_model.extra.weight"}
    assert missing_mandatory(keys, "sdxl") == ["model.diffusion_model.out.2.weight"]
    assert unknown_keys(keys, "sdxl") == ["lora_te1_foo.alpha", "model.diffusion_model.extra.weight"]
    assert len(missing_mandatory(set(), "sd15")) == len(mandatory_keys("sd15"))


def test_markers():
    assert markers(_sdxl_keys()) == ["v_pred", "ztsnr", "edm_vpred.sigma_max", "edm_vpred.sigma_min"]
    assert markers(["ztsnr", "model.diffusion_model.out.0.weight"]) == ["ztsnr"]
    assert markers([]) == []
