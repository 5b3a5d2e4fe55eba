"""arch/keymap.py and arch/configs.py: rule coverage of the real key tables, reverse == inverse, shipped configs."""

from __future__ import annotations

import pytest

from mergekit_sdxl.arch.configs import load_config
from mergekit_sdxl.arch.keymap import (
    TABLE_COMPONENTS,
    KeyMapping,
    Layout,
    build_keymap,
    build_reverse_keymap,
    default_layout,
    map_diffusers_key,
    map_ldm_key,
)
from mergekit_sdxl.arch.tables import key_table
from mergekit_sdxl.errors import ArchError

ARCHS = ("sdxl", "sd15")
MARKERS = {"v_pred", "ztsnr", "edm_vpred.sigma_max", "edm_vpred.sigma_min"}


def expected_unmapped(arch: str) -> set[str]:
    table = key_table(arch)
    out = {k for k, i in table.items() if i.component in ("other", "ema")} | (MARKERS & set(table))
    out |= {k for k in table if k.endswith(".position_ids") or k.endswith(".logit_scale")}
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_every_table_key_is_mapped_or_known_unmapped(arch):
    table = key_table(arch)
    km = build_keymap(arch, table)
    assert set(km.unmapped_keys) == expected_unmapped(arch)
    for m in km.mappings:
        assert TABLE_COMPONENTS[m.component] == table[m.ldm].component, m
    counts = {c: len(km.for_component(c)) for c in km.components()}
    if arch == "sdxl":
        assert counts == {"unet": 1680, "vae": 248, "text_encoder": 196, "text_encoder_2": 517}
    else:
        assert counts == {"unet": 686, "vae": 248, "text_encoder": 196}


@pytest.mark.parametrize("style", ["flat", "text_model"])
@pytest.mark.parametrize("arch", ARCHS)
def test_reverse_rules_invert_forward_rules(arch, style):
    km = build_keymap(arch, key_table(arch), clip_l_style=style)
    for m in km.mappings:
        assert map_diffusers_key(arch, m.component, m.diffusers) == m
    rev = build_reverse_keymap(arch, {c: km.diffusers_keys(c) for c in km.components()})
    assert sorted(rev.mappings, key=str) == sorted(km.mappings, key=str)
    assert rev.unmapped_keys == ()


def test_sdxl_examples():
    sgm = {
        "model.diffusion_model.input_blocks.0.0.weight": ("unet", "conv_in.weight", "copy"),
        "model.diffusion_model.label_emb.0.2.bias": ("unet", "add_embedding.linear_2.bias", "copy"),
        "model.diffusion_model.input_blocks.3.0.op.weight":
            ("unet", "down_blocks.0.downsamplers.0.conv.weight", "copy"),
        "model.diffusion_model.input_blocks.8.1.transformer_blocks.9.attn2.to_k.weight":
            ("unet", "down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_k.weight", "copy"),
        "model.diffusion_model.middle_block.2.in_layers.2.weight": ("unet", "mid_block.resnets.1.conv1.weight", "copy"),
        "model.diffusion_model.output_blocks.2.2.conv.bias": ("unet", "up_blocks.0.upsamplers.0.conv.bias", "copy"),
        "model.diffusion_model.output_blocks.5.2.conv.weight": ("unet", "up_blocks.1.upsamplers.0.conv.weight", "copy"),
        "model.diffusion_model.output_blocks.6.0.skip_connection.weight":
            ("unet", "up_blocks.2.resnets.0.conv_shortcut.weight", "copy"),
        "model.diffusion_model.out.2.weight": ("unet", "conv_out.weight", "copy"),
        "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight":
            ("vae", "decoder.up_blocks.3.resnets.0.conv_shortcut.weight", "copy"),
        "first_stage_model.decoder.up.3.upsample.conv.weight":
            ("vae", "decoder.up_blocks.0.upsamplers.0.conv.weight", "copy"),
        "first_stage_model.encoder.mid.attn_1.proj_out.weight":
            ("vae", "encoder.mid_block.attentions.0.to_out.0.weight", "conv1x1_to_linear"),
        "first_stage_model.encoder.mid.attn_1.q.bias": ("vae", "encoder.mid_block.attentions.0.to_q.bias", "copy"),
        "first_stage_model.encoder.norm_out.weight": ("vae", "encoder.conv_norm_out.weight", "copy"),
        "conditioner.embedders.0.transformer.text_model.final_layer_norm.bias":
            ("text_encoder", "final_layer_norm.bias", "copy"),
        "conditioner.embedders.1.model.positional_embedding":
            ("text_encoder_2", "text_model.embeddings.position_embedding.weight", "copy"),
        "conditioner.embedders.1.model.text_projection": ("text_encoder_2", "text_projection.weight", "transpose"),
        "conditioner.embedders.1.model.transformer.resblocks.7.mlp.c_proj.bias":
            ("text_encoder_2", "text_model.encoder.layers.7.mlp.fc2.bias", "copy"),
    }  # fmt: skip
    for key, (component, diffusers, op) in sgm.items():
        assert map_ldm_key("sdxl", key) == (KeyMapping(key, component, diffusers, op),)
    fused = map_ldm_key("sdxl", "conditioner.embedders.1.model.transformer.resblocks.3.attn.in_proj_weight")
    assert [(m.diffusers, m.op) for m in fused] == [
        (f"text_model.encoder.layers.3.self_attn.{p}_proj.weight", f"qkv{i}") for i, p in enumerate("qkv")
    ]
    assert map_ldm_key("sdxl", "conditioner.embedders.1.model.logit_scale") == ()
    assert map_ldm_key("sdxl", "v_pred") == ()


