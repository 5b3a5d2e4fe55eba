"""extract-lora decides text-encoder attention blocks whole: A1111 applies a LoRA to CLIP-G's attention
(nn.MultiheadAttention, q/k/v fused in in_proj_weight) only when q, k, v and out are all present for that layer and
silently skips partial blocks. A tiny SDXL whose text encoders change only in some projections must give an adapter
with, per attention block, all four projections or none."""

from __future__ import annotations

import re
from collections import defaultdict

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergekit_sdxl.io.reader import open_checkpoint
from mergekit_sdxl.lora.bake import AdapterSpec, bake
from mergekit_sdxl.lora.extract import ExtractOptions, extract_lora
from mergekit_sdxl.lora.svd import RankRule

TE2 = "conditioner.embedders.1.model.transformer.resblocks.{}.attn.{}"
TE1 = "conditioner.embedders.0.transformer.text_model.encoder.layers.{}.self_attn.{}.weight"
PROJ = re.compile(r"^(lora_te\d_text_model_encoder_layers_\d+_self_attn)_(q|k|v|out)_proj\.lora_down\.weight$")


@pytest.fixture(scope="module")
def pair(make_ckpt, tmp_path_factory):
    """Base, and a copy whose text encoders change only here:
    te2 layer 0: q rows of in_proj, strongly (k, v, out unchanged);
    te2 layer 1: q strongly, k below the noise floor;
    te2 layer 2: out below the floor only (block to drop);
    te1 layer 0: v strongly (q, k, out unchanged)."""
    base = make_ckpt("sdxl", seed=0, dtype="F32")
    tensors = load_file(base)
    gen = torch.Generator().manual_seed(5)

    def bump(key, rows, scale):
        w = tensors[key]
        sl = slice(*rows) if rows else slice(None)
        noise = torch.randn(w[sl].shape, generator=gen)
        w[sl] += scale * noise * (w[sl].norm() / noise.norm())

    d = tensors[TE2.format(0, "in_proj_weight")].shape[1]
    bump(TE2.format(0, "in_proj_weight"), (0, d), 0.1)
    bump(TE2.format(1, "in_proj_weight"), (0, d), 0.1)
    bump(TE2.format(1, "in_proj_weight"), (d, 2 * d), 1e-5)
    bump(TE2.format(2, "out_proj.weight"), None, 1e-5)
    bump(TE1.format(0, "v_proj"), None, 0.1)
    tuned = tmp_path_factory.mktemp("blocks") / "tuned.safetensors"
    save_file(tensors, tuned)
    return base, tuned


def _blocks(path):
    found = defaultdict(set)
    with open_checkpoint(path) as reader:
        for key in reader.keys():
            match = PROJ.match(key)
            if match:
                found[match.group(1)].add(match.group(2))
    return dict(found)


def test_auto_keeps_whole_blocks(pair, tmp_path):
    out = tmp_path / "auto.safetensors"
    report = extract_lora(*pair, out, ExtractOptions(rank=RankRule("fixed", 4), save_dtype="F32"))
    blocks = _blocks(out)
    whole = {"q", "k", "v", "out"}
    assert blocks == {"lora_te2_text_model_encoder_layers_0_self_attn": whole,
                      "lora_te2_text_model_encoder_layers_1_self_attn": whole,
                      "lora_te1_text_model_encoder_layers_0_self_attn": whole}
    reasons = {row.name: row.reason for row in report.layers}
    assert "attention block" in reasons["lora_te2_text_model_encoder_layers_1_self_attn_k_proj"]
    assert "its attention block too" in reasons["lora_te2_text_model_encoder_layers_2_self_attn_out_proj"]
    # the zero factors change nothing: baked k/v rows and out are the base's, q rows moved towards the tuned ones
    baked = tmp_path / "baked.safetensors"
    bake(pair[0], [AdapterSpec(str(out))], baked)
    with open_checkpoint(pair[0]) as rb, open_checkpoint(pair[1]) as rt, open_checkpoint(baked) as rk:
        key = TE2.format(0, "out_proj.weight")
        assert torch.equal(rk.read(key), rb.read(key))
        key = TE2.format(0, "in_proj_weight")
        b, t, k = rb.read(key), rt.read(key), rk.read(key)
        d = b.shape[1]
        assert torch.equal(k[d:], b[d:])
        assert (k[:d] - t[:d]).norm() < 0.9 * (b[:d] - t[:d]).norm()


def test_on_mode_completes_blocks_too(pair, tmp_path):
    out = tmp_path / "on.safetensors"
    extract_lora(*pair, out, ExtractOptions(rank=RankRule("fixed", 4), save_dtype="F32", text_encoders="on"))
    blocks = _blocks(out)
    assert all(projections == {"q", "k", "v", "out"} for projections in blocks.values())
    assert "lora_te2_text_model_encoder_layers_2_self_attn" in blocks  # changed, however little: kept in `on`
