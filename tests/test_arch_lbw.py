"""LoRA Block Weight vectors against the lora-block-weight extension's rules, on the real SDXL / SD1 key lists."""

from __future__ import annotations

import re

import pytest

from mergekit_sdxl.arch.lbw import (
    BLOCKS26,
    LAYOUTS,
    PRESETS,
    BlockScale,
    adapter_blocks,
    is_lbw,
    lbw_block,
    parse_lbw,
)
from mergekit_sdxl.arch.lora_names import lora_modules
from mergekit_sdxl.arch.tables import key_table
from mergekit_sdxl.errors import RecipeError

# Copied verbatim from the extension (scripts/lora_block_weight.py, DEF_WEIGHT_PRESET), FLUXALL left out.
EXTENSION_PRESETS = """NONE:0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0
ALL:1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1
INS:1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0
IND:1,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0,0
INALL:1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0
MIDD:1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0
OUTD:1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0
OUTS:1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1
OUTALL:1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1
ALL0.5:0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5"""
# The extension's BLOCKS list: substrings of A1111 module names; the last match wins; 26/27 mean BASE.
EXT_BLOCKS = ["encoder", *(f"diffusion_model_input_blocks_{i}_" for i in range(12)), "diffusion_model_middle_block_",
              *(f"diffusion_model_output_blocks_{i}_" for i in range(12)), "embedders", "transformer_resblocks"]


def extension_position(key: str) -> int | None:
    """The extension's `ratiodealer` on the A1111 module name of a checkpoint key (None = not picked, ratio 1).

    A1111 names UNet modules from `sd_model.model` (`diffusion_model_input_blocks_4_1_...`), SD1 text modules
    from `cond_stage_model.wrapped` (`transformer_text_model_encoder_...`) and SDXL ones `{i}_{name}` per embedder
    (`0_transformer_text_model_encoder_...`, `1_model_transformer_resblocks_...`)."""
    for prefix in ("model.", "cond_stage_model.", "conditioner.embedders."):
        if key.startswith(prefix):
            key = key[len(prefix):]
            break
    name = key.replace(".", "_")
    picked = None
    for i, block in enumerate(EXT_BLOCKS):
        if block in name:
            picked = 0 if i >= 26 else i
    return picked


def test_presets_are_the_extensions():
    table = {line.split(":")[0]: tuple(float(v) for v in line.split(":")[1].split(","))
             for line in EXTENSION_PRESETS.splitlines()}
    assert PRESETS == table


def test_layouts_are_the_extensions():
    assert LAYOUTS[17] == ("BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00", "OUT03", "OUT04", "OUT05",
                           "OUT06", "OUT07", "OUT08", "OUT09", "OUT10", "OUT11")
    assert LAYOUTS[12] == ("BASE", "IN04", "IN05", "IN07", "IN08", "M00", "OUT00", "OUT01", "OUT02", "OUT03", "OUT04",
                           "OUT05")
    assert LAYOUTS[26] == BLOCKS26 and len(BLOCKS26) == 26
    assert all(set(layout) <= set(BLOCKS26) for layout in LAYOUTS.values())


@pytest.mark.parametrize("arch", ["sdxl", "sd15"])
def test_key_to_block_matches_the_extension_on_every_key(arch):
    checked = 0
    for key in key_table(arch):
        if key.startswith("first_stage_model."):
            continue  # no LoRA touches the VAE
        position = extension_position(key)
        assert lbw_block(key) == (None if position is None else BLOCKS26[position]), key
        checked += 1
    assert checked > 1000


@pytest.mark.parametrize(("arch", "length"), [("sdxl", 12), ("sd15", 17)])
def test_plain_lora_layout_covers_exactly_the_attention_modules(arch, length):
    modules = [m for m in lora_modules(arch) if m.group == "attn"]
    blocks = {lbw_block(m.key) for m in modules}
    assert blocks == set(LAYOUTS[length])  # every position holds modules, no attention module lies outside
    conv_blocks = {lbw_block(m.key) for m in lora_modules(arch) if m.group == "conv"}
    assert conv_blocks - set(LAYOUTS[length])  # LoCon layers outside the layout get weight 0


def test_unblocked_keys_keep_strength():
    for key in ("model.diffusion_model.time_embed.0.weight", "model.diffusion_model.label_emb.0.0.weight",
                "model.diffusion_model.out.2.weight"):
        assert lbw_block(key) is None
        assert BlockScale("lbw", parse_lbw("NONE"), "sdxl").factor(key) == 1.0


def test_short_layouts_fill_missing_blocks_with_zero():
    weights = parse_lbw([str(i + 1) for i in range(12)])
    assert [weights[b] for b in LAYOUTS[12]] == [float(i + 1) for i in range(12)]
    assert {b for b, w in weights.items() if w == 0} == set(BLOCKS26) - set(LAYOUTS[12])
    outall = parse_lbw("OUTALL")
    assert outall["BASE"] == 1 and outall["IN04"] == 0 and outall["OUT03"] == 1 and outall["OUT00"] == 0
    assert parse_lbw("lbw=" + ",".join(["0.5"] * 26)) == dict.fromkeys(BLOCKS26, 0.5)


@pytest.mark.parametrize(("value", "message"), [
    ("1,1,1,R,1,1,1,1,1,1,1,1", "random"),
    ("1,1,1,X+0.5,1,1,1,1,1,1,1,1", "dynamic"),
    ("1,1,1", "3 values"),
    ("all", "unknown LoRA Block Weight preset 'all'"),
    ("1,1,1,1,1,1,1,1,1,1,1,nan", "finite"),
    ([1, 2, True, 4, 5, 6, 7, 8, 9, 10, 11, 12], "not a number"),
])
def test_bad_vectors_name_the_problem(value, message):
    with pytest.raises(RecipeError, match=re.escape(message)):
        parse_lbw(value, where="lora.blocks")


def test_which_reading_applies():
    assert is_lbw("ALL") and is_lbw("MIDD") and is_lbw(",".join("1" * 17)) and is_lbw([1] * 12)
    assert is_lbw("lbw=" + ",".join("1" * 26))
    assert not is_lbw(",".join("1" * 20)) and not is_lbw([1] * 26) and not is_lbw("GRAD_V")
    assert not is_lbw("IN04:1,default:0") and not is_lbw({"IN04": 1, "default": 0})


def test_adapter_blocks_chooses_the_rule():
    key = "model.diffusion_model.time_embed.0.weight"
    mbw = adapter_blocks([0.5] * 20, "sdxl")
    assert mbw.rule == "supermerger" and mbw.factor(key) == 0.5  # MBW: time_embed follows IN00
    lbw = adapter_blocks("lbw=" + ",".join(["0.5"] * 20), "sdxl")
    assert lbw.rule == "lbw" and lbw.factor(key) == 1.0  # LBW: not a block
    text = "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"
    assert adapter_blocks("INS", "sdxl").factor(text, is_text=True) == 1.0
    assert adapter_blocks("OUTD", "sdxl").factor("model.diffusion_model.output_blocks.3.1.proj_in.weight") == 1.0
    assert adapter_blocks("OUTD", "sdxl").factor("model.diffusion_model.output_blocks.7.1.proj_in.weight") == 0.0