def test_sd15_examples():
    assert map_ldm_key("sd15", "model.diffusion_model.output_blocks.2.1.conv.weight")[0].diffusers == (
        "up_blocks.0.upsamplers.0.conv.weight"
    )
    assert map_ldm_key("sd15", "model.diffusion_model.input_blocks.1.1.proj_in.weight")[0].diffusers == (
        "down_blocks.0.attentions.0.proj_in.weight"
    )
    key = "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight"
    assert (
        map_ldm_key("sd15", key, clip_l_style="text_model")[0].diffusers == "text_model.encoder.layers.0.mlp.fc1.weight"
    )
    assert map_ldm_key("sd15", key)[0].diffusers == "encoder.layers.0.mlp.fc1.weight"
    # older SD1 files store CLIP-L without `text_model.`
    old = "cond_stage_model.transformer.encoder.layers.0.mlp.fc1.weight"
    assert map_ldm_key("sd15", old)[0].diffusers == "encoder.layers.0.mlp.fc1.weight"
    assert map_ldm_key("sd15", "model_ema.diffusion_modelinput_blocks00bias") == ()
    assert map_ldm_key("sd15", "conditioner.embedders.1.model.ln_final.weight") == ()  # not an sd15 component


def test_unknown_keys_inside_a_component():
    bad = "model.diffusion_model.input_blocks.1.0.bogus.weight"
    assert map_ldm_key("sdxl", bad) is None
    with pytest.raises(ArchError, match="bogus"):
        build_keymap("sdxl", [bad])
    assert build_keymap("sdxl", [bad], strict=False).unmapped_keys == (bad,)
    assert map_ldm_key("sdxl", "first_stage_model.decoder.up.4.block.0.conv1.weight") is None  # only 4 up blocks
    assert (
        map_ldm_key("sdxl", "model.diffusion_model.output_blocks.8.2.conv.weight") is None
    )  # last block: no upsampler
    assert map_ldm_key("sdxl", "model.diffusion_model.input_blocks.9.0.op.weight") is None  # last block: no downsampler
    assert map_diffusers_key("sdxl", "unet", "down_blocks.2.downsamplers.0.conv.weight") is None
    assert map_diffusers_key("sdxl", "unet", "up_blocks.2.upsamplers.0.conv.weight") is None
    assert map_diffusers_key("sdxl", "unet", "down_blocks.0.resnets.0.bogus.weight") is None
    with pytest.raises(ArchError, match="bogus"):
        build_reverse_keymap("sdxl", {"unet": ["down_blocks.0.resnets.0.bogus.weight"]})
    with pytest.raises(ArchError, match="component"):
        map_diffusers_key("sd15", "text_encoder_2", "text_projection.weight")


