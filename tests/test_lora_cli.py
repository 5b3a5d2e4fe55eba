"""The four LoRA commands end to end on tiny checkpoints; resize and merge against their definitions."""

from __future__ import annotations

import json

import pytest
import torch

from mergekit_sdxl.arch.registry import arch_name
from mergekit_sdxl.cli.main import main
from mergekit_sdxl.io.reader import open_checkpoint
from mergekit_sdxl.lora.bake import AdapterSet, AdapterSpec


def _run(*args):
    with pytest.raises(SystemExit) as exc:
        main(["--quiet", *map(str, args)])
    return exc.value.code


@pytest.fixture(scope="module")
def sd15_pair(make_ckpt):
    base = make_ckpt("sd15", seed=0, dtype="F32")
    return base, make_ckpt(seed=5, like=base, delta="lowrank:3", dtype="F32")


@pytest.fixture(scope="module")
def shapes(sd15_pair):
    with open_checkpoint(sd15_pair[0]) as r:
        return {k: r.info(k).shape for k in r.keys()}


def _delta(path, shapes, key):
    with AdapterSet([AdapterSpec(str(path))], "sd15", shapes) as aset:
        return aset.delta(key)


KEY = "model.diffusion_model.input_blocks.1.1.proj_in.weight"  # a 1x1 conv on SD1.5
CONV = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"


def test_extract_bake_resize_merge(sd15_pair, shapes, tmp_path):
    base, tuned = sd15_pair
    lora = tmp_path / "a.safetensors"
    report = tmp_path / "report.json"
    assert _run("extract-lora", base, tuned, "-o", lora, "--rank", 8, "--conv-rank", 4, "--preset", "attn+conv",
                "--save-dtype", "fp32", "--report", report, "--no-hash") == 0
    rows = json.loads(report.read_text())
    assert rows["summary"]["components"]["unet"]["kept"] == 278
    keys = open_checkpoint(lora).keys()
    assert "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight" in keys  # diffusers names on SD1.5
    assert _run("extract-lora", base, tuned, "-o", lora) == 6  # exists, no --overwrite

    baked = tmp_path / "baked.safetensors"
    assert _run("bake", base, lora, "-o", baked, "--strength", 0.5) == 0
    with open_checkpoint(base) as rb, open_checkpoint(tuned) as rt, open_checkpoint(baked) as rk:
        want = rb.read(KEY) + 0.5 * (rt.read(KEY) - rb.read(KEY))
        torch.testing.assert_close(rk.read(KEY), want, rtol=1e-5, atol=1e-6)

    small = tmp_path / "small.safetensors"
    assert _run("resize-lora", lora, "-o", small, "--rank", 2, "--conv-rank", 2, "--save-dtype", "fp32",
                "--exact") == 0
    full, cut = _delta(lora, shapes, CONV), _delta(small, shapes, CONV)
    s = torch.linalg.svdvals(full.reshape(full.shape[0], -1).double())
    optimal = float(torch.sqrt((s[2:] ** 2).sum()))
    assert float((full - cut).double().norm()) == pytest.approx(optimal, rel=1e-4)

    merged = tmp_path / "merged.safetensors"
    assert _run("merge-lora", f"{lora}:0.25", f"{small}:1.5", "-o", merged, "--rank", 16, "--conv-rank", 16,
                "--save-dtype", "fp32", "--exact") == 0
    for key in (KEY, CONV):
        expect = 0.25 * _delta(lora, shapes, key) + 1.5 * _delta(small, shapes, key)
        torch.testing.assert_close(_delta(merged, shapes, key), expect, rtol=1e-4, atol=1e-6)


def test_mismatched_arch_exit_code(make_ckpt, sd15_pair, tmp_path):
    assert _run("extract-lora", make_ckpt("sdxl", seed=0), sd15_pair[0], "-o", tmp_path / "x.safetensors") == 4
    assert not (tmp_path / "x.safetensors").exists()


def test_sd15_lora_refused_on_sdxl(make_ckpt, sd15_pair, tmp_path):
    lora = tmp_path / "sd15.safetensors"
    assert _run("extract-lora", *sd15_pair, "-o", lora, "--rank", 2, "--text-encoders", "on") == 0
    assert _run("bake", make_ckpt("sdxl", seed=0), lora, "-o", tmp_path / "out.safetensors") == 4


@pytest.mark.parametrize("command", ["resize-lora", "merge-lora", "bake"])
def test_a_checkpoint_where_a_lora_belongs(command, sd15_pair, tmp_path, capsys):
    """One line saying the file is a checkpoint (exit 4), nothing written."""
    out = tmp_path / "out.safetensors"
    args = [sd15_pair[0], sd15_pair[1]] if command == "bake" else [sd15_pair[1]]
    for arch in ([], ["--arch", "sd15"]) if command == "resize-lora" else ([],):
        capsys.readouterr()
        assert _run(command, *args, *arch, "-o", out) == 4
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1
        assert f"{sd15_pair[1]}: is a checkpoint ({arch_name('sd15')}), not a LoRA/LyCORIS adapter" in err
        assert not out.exists()
