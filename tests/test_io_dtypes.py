"""The dtype table, clamped casts and scaled fp8."""

from __future__ import annotations

import pytest
import torch

from mergekit_sdxl.errors import UsageError
from mergekit_sdxl.io import dtypes
from mergekit_sdxl.io.dtypes import (
    DTYPES,
    cast,
    code_of,
    dequantize_scaled,
    is_scalable,
    parse_dtype,
    scale_key,
    scaled_key_of,
    to_storage,
    torch_dtype,
)


def test_table_matches_torch():
    for code, d in DTYPES.items():
        td = torch_dtype(code)
        assert code_of(td) == code
        assert torch.empty(0, dtype=td).element_size() == d.itemsize
        assert td.is_floating_point == d.is_float
        if d.is_float:
            assert d.fmax == torch.finfo(td).max


@pytest.mark.parametrize("name,code", [("fp16", "F16"), ("half", "F16"), ("bf16", "BF16"), ("FP32", "F32"),
                                       ("float32", "F32"), ("fp8_e4m3fn", "F8_E4M3"), ("fp8_e5m2", "F8_E5M2"),
                                       ("F8_E4M3", "F8_E4M3"), ("int64", "I64")])
def test_parse_dtype(name, code):
    assert parse_dtype(name) == code


def test_parse_dtype_unknown():
    with pytest.raises(UsageError, match="fp16"):
        parse_dtype("fp12")


@pytest.mark.parametrize("code,fmax", [("F8_E4M3", 448.0), ("F8_E5M2", 57344.0), ("F16", 65504.0)])
def test_plain_cast_clamps_and_counts(code, fmax):
    x = torch.tensor([1.0, -2.0, fmax * 2, -fmax * 3, float("inf"), float("nan"), fmax])
    original = x.clone()
    out, clamped = cast(x, code)
    assert torch.equal(x.nan_to_num(), original.nan_to_num())  # the input is never modified
    assert out.dtype == torch_dtype(code)
    assert clamped == 3
    back = out.float()
    assert back[2] == fmax and back[3] == -fmax and back[4] == fmax and back[6] == fmax
    assert torch.isnan(back[5])
    assert back[0] == 1.0 and back[1] == -2.0


def test_cast_chunks_count_correctly(monkeypatch):
    monkeypatch.setattr(dtypes, "CHUNK", 5)
    x = torch.arange(23, dtype=torch.float32) * 100  # 0..2200; > 448 from 500 on
    original = x.clone()
    out, clamped = cast(x, "F8_E4M3")
    assert torch.equal(x, original)  # the input is never modified
    assert clamped == int((x > 448).sum())
    assert out.float().max() == 448 and out.shape == x.shape


def test_cast_leaves_non_float_and_widening_alone():
    ids = torch.arange(5)
    assert cast(ids, "F16") == (ids, 0)
    h = torch.tensor([65504.0], dtype=torch.float16)
    out, clamped = cast(h, "F32")
    assert clamped == 0 and out.dtype == torch.float32 and out.item() == 65504.0


def test_bf16_to_fp16_clamps():
    out, clamped = cast(torch.tensor([1e5, 1.0], dtype=torch.bfloat16), "F16")
    assert clamped == 1 and out[0].item() == 65504.0


@pytest.mark.parametrize("code", ["F8_E4M3", "F8_E5M2"])
def test_scaled_fp8_round_trip(code):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 32, generator=g) * 1e5  # far beyond both formats' range
    original = w.clone()
    stored = to_storage(w, code, scaled=True)
    assert torch.equal(w, original)  # the input is never modified
    assert stored.tensor.dtype == torch_dtype(code) and stored.n_clamped == 0
    assert stored.scale.dtype == torch.float32 and stored.scale.dim() == 0
    assert stored.scale.item() == pytest.approx(w.abs().max().item() / DTYPES[code].fmax)
    back = dequantize_scaled(stored.tensor, stored.scale, "F32")
    rel = ((back - w).norm() / w.norm()).item()
    assert rel < (0.05 if code == "F8_E4M3" else 0.1)
    plain = to_storage(w, code)
    assert plain.scale is None and plain.n_clamped > 0


def test_scaled_fp8_zero_and_inf():
    z = to_storage(torch.zeros(4), "F8_E4M3", scaled=True)
    assert z.scale.item() == 1.0 and z.n_clamped == 0
    w = torch.tensor([1.0, -2.0, float("inf")])
    s = to_storage(w, "F8_E4M3", scaled=True)
    assert w[2].item() == float("inf")
    assert s.n_clamped == 1 and s.scale.item() == pytest.approx(2.0 / 448)
    assert dequantize_scaled(s.tensor, s.scale, "F32")[2].item() == pytest.approx(2.0)


def test_to_storage_non_float():
    ids = torch.arange(3)
    s = to_storage(ids, "I64", scaled=True)
    assert s.scale is None and torch.equal(s.tensor, ids)


def test_scale_key_names():
    assert scale_key("model.x.weight") == "model.x.scale_weight"
    assert scaled_key_of("model.x.scale_weight") == "model.x.weight"
    assert scaled_key_of("model.x.weight") is None
    with pytest.raises(ValueError):
        scale_key("model.x.bias")
    # ComfyUI dequantises only the UNet's Linear layers (2-D weights); convs, VAE and text encoders stay plain
    unet = "model.diffusion_model.input_blocks.4.1.proj_in"
    assert is_scalable(f"{unet}.weight", (3, 4))
    assert not is_scalable(f"{unet}.weight", (3, 4, 1, 1)) and not is_scalable(f"{unet}.weight", (3,))
    assert not is_scalable(f"{unet}.bias", (3, 4))
    assert not is_scalable("conditioner.embedders.0.transformer.text_model.encoder.layers.0.mlp.fc1.weight", (3, 4))
    assert not is_scalable("first_stage_model.encoder.mid.attn_1.q.weight", (3, 4))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float8_e4m3fn,
                                   torch.float8_e5m2], ids=str)
def test_amax_every_float_dtype(dtype, monkeypatch):
    monkeypatch.setattr(dtypes, "CHUNK", 2)
    x = torch.tensor([1.0, -3.0, 2.0, float("nan"), 0.5]).to(dtype)
    original = x.clone()
    assert dtypes.amax(x) == 3.0
    if dtype != torch.float8_e4m3fn:  # e4m3fn has no inf
        assert dtypes.amax(torch.tensor([1.0, float("-inf")]).to(dtype), finite_only=True) == 1.0
    assert torch.equal(x.view(torch.uint8), original.view(torch.uint8))
    q, scale, clamped = dtypes.to_scaled_fp8(x, "F8_E4M3")
    assert clamped == 0 and scale.item() == pytest.approx(3.0 / 448)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2], ids=str)
def test_fp8_has_non_finite_every_code(dtype):
    """Every one of the 256 codes, alone and among finite ones, agrees with the float value's finiteness."""
    codes = torch.arange(256, dtype=torch.uint8).view(dtype)
    finite = codes.float().isfinite()
    for i in range(256):
        assert dtypes.fp8_has_non_finite(codes[i : i + 1]) == (not bool(finite[i])), i
        mixed = torch.cat([torch.ones(5, dtype=dtype), codes[i : i + 1], torch.full((5,), -2.0).to(dtype)])
        assert dtypes.fp8_has_non_finite(mixed) == (not bool(finite[i])), i
    assert not dtypes.fp8_has_non_finite(codes[finite])
    assert not dtypes.fp8_has_non_finite(torch.empty(0, dtype=dtype))