def test_ambiguous_and_incomplete():
    new = "cond_stage_model.transformer.text_model.final_layer_norm.weight"
    old = "cond_stage_model.transformer.final_layer_norm.weight"
    with pytest.raises(ArchError, match="ambiguous"):
        build_keymap("sd15", [new, old])
    with pytest.raises(ArchError, match="ambiguous"):
        build_reverse_keymap(
            "sd15", {"text_encoder": ["final_layer_norm.weight", "text_model.final_layer_norm.weight"]}
        )
    q_and_k = [f"text_model.encoder.layers.0.self_attn.{p}_proj.weight" for p in "qk"]
    with pytest.raises(ArchError, match="missing"):
        build_reverse_keymap("sdxl", {"text_encoder_2": q_and_k})
    with pytest.raises(ArchError, match="clip_l_style"):
        map_ldm_key("sdxl", new, clip_l_style="nested")


def test_reverse_position_ids():
    m = map_diffusers_key("sd15", "text_encoder", "text_model.embeddings.position_ids")
    assert m.ldm == "cond_stage_model.transformer.text_model.embeddings.position_ids"
    rev = build_reverse_keymap("sdxl", {"text_encoder_2": ["text_model.embeddings.position_ids"]})
    assert rev.unmapped_keys == ("text_encoder_2/text_model.embeddings.position_ids",)


def test_layout_from_other_configs():
    unet = {"layers_per_block": 1, "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"]}
    lay = Layout.from_configs(unet, {"up_block_types": ["UpDecoderBlock2D"] * 2})
    assert lay == Layout(1, (False, True), 2)
    m = map_ldm_key("sd15", "model.diffusion_model.output_blocks.1.1.conv.weight", layout=lay)
    assert m[0].diffusers == "up_blocks.0.upsamplers.0.conv.weight"
    m = map_ldm_key("sd15", "model.diffusion_model.input_blocks.2.0.op.bias", layout=lay)
    assert m[0].diffusers == "down_blocks.0.downsamplers.0.conv.bias"
    assert map_ldm_key("sd15", "first_stage_model.decoder.up.1.block.0.conv1.bias", layout=lay)[0].diffusers == (
        "decoder.up_blocks.0.resnets.0.conv1.bias"
    )
    with pytest.raises(ArchError, match="layers_per_block"):
        Layout.from_configs({"layers_per_block": [1, 2], "up_block_types": []}, {"up_block_types": []})


def test_default_layouts():
    assert default_layout("sdxl") == Layout(2, (True, True, False), 4)
    assert default_layout("sd15") == Layout(2, (False, True, True, True), 4)


def test_configs():
    assert load_config("sdxl", "unet")["cross_attention_dim"] == 2048
    assert load_config("sdxl", "vae")["scaling_factor"] == 0.13025
    assert load_config("sdxl", "text_encoder")["hidden_act"] == "quick_gelu"
    te2 = load_config("sdxl", "text_encoder_2")
    assert (te2["hidden_size"], te2["num_hidden_layers"], te2["hidden_act"], te2["projection_dim"]) == (
        1280,
        32,
        "gelu",
        1280,
    )
    assert load_config("sdxl", "scheduler")["_class_name"] == "EulerDiscreteScheduler"
    assert load_config("sd15", "scheduler")["_class_name"] == "PNDMScheduler"
    assert load_config("sd15", "model_index")["_class_name"] == "StableDiffusionPipeline"
    cfg = load_config("sd15", "unet")
    cfg["in_channels"] = 9  # a fresh dict each call
    assert load_config("sd15", "unet")["in_channels"] == 4
    with pytest.raises(ArchError, match="text_encoder_2"):
        load_config("sd15", "text_encoder_2")
    with pytest.raises(ArchError, match="unknown architecture"):
        load_config("sd3", "unet")


def test_old_diffusers_vae_attention_names():
    for old, new in {"query": "q", "key": "k", "value": "v", "proj_attn": "proj_out"}.items():
        m = map_diffusers_key("sd15", "vae", f"decoder.mid_block.attentions.0.{old}.weight")
        assert (m.ldm, m.op) == (f"first_stage_model.decoder.mid.attn_1.{new}.weight", "conv1x1_to_linear")
    with pytest.raises(ArchError, match="ambiguous"):
        build_reverse_keymap("sd15", {"vae": [f"encoder.mid_block.attentions.0.{n}.bias" for n in ("to_q", "query")]})
