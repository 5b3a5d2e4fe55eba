"""`diff`: streamed sums against float64 references, parts per component, the heatmap's rows and colour bar."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from mergekit_sdxl.analysis import blockdiff
from mergekit_sdxl.analysis.blockdiff import diff_checkpoints, reduce_pair
from mergekit_sdxl.analysis.diffmap import colour, heatmap
from mergekit_sdxl.arch.parts import part_of, part_order
from mergekit_sdxl.arch.tables import key_table
from mergekit_sdxl.io.reader import open_checkpoint


@pytest.fixture(autouse=True)
def one_thread():
    """The float64 references are many small tensors: one thread (two spin against each other on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _reference(a, b):
    """||A||², ||B||², ||B - A||² and the cosine in float64 (torch's float64 dot products)."""
    a64, b64 = a.double().reshape(-1), b.double().reshape(-1)
    aa, bb, dd = float(a64 @ a64), float(b64 @ b64), float((b64 - a64) @ (b64 - a64))
    return aa, bb, dd, float(a64 @ b64) / math.sqrt(aa * bb)


@pytest.mark.parametrize("dtypes", [(torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16),
                                    (torch.float16, torch.float32), (torch.float32, torch.bfloat16)])
@pytest.mark.parametrize("n", [1, 100, 16_384, 16_385, 1024 * 300 + 7, (1 << 17) * 5 + 1500])
def test_reduce_pair_matches_float64(n, dtypes):
    g = torch.Generator().manual_seed(n)
    a = (0.05 * torch.randn(n, generator=g)).to(dtypes[0])
    b = (a.float() + 1e-4 * torch.randn(n, generator=g)).to(dtypes[1])  # relative change ~2e-3
    s = reduce_pair(a, b)
    aa, bb, dd, cosine = _reference(a, b)
    # float32 row norms summed in float64: within 2e-7 of float64 (a float32 sum of the whole chunk is ~1e-6 off)
    assert (s.aa, s.bb, s.dd) == pytest.approx((aa, bb, dd), rel=2e-7)
    assert s.relative_change == pytest.approx(math.sqrt(dd / aa), rel=2e-7)
    assert 1 - s.cosine == pytest.approx(1 - cosine, rel=1e-5)  # 1 - cos ~ 2e-6 here: still 5 digits
    assert s.numel == n and s.keys == 1


def test_chunks_add_up(monkeypatch):
    a, b = torch.randn(10_000), torch.randn(10_000)
    whole = reduce_pair(a, b)
    monkeypatch.setattr(blockdiff, "CHUNK", 999)  # not a multiple of ROW: whole rows per chunk all the same
    monkeypatch.setattr(blockdiff, "SMALL", 10)
    monkeypatch.setattr(blockdiff, "ROW", 64)
    parts = reduce_pair(a, b)
    assert (parts.aa, parts.bb, parts.dd) == pytest.approx((whole.aa, whole.bb, whole.dd), rel=1e-7)
    assert torch.equal(a, a.clone()) and parts.numel == 10_000


def test_pieces_of_mixed_dtypes_match_float64(tiny_sdxl, make_ckpt, monkeypatch):
    """Every key read in pieces (fp16 against bf16), chunks and rows on: the sums per part are float64's."""
    variant = make_ckpt(seed=5, like=tiny_sdxl, delta="noise:0.01", dtype="BF16")
    for name, value in (("PART", 5000), ("CHUNK", 1000), ("SMALL", 10), ("ROW", 64), ("SLOTS", 2)):
        monkeypatch.setattr(blockdiff, name, value)
    result = diff_checkpoints(tiny_sdxl, variant)
    want: dict = {}
    nbytes = 0
    with open_checkpoint(tiny_sdxl) as ra, open_checkpoint(variant) as rb:
        for key in ra.keys():
            a, b = ra.read(key), rb.read(key)
            if a.is_floating_point() and a.numel():
                sums = want.setdefault(part_of(key, "sdxl"), [0.0, 0.0, 0.0, 0])
                for i, value in enumerate(_reference(a, b)[:3]):
                    sums[i] += value
                sums[3] += a.numel()
                nbytes += a.nbytes + b.nbytes
    assert set(result.parts) == set(want)
    for part, (aa, bb, dd, numel) in want.items():
        got = result.parts[part]
        assert (got.aa, got.bb, got.dd) == pytest.approx((aa, bb, dd), rel=2e-7, abs=1e-30), part
        assert got.numel == numel
    assert result.bytes_read == nbytes


@pytest.mark.parametrize("arch", ["sdxl", "sd15"])
def test_every_key_has_a_part_in_display_order(arch):
    for key in key_table(arch):
        component, part = part_of(key, arch)
        assert part in part_order(component, arch), key
    assert part_of("conditioner.embedders.1.model.transformer.resblocks.31.mlp.c_fc.weight", "sdxl") == \
        ("clip_g", "L31")
    assert part_of("first_stage_model.decoder.up.2.block.0.conv1.weight", arch) == ("vae", "dec.up2")
    assert part_of("first_stage_model.post_quant_conv.weight", arch) == ("vae", "quant")


def test_diff_streams_and_sums_by_part(tiny_sdxl, make_ckpt, tmp_path):
    variant = make_ckpt(seed=4, like=tiny_sdxl, delta="noise:0.05")
    result = diff_checkpoints(tiny_sdxl, variant)
    assert result.bytes_read > 0 and result.seconds > 0
    with open_checkpoint(tiny_sdxl) as ra, open_checkpoint(variant) as rb:
        want: dict = {}
        for key in ra.keys():
            a, b = ra.read(key), rb.read(key)
            if a.is_floating_point() and a.numel():
                entry = want.setdefault(part_of(key, "sdxl"), [0.0, 0.0])
                entry[0] += float(((b.double() - a.double()) ** 2).sum())
                entry[1] += float((a.double() ** 2).sum())
    assert set(result.parts) == set(want)
    for group, (dd, aa) in want.items():
        assert result.parts[group].relative_change == pytest.approx(math.sqrt(dd / aa) if aa else 0.0, rel=1e-6)
    assert result.parts["vae", "dec.up0"].relative_change == 0  # the synthetic delta leaves the VAE alone
    assert result.parts["clip_g", "L00"].keys == 12 and result.parts["clip_g", "L00"].relative_change > 0.01


def test_heatmap_rows_colour_bar_and_names(tiny_sdxl, make_ckpt, tmp_path):
    variant = make_ckpt(seed=4, like=tiny_sdxl, delta="noise:0.05")
    result = diff_checkpoints(tiny_sdxl, variant)
    png = heatmap(result, tmp_path / "heat.png")
    image = Image.open(png)
    assert tiny_sdxl.name in image.info["Title"] and variant.name in image.info["Title"]
    assert "rows: unet, clip_l, clip_g, vae" in image.info["Description"]
    pixels = np.asarray(image.convert("RGB")).astype(int)
    top = max(s.relative_change for s in result.parts.values())
    # the colour bar: a run of at least 300 pixels going from colour(0) to colour(1)
    rows = [y for y in range(pixels.shape[0])
            if all(np.abs(pixels[y, 8 + i] - np.array(colour(i / 359))).max() <= 2 for i in (2, 100, 200, 300))]
    assert rows, "no colour bar"
    # the UNet IN04 cell is drawn in the colour of its value on the shared scale
    value = result.parts["unet", "IN04"].relative_change / top
    assert (np.abs(pixels - np.array(colour(value))).max(axis=2) <= 1).sum() > 100
    assert Image.open(png).width > 600  # 34 CLIP-G parts side by side


class _WholeTensorsOnly:
    """A reader with no partial reads (like a .ckpt or a diffusers folder): the diff reads whole tensors."""

    def __init__(self, reader):
        self._reader = reader

    def __getattr__(self, name):
        if name == "read_part_into":
            raise AttributeError(name)
        return getattr(self._reader, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._reader.close()


def test_readers_without_partial_reads_give_the_same_sums(tiny_sdxl, make_ckpt, monkeypatch):
    variant = make_ckpt(seed=4, like=tiny_sdxl, delta="noise:0.05")
    pieces = diff_checkpoints(tiny_sdxl, variant)
    monkeypatch.setattr(blockdiff, "open_checkpoint", lambda path: _WholeTensorsOnly(open_checkpoint(path)))
    whole = diff_checkpoints(tiny_sdxl, variant)
    # the same values, cut into other chunks (float32 rows differ at the last piece of a tensor): 1e-7 apart
    assert whole.parts.keys() == pieces.parts.keys() and whole.bytes_read == pieces.bytes_read
    for part, sums in pieces.parts.items():
        assert (whole.parts[part].aa, whole.parts[part].dd) == pytest.approx((sums.aa, sums.dd), rel=1e-7), part


@pytest.mark.parametrize("pieces", [False, True], ids=["whole", "pieces"])
def test_scaled_fp8_file_is_compared_by_its_weights(tiny_sdxl, tmp_path, monkeypatch, pieces):
    """A scaled-fp8 file is compared as its dequantized weights (scale times stored value), its scales and marker
    are not keys 'only in B', and the result equals the diff against the same weights written plainly."""
    from mergekit_sdxl.engine.convert import convert_checkpoint

    if pieces:
        monkeypatch.setattr(blockdiff, "PART", 100)  # several pieces per tensor, each scaled on its own
    scaled, plain = tmp_path / "scaled.safetensors", tmp_path / "plain.safetensors"
    with open_checkpoint(tiny_sdxl) as reader:
        convert_checkpoint(reader, scaled, "fp8_e4m3fn", scaled_fp8=True)
    with open_checkpoint(scaled) as reader:
        convert_checkpoint(reader, plain, "fp32")  # the dequantized weights, exactly (fp8 x scale fits fp32)
    got, want = diff_checkpoints(tiny_sdxl, scaled), diff_checkpoints(tiny_sdxl, plain)
    assert got.only_in_a == got.only_in_b == [] and got.shape_mismatch == []
    for name, sums in want.components.items():
        assert got.components[name].keys == sums.keys
        assert got.components[name].cosine == pytest.approx(sums.cosine, rel=1e-9)
        assert got.components[name].relative_change == pytest.approx(sums.relative_change, rel=1e-6, abs=1e-12)
    assert got.components["unet"].cosine > 0.999
