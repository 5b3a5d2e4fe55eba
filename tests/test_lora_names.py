"""LoRA module tables: kohya's module counts per preset, names, diffusers paths, name normalisation."""

from __future__ import annotations

import pytest

from mergekit_sdxl.arch.lora_names import (
    count_by_component,
    lora_modules,
    name_index,
    normalize_name,
    select,
)

COUNTS = {
    ("sdxl", "attn"): {"unet": 722, "clip_l": 72, "clip_g": 192},
    ("sdxl", "attn+conv"): {"unet": 788, "clip_l": 72, "clip_g": 192},
    ("sdxl", "all"): {"unet": 794, "clip_l": 72, "clip_g": 192},
    ("sd15", "attn"): {"unet": 192, "clip_l": 72},
    ("sd15", "attn+conv"): {"unet": 278, "clip_l": 72},
    ("sd15", "all"): {"unet": 282, "clip_l": 72},
}


@pytest.mark.parametrize(("arch", "preset"), list(COUNTS))
def test_kohya_module_counts(arch, preset):
    assert count_by_component(select(lora_modules(arch), preset)) == COUNTS[arch, preset]


def test_names_follow_kohya():
    sdxl = {m.name: m for m in lora_modules("sdxl")}
    m = sdxl["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"]
    assert m.key == "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight"
    assert m.diffusers == "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q" in m.aliases
    k = sdxl["lora_te2_text_model_encoder_layers_31_self_attn_k_proj"]
    assert k.key.endswith("resblocks.31.attn.in_proj_weight") and k.part == 1 and k.shape == (1280, 1280)
    assert k.rows() == (1280, 2560)
    assert sdxl["lora_te2_text_model_encoder_layers_31_mlp_fc2"].key.endswith("resblocks.31.mlp.c_proj.weight")
    assert sdxl["lora_te2_text_projection"].transpose
    sd15 = {m.name: m for m in lora_modules("sd15")}
    p = sd15["lora_unet_down_blocks_0_attentions_0_proj_in"]
    assert p.key == "model.diffusion_model.input_blocks.1.1.proj_in.weight" and p.group == "attn"
    assert sd15["lora_unet_up_blocks_0_upsamplers_0_conv"].key == "model.diffusion_model.output_blocks.2.1.conv.weight"
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in sd15


def test_every_name_resolves_once():
    for arch in ("sdxl", "sd15"):
        modules = lora_modules(arch)
        index = name_index(modules)
        for m in modules:
            assert index[m.name] is m
            for alias in m.aliases:
                assert index[alias] is m


def test_peft_names_normalise():
    assert normalize_name("unet.down_blocks.1.attentions.0.proj_in", "sdxl") == \
        "lora_unet_down_blocks_1_attentions_0_proj_in"
    assert normalize_name("text_encoder_2.text_model.encoder.layers.0.mlp.fc1", "sdxl") == \
        "lora_te2_text_model_encoder_layers_0_mlp_fc1"
    assert normalize_name("text_encoder.text_model.encoder.layers.0.mlp.fc1", "sd15") == \
        "lora_te_text_model_encoder_layers_0_mlp_fc1"


def test_diffusers_paths_match_diffusers_models():
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    from mergekit_sdxl.arch.configs import load_config

    for arch in ("sdxl", "sd15"):
        with torch.device("meta"):
            unet = diffusers.UNet2DConditionModel.from_config(load_config(arch, "unet"))
        keys = {f"unet.{k}": tuple(v.shape) for k, v in unet.state_dict().items()}
        for m in lora_modules(arch):
            if m.component == "unet":
                assert keys[m.diffusers + ".weight"] == m.shape, m.name
