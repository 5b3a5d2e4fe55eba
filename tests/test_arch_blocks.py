"""Key -> MBW block under each convention (docs/conventions.md, section 2), on its examples and full key tables."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from mergekit_sdxl.arch.blocks import CONVENTIONS, KEEP_A, block_names, block_of
from mergekit_sdxl.arch.tables import key_table
from mergekit_sdxl.errors import ArchError

A = KEEP_A
SDXL_TE = "conditioner.embedders.1.model.transformer.resblocks.3.attn.in_proj_weight"
SDXL_TIME = "model.diffusion_model.time_embed.0.weight"
SDXL_LABEL = "model.diffusion_model.label_emb.0.0.bias"
SD1_TIME = "model.diffusion_model.time_embed.2.bias"


def test_block_names():
    sdxl = block_names("sdxl")
    assert len(sdxl) == 20 and sdxl[:2] == ("BASE", "IN00") and sdxl[9:12] == ("IN08", "M00", "OUT00")
    assert sdxl[-1] == "OUT08"
    assert block_names("sdxl", "sd-mecha") == (*sdxl, "VAE")
    sd15 = block_names("sd15", "sd-mecha")
    assert len(sd15) == 26 and sd15[12:15] == ("IN11", "M00", "OUT00") and sd15[-1] == "OUT11"
    assert block_names("sd15") == sd15


@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("key, block", [
    # the doc's examples
    ("model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight", "IN04"),
    ("model.diffusion_model.output_blocks.2.2.conv.weight", "OUT02"),
    ("model.diffusion_model.out.0.bias", "OUT08"),
    ("conditioner.embedders.1.model.text_projection", A),
    # gate 1: "model" must be in the key
    ("v_pred", A), ("ztsnr", A), ("alphas_cumprod", A), ("edm_vpred.sigma_max", A),
    # gate 2: neither weight nor bias
    ("conditioner.embedders.0.transformer.text_model.embeddings.position_ids", A),
    ("conditioner.embedders.1.model.logit_scale", A),
    ("conditioner.embedders.1.model.positional_embedding", A),
    ("conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight", "BASE"),
    ("conditioner.embedders.0.transformer.text_model.final_layer_norm.bias", "BASE"),
    ("model.diffusion_model.middle_block.1.proj_in.weight", "M00"),
    ("model.diffusion_model.input_blocks.0.0.weight", "IN00"),
    ("model.diffusion_model.output_blocks.8.0.skip_connection.bias", "OUT08"),
    # rule 8 and indices SDXL does not have
    ("model.diffusion_model.weird.weight", A),
    ("model.diffusion_model.input_blocks.9.0.in_layers.0.weight", A),
])
def test_sdxl_rules_common_to_all_conventions(convention, key, block):
    assert block_of(key, "sdxl", convention) == block


@pytest.mark.parametrize("convention, time, vae", [
    ("supermerger", "IN00", "BASE"),
    ("supermerger-2023", A, "BASE"),
    ("sd-mecha", "BASE", "VAE"),
])
def test_sdxl_rules_that_differ(convention, time, vae):
    assert block_of(SDXL_TIME, "sdxl", convention) == time
    assert block_of(SDXL_LABEL, "sdxl", convention) == time
    assert block_of("first_stage_model.decoder.conv_out.weight", "sdxl", convention) == vae


@pytest.mark.parametrize("convention, time", [("supermerger", "IN00"), ("supermerger-2023", "OUT11"),
                                              ("sd-mecha", "BASE")])
def test_sd15_rules(convention, time):
    assert block_of(SD1_TIME, "sd15", convention) == time
    assert block_of("model.diffusion_model.out.2.weight", "sd15", convention) == "OUT11"
    assert block_of("model.diffusion_model.input_blocks.11.0.out_layers.3.bias", "sd15", convention) == "IN11"
    assert block_of("model.diffusion_model.output_blocks.0.0.skip_connection.weight", "sd15", convention) == "OUT00"
    assert block_of("model.diffusion_model.middle_block.2.in_layers.0.weight", "sd15", convention) == "M00"
    # every other weight/bias key follows BASE: text encoder, VAE, EMA
    assert block_of("cond_stage_model.transformer.text_model.final_layer_norm.weight", "sd15", convention) == "BASE"
    assert block_of("first_stage_model.quant_conv.bias", "sd15", convention) == "BASE"
    assert block_of("model_ema.diffusion_modelinput_blocks00bias", "sd15", convention) == "BASE"
    assert block_of("cond_stage_model.transformer.text_model.embeddings.position_ids", "sd15", convention) is A
    assert block_of("model_ema.decay", "sd15", convention) is A
    assert block_of("model.diffusion_model.output_blocks.12.0.weight", "sd15", convention) is A


@pytest.mark.parametrize("arch", ["sdxl", "sd15"])
@pytest.mark.parametrize("convention", CONVENTIONS)
def test_gate_1_key_missing_from_an_input(arch, convention):
    key = "model.diffusion_model.input_blocks.1.0.in_layers.0.weight"
    assert block_of(key, arch, convention) == "IN01"
    assert block_of(key, arch, convention, in_all_inputs=False) is A


def test_unknown_convention_and_arch():
    with pytest.raises(ArchError, match="supermerger-2023"):
        block_of(SDXL_TIME, "sdxl", "comfy")
    with pytest.raises(ArchError, match="sd21"):
        block_of(SDXL_TIME, "sd21")


def _counts(arch: str, convention: str) -> Counter:
    return Counter(block_of(key, arch, convention) for key in key_table(arch))


# Keys per block for the full SDXL key table (2,531 keys). Blocks equal under every convention first.
SDXL_UNET_COUNTS = {
    "IN01": 10, "IN02": 10, "IN03": 2, "IN04": 58, "IN05": 56, "IN06": 2, "IN07": 218, "IN08": 216, "M00": 226,
    "OUT00": 218, "OUT01": 218, "OUT02": 220, "OUT03": 58, "OUT04": 58, "OUT05": 60, "OUT06": 12, "OUT07": 12,
    "OUT08": 16,
}
SDXL_OTHER_COUNTS = {
    # IN00 = input_blocks.0 (2) [+ time_embed (4) + label_emb (4)]; A = 12 scheduler + 4 markers/edm
    # + position_ids, logit_scale, text_projection, positional_embedding [+ 8 embedding keys under 2023]
    "supermerger": {"IN00": 10, "BASE": 583 + 248, A: 20},
    "supermerger-2023": {"IN00": 2, "BASE": 583 + 248, A: 28},
    "sd-mecha": {"IN00": 2, "BASE": 583 + 8, "VAE": 248, A: 20},
}


@pytest.mark.parametrize("convention", CONVENTIONS)
def test_sdxl_keys_per_block(convention):
    counts = _counts("sdxl", convention)
    assert counts == Counter({**SDXL_UNET_COUNTS, **SDXL_OTHER_COUNTS[convention]})
    assert sum(counts.values()) == 2531
    assert set(counts) - {A} == set(block_names("sdxl", convention))  # every block has keys


@pytest.mark.parametrize("arch", ["sdxl", "sd15"])
@pytest.mark.parametrize("convention", CONVENTIONS)
def test_full_table_invariants(arch, convention):
    for key in key_table(arch):
        block = block_of(key, arch, convention)
        for pattern, prefix in ((r"\.input_blocks\.(\d+)\.", "IN"), (r"\.output_blocks\.(\d+)\.", "OUT")):
            match = re.search(pattern, key)
            if match:
                assert block == f"{prefix}{int(match.group(1)):02d}", key
        if "middle_block" in key and key.startswith("model."):
            assert block == "M00", key
        if key.startswith(("conditioner.", "cond_stage_model.")):
            assert "time_embed" not in key and "label_emb" not in key
            expected = A if key.endswith(("position_ids", "logit_scale", "text_projection", "positional_embedding")) \
                else "BASE"
            assert block == expected, key


def test_sd15_keys_per_block():
    supermerger = _counts("sd15", "supermerger")
    assert supermerger["IN00"] == 2 + 4 + 4  # input_blocks.0, time_embed, EMA time_embed (substring match)
    assert supermerger["OUT11"] == 42 and supermerger[A] == 15
    old = _counts("sd15", "supermerger-2023")
    assert old["IN00"] == 2 and old["OUT11"] == 42 + 8
    mecha = _counts("sd15", "sd-mecha")
    assert mecha["BASE"] == supermerger["BASE"] + 8 and mecha["OUT11"] == 42
    assert set(supermerger) - {A} == set(block_names("sd15"))
