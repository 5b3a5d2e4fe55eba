"""`mergekit-sdxl hash` and `mergekit-sdxl convert` on small hand-made checkpoints."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mergekit_sdxl.cli.main import main

UNET_W = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"
UNET_B = "model.diffusion_model.input_blocks.1.0.in_layers.2.bias"
POS_IDS = "conditioner.embedders.0.transformer.text_model.embeddings.position_ids"
EMA = "model_ema.diffusion_modelinput_blocks10in_layers2weight"


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MERGEKIT_SDXL_CACHE_DIR", str(tmp_path / "cache"))


def run_cli(capsys, *args: object) -> tuple[int, str, str]:
    """Run the real entry point (error mapping included); returns (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as info:
        main([str(a) for a in args])
    out = capsys.readouterr()
    return info.value.code, out.out, out.err


@pytest.fixture
def fp32_model(tmp_path) -> Path:
    g = torch.Generator().manual_seed(0)
    tensors = {
        UNET_W: torch.randn(8, 4, 3, 3, generator=g),
        UNET_B: torch.randn(8, generator=g),
        POS_IDS: torch.arange(77).unsqueeze(0),
        "conditioner.embedders.1.model.logit_scale": torch.tensor(4.6052),
        "first_stage_model.decoder.conv_in.weight": torch.randn(4, 4, 3, 3, generator=g) * 1000,
        EMA: torch.randn(8, 4, 3, 3, generator=g),
        "model_ema.num_updates": torch.tensor(1000, dtype=torch.int32),
    }
    path = tmp_path / "model.safetensors"
    save_file(tensors, path, metadata={"modelspec.title": "Test [v2]", "sshs_model_hash": "abc"})
    return path


def test_hash_text_and_json(tmp_path, capsys, fp32_model):
    other = tmp_path / "notes.bin"
    other.write_bytes(b"x" * 2_000_000)
    code, out, _ = run_cli(capsys, "hash", fp32_model, other)
    assert code == 0
    data = fp32_model.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    n = int.from_bytes(data[:8], "little")
    autov3 = hashlib.sha256(data[8 + n:]).hexdigest()
    lines = out.splitlines()
    assert lines[0].split() == ["legacy", "AutoV2", "AutoV3", "sha256", "file"]
    assert lines[1].split() == ["e3b0c442", sha[:10], autov3[:12], sha, str(fp32_model)]
    assert lines[2].split()[2] == "-"  # not safetensors: no AutoV3

    code, out, _ = run_cli(capsys, "hash", "--json", other, "--no-cache")
    assert code == 0
    [row] = json.loads(out)
    other_data = other.read_bytes()
    assert row == {"file": str(other), "size": 2_000_000,
                   "legacy": hashlib.sha256(other_data[0x100000:0x110000]).hexdigest()[:8],
                   "autov2": hashlib.sha256(other_data).hexdigest()[:10], "autov3": None, "autov3_full": None,
                   "sha256": hashlib.sha256(other_data).hexdigest()}


def test_hash_missing_file(tmp_path, capsys):
    code, _, err = run_cli(capsys, "hash", tmp_path / "nope.safetensors")
    assert code == 2 and "nope.safetensors" in err


def test_convert_fp16(tmp_path, capsys, fp32_model):
    out = tmp_path / "out.safetensors"
    code, _, err = run_cli(capsys, "convert", fp32_model, out, "--dtype", "fp16")
    assert code == 0, err
    src, dst = load_file(fp32_model), load_file(out)
    assert set(dst) == set(src)
    assert dst[POS_IDS].dtype == torch.int64 and torch.equal(dst[POS_IDS], src[POS_IDS])
    assert dst["model_ema.num_updates"].dtype == torch.int32
    for key in (UNET_W, UNET_B, EMA):
        assert dst[key].dtype == torch.float16 and torch.equal(dst[key], src[key].half())
    with safe_open(out, "pt") as f:
        meta = f.metadata()
    assert meta["modelspec.title"] == "Test [v2]" and "sshs_model_hash" not in meta
    info = json.loads(meta["mergekit.convert"])
    assert info["dtype"] == "F16" and info["source"] == "model.safetensors"
    assert info["removed_metadata"] == ["sshs_model_hash"]
    assert "warning" not in err


def test_convert_fp8_clamps_and_warns(tmp_path, capsys, fp32_model):
    out = tmp_path / "out.safetensors"
    code, _, err = run_cli(capsys, "convert", fp32_model, out, "--dtype", "fp8_e4m3fn")
    assert code == 0
    src, dst = load_file(fp32_model), load_file(out)
    vae = "first_stage_model.decoder.conv_in.weight"
    expected = int((src[vae].abs() > 448).sum())
    assert expected > 0
    assert f"warning: {expected} values in 1 tensors" in err and vae in err
    assert dst[vae].dtype == torch.float8_e4m3fn and dst[vae].float().abs().max() == 448
    assert dst[POS_IDS].dtype == torch.int64


def test_convert_scaled_fp8_and_back(tmp_path, capsys, fp32_model):
    """ComfyUI's layout: only UNet Linear weights scaled, the rest fp16, the marker under the UNet prefix (the
    full check against ComfyUI's loading rules is tests/test_scaled_fp8_comfyui.py)."""
    code, _, err = run_cli(capsys, "convert", fp32_model, tmp_path / "x.safetensors", "--dtype", "fp8_e4m3fn",
                           "--scaled-fp8")
    assert code == 2 and "no UNet Linear weights" in err and not (tmp_path / "x.safetensors").exists()
    g = torch.Generator().manual_seed(1)
    linear = "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight"
    src = {**load_file(fp32_model), linear: torch.randn(8, 8, generator=g) * 1000}
    model = tmp_path / "with_linear.safetensors"
    save_file(src, model)
    scaled = tmp_path / "scaled.safetensors"
    code, _, err = run_cli(capsys, "convert", model, scaled, "--dtype", "fp8_e4m3fn", "--scaled-fp8")
    assert code == 0, err
    assert "warning" not in err  # the scale keeps every value in range
    dst = load_file(scaled)
    vae = "first_stage_model.decoder.conv_in.weight"
    marker = dst["model.diffusion_model.scaled_fp8"]
    assert marker.dtype == torch.float8_e4m3fn and marker.numel() == 0 and "scaled_fp8" not in dst
    assert [k for k in dst if k.endswith("scale_weight")] == [linear.replace(".weight", ".scale_weight")]
    assert dst[linear].dtype == torch.float8_e4m3fn
    assert dst[vae].dtype == dst[UNET_W].dtype == dst[UNET_B].dtype == torch.float16  # the rest: plain fp16
    assert torch.equal(dst[vae], src[vae].half()) and dst[POS_IDS].dtype == torch.int64
    scale = dst[linear.replace(".weight", ".scale_weight")]
    assert scale.dtype == torch.float32 and scale.dim() == 0
    restored = dst[linear].float() * scale
    assert ((restored - src[linear]).norm() / src[linear].norm()).item() < 0.05

    back = tmp_path / "back.safetensors"
    code, _, err = run_cli(capsys, "convert", scaled, back, "--dtype", "fp16")
    assert code == 0, err
    again = load_file(back)
    assert set(again) == set(src)  # scales and the marker are consumed
    assert torch.equal(again[linear], restored.half()) and torch.equal(again[vae], src[vae].half())


def test_convert_reads_the_first_scaled_layout(tmp_path, capsys, fp32_model):
    """Files of this tool's first layout (top-level marker, convs and VAE scaled too) still convert back."""
    from mergekit_sdxl.io.dtypes import to_scaled_fp8

    src = load_file(fp32_model)
    vae = "first_stage_model.decoder.conv_in.weight"
    q, scale, _ = to_scaled_fp8(src[vae], "F8_E4M3")
    old = {**src, vae: q, vae.replace(".weight", ".scale_weight"): scale,
           "scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}
    path, back = tmp_path / "old.safetensors", tmp_path / "back.safetensors"
    save_file(old, path)
    code, _, err = run_cli(capsys, "convert", path, back, "--dtype", "fp32")
    assert code == 0, err
    again = load_file(back)
    assert set(again) == set(src) and torch.equal(again[vae], q.float() * scale)


def test_convert_prune_ema_and_drop(tmp_path, capsys, fp32_model):
    out = tmp_path / "out.safetensors"
    code, _, err = run_cli(capsys, "convert", fp32_model, out, "--dtype", "bf16", "--prune-ema",
                           "--drop", r"^first_stage_model\.", "--drop", "logit_scale$")
    assert code == 0, err
    assert set(load_file(out)) == {UNET_W, UNET_B, POS_IDS}
    with safe_open(out, "pt") as f:
        info = json.loads(f.metadata()["mergekit.convert"])
    assert info["prune_ema"] is True and info["dropped"] == 4


@pytest.mark.parametrize("args,code,message", [
    (["--dtype", "fp16", "--drop", "("], 2, "regular expression"),
    (["--dtype", "fp16", "--scaled-fp8"], 2, "fp8"),
    (["--dtype", "fp12"], 2, "fp12"),
])
def test_convert_usage_errors(tmp_path, capsys, fp32_model, args, code, message):
    got, _, err = run_cli(capsys, "convert", fp32_model, tmp_path / "out.safetensors", *args)
    assert got == code and message in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_convert_refuses_overwrites(tmp_path, capsys, fp32_model):
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"keep me")
    code, _, err = run_cli(capsys, "convert", fp32_model, out, "--dtype", "fp16")
    assert code == 6 and "already exists" in err and out.read_bytes() == b"keep me"
    code, _, err = run_cli(capsys, "convert", fp32_model, fp32_model, "--dtype", "fp16", "--overwrite")
    assert code == 6 and "input" in err
    assert load_file(fp32_model)[UNET_W].dtype == torch.float32
    code, _, _ = run_cli(capsys, "convert", fp32_model, out, "--dtype", "fp16", "--overwrite")
    assert code == 0 and load_file(out)[UNET_W].dtype == torch.float16


def test_convert_ckpt_input(tmp_path, capsys):
    src = tmp_path / "old.ckpt"
    tensors = {"model.diffusion_model.out.0.weight": torch.randn(4, 4), "cond_stage_model.pos": torch.arange(3)}
    torch.save({"state_dict": tensors, "global_step": 1}, src)
    out = tmp_path / "new.safetensors"
    code, _, err = run_cli(capsys, "convert", src, out, "--dtype", "fp16")
    assert code == 0, err
    dst = load_file(out)
    assert torch.equal(dst["model.diffusion_model.out.0.weight"], tensors["model.diffusion_model.out.0.weight"].half())
    assert dst["cond_stage_model.pos"].dtype == torch.int64


def test_convert_bad_input(tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\xff" * 64)
    code, _, err = run_cli(capsys, "convert", bad, tmp_path / "out.safetensors", "--dtype", "fp16")
    assert code == 4 and "bad.safetensors" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.safetensors"]


def test_convert_real_layout(tmp_path, capsys, tiny_sdxl):
    out = tmp_path / "xl.safetensors"
    code, _, err = run_cli(capsys, "convert", tiny_sdxl, out, "--dtype", "bf16")
    assert code == 0, err
    src, dst = load_file(tiny_sdxl), load_file(out)
    assert set(src) == set(dst)
    for key, t in src.items():
        assert dst[key].dtype == (torch.bfloat16 if t.is_floating_point() else t.dtype), key


def test_convert_peak_memory_is_about_one_tensor(tmp_path):
    """16 tensors of 16 MiB (256 MiB fp32): converting must not hold more than a couple of tensors."""
    src = tmp_path / "big.safetensors"
    save_file({f"t{i:02d}.weight": torch.full((4 << 20,), float(i)) for i in range(16)}, src)
    code = (
        "from mergekit_sdxl.cli.main import main\n"
        "import torch\n"
        "def status(field):\n"
        "    return int(next(l for l in open('/proc/self/status') if l.startswith(field)).split()[1]) // 1024\n"
        "open('/proc/self/clear_refs', 'w').write('5')  # reset the peak (VmHWM) to the current RSS\n"
        "base = status('VmRSS:')\n"
        "try:\n"
        f"    main(['-q', 'convert', {str(src)!r}, {str(tmp_path / 'out.safetensors')!r}, '--dtype', 'fp16'])\n"
        "except SystemExit as e:\n"
        "    assert e.code == 0, e.code\n"
        "print(status('VmHWM:') - base)\n"
    )
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux /proc to reset the peak RSS")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    grown_mib = int(result.stdout.strip().splitlines()[-1])
    assert grown_mib < 100, f"peak RSS grew by {grown_mib} MiB converting 256 MiB of 16 MiB tensors"
    assert load_file(tmp_path / "out.safetensors")["t15.weight"][0].item() == 15.0
