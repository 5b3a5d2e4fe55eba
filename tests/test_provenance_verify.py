"""`merge --verify-against`: distances in ulps, per-block report, AutoV3 comparison, exit code 7."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergekit_sdxl.cli.main import main
from mergekit_sdxl.io.hashes import hash_file
from mergekit_sdxl.provenance.verify import distance, report_lines, verify

UNET = "model.diffusion_model.input_blocks.4.1.proj_in.weight"
OUT = "model.diffusion_model.output_blocks.2.2.conv.weight"
CLIP = "conditioner.embedders.1.model.ln_final.weight"


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MERGEKIT_SDXL_CACHE_DIR", str(tmp_path / "cache"))


def _next_up(t: torch.Tensor, steps: int = 1) -> torch.Tensor:
    """`steps` representable fp16 values away from each (positive) element."""
    return (t.view(torch.int16) + steps).view(torch.float16)


def test_distance_counts_fp16_steps():
    x = torch.tensor([0.1, 0.5, 3.0, 1e-7, 0.0, -2.0], dtype=torch.float16)
    assert distance(x, x.clone(), "F16", 1) == (0.0, 0)
    pos = x.abs() + 1e-3
    assert distance(pos.half(), _next_up(pos.half()), "F16", 1) == (1.0, 0)
    assert distance(pos.half(), _next_up(pos.half(), 3), "F16", 1) == (3.0, 6)
    below_two = torch.tensor([2.0], dtype=torch.float16).view(torch.int16) - 1
    assert distance(torch.tensor([2.0]).half(), below_two.view(torch.float16), "F16", 1)[0] == 0.5
    # subnormals: spacing 2^-24 everywhere below 2^-14
    tiny = torch.tensor([2.0 ** -20], dtype=torch.float16)
    assert distance(tiny, tiny + 2.0 ** -24, "F16", 1)[0] == 1.0
    nan = torch.tensor([math.nan, 1.0])
    assert distance(nan, nan.clone(), "F32", 0) == (0.0, 0)
    assert distance(nan, torch.tensor([1.0, 1.0]), "F32", 0)[0] == math.inf
    ids = torch.arange(77)
    assert distance(ids, ids.clone(), "I64", 0) == (0.0, 0)
    assert distance(ids, ids.flip(0), "I64", 0)[0] == math.inf
    # an int64 key merged by A1111 into fp16 values: compared by value
    assert distance(ids, ids.half(), "F16", 0) == (0.0, 0)


def _write(path, tensors, order=None):
    from mergekit_sdxl.io.writer import save_file as ours_save

    if order is None:
        ours_save(tensors, path)
    else:
        ours_save({k: tensors[k] for k in order}, path, order="given")
    return path


@pytest.fixture
def tensors():
    g = torch.Generator().manual_seed(0)
    return {CLIP: torch.rand(64, generator=g).half() + 0.5, UNET: torch.rand(8, 8, generator=g).half() + 0.5,
            OUT: torch.rand(4, 4, 3, 3, generator=g).half() + 0.5}


def test_identical_file_and_autov3(tmp_path, tensors):
    a = _write(tmp_path / "a.safetensors", tensors)
    b = _write(tmp_path / "b.safetensors", tensors)
    report = verify(a, b)
    assert report.identical and report.passed and report.autov3_ours == report.autov3_published
    assert report.autov3_published == hash_file(b).autov3
    assert set(report.groups) == {"CLIP-G", "IN04", "OUT02"}
    assert "bit-identical" in report.verdict and "matches" in "\n".join(report_lines(report))


def test_same_values_other_order(tmp_path, tensors):
    ours = _write(tmp_path / "a.safetensors", tensors, [OUT, UNET, CLIP])
    theirs = tmp_path / "published.safetensors"
    save_file(tensors, theirs)  # safetensors' own writer: its own order
    report = verify(ours, theirs)
    assert report.identical and report.autov3_ours != report.autov3_published
    assert "stored in another order" in "\n".join(report_lines(report))


def test_rounding_steps_are_measured_per_block(tmp_path, tensors):
    ours = _write(tmp_path / "a.safetensors", tensors)
    off = dict(tensors)
    off[OUT] = _next_up(tensors[OUT])
    one = _write(tmp_path / "one.safetensors", off)
    report = verify(ours, one, tolerance=1)
    assert report.passed and not report.identical and report.groups["OUT02"].max_ulps == 1.0
    assert report.groups["IN04"].max_ulps == 0 and "within 1 fp16 ulps" in report.verdict
    off[UNET] = _next_up(tensors[UNET], 5)
    five = _write(tmp_path / "five.safetensors", off)
    report = verify(ours, five, tolerance=1)
    assert not report.passed and report.groups["IN04"].over == 64
    assert "worst 5 in IN04" in report.verdict


def test_missing_and_extra_keys_fail(tmp_path, tensors):
    ours = _write(tmp_path / "a.safetensors", tensors)
    fewer = _write(tmp_path / "fewer.safetensors", {k: v for k, v in tensors.items() if k != UNET})
    report = verify(ours, fewer, tolerance=10)
    assert not report.passed and report.only_ours == [UNET] and "1 key(s) only in ours" in report.verdict
    reshaped = _write(tmp_path / "reshaped.safetensors", {**tensors, UNET: tensors[UNET].reshape(4, 16)})
    assert verify(ours, reshaped).shape_mismatch


def test_merge_verify_against_cli(tmp_path, capsys, make_ckpt):
    a, b = make_ckpt("sdxl", seed=1), make_ckpt("sdxl", seed=2)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"models: {{a: {a}, b: {b}}}\nsteps: {{mix: {{method: weighted_sum, a: a, b: b, "
                      "alpha: 0.3}}\n")
    first = tmp_path / "first.safetensors"
    with pytest.raises(SystemExit) as info:
        main(["-q", "merge", str(recipe), "-o", str(first)])
    assert info.value.code == 0
    capsys.readouterr()
    again = tmp_path / "again.safetensors"
    with pytest.raises(SystemExit) as info:
        main(["merge", str(recipe), "-o", str(again), "--verify-against", str(first), "--json"])
    out = capsys.readouterr()
    assert info.value.code == 0, out.err
    summary = json.loads(out.out)["verify"]
    assert summary["identical"] and summary["autov3_match"] and "bit-identical" in out.err
    tweaked = load_file(first)
    key = next(k for k in tweaked if k.startswith("model.diffusion_model.output_blocks.3"))
    tweaked[key] = tweaked[key] * 1.01
    published = tmp_path / "published.safetensors"
    save_file(tweaked, published)
    third = tmp_path / "third.safetensors"
    with pytest.raises(SystemExit) as info:
        main(["merge", str(recipe), "-o", str(third), "--verify-against", str(published)])
    err = capsys.readouterr().err
    assert info.value.code == 7 and "OUT03" in err and "NOT reproduced" in err and third.exists()
