"""Scaled-fp8 files as ComfyUI loads them: an independent re-implementation of ComfyUI's detection and
dequantisation rules (read from its source, written out here without using mergekit_sdxl's layout code) is applied
to our `convert --scaled-fp8` and `fp8_scaled: true` outputs, and the weights ComfyUI would compute with are compared
with the fp16 original.

ComfyUI's rules, both generations:
- v0.3.x (`model_detection.model_config_from_unet`, `ops.scaled_fp8_ops`): the marker is looked up as
  `<unet prefix>scaled_fp8` (`model.diffusion_model.scaled_fp8`); its dtype is the fp8 format (float32 means
  e4m3fn). Then every Linear of the diffusion model is created in that fp8 dtype, the stored weight is copied into
  it (`.to(fp8)`), a 0-dim float32 `scale_weight` parameter (default 1) takes `<layer>.scale_weight`, and the
  layer computes with `weight.to(compute) * scale_weight.to(compute)`. Every other module keeps its plain weight,
  cast to the compute dtype; a `scale_weight` beside it is an unexpected key, ignored.
- v0.8 (`utils.convert_old_quants` + `ops.mixed_precision_ops`): with the same marker, each `<layer>.scale_weight`
  under the prefix becomes `<layer>.weight_scale` with `comfy_quant = {"format": "float8_e4m3fn"}`; only Linear
  layers read it: `weight.to(float8_e4m3fn)` dequantised as `q.to(float32) * scale`, then used in the compute dtype.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mergekit_sdxl.cli.main import main

PREFIX = "model.diffusion_model."
COMPUTE = torch.float16
# The Linear layers of ComfyUI's UNet (ldm openaimodel.py / attention.py): timestep and label embeddings, each
# ResBlock's emb_layers.1, every attention projection, the GEGLU and output of each feed-forward, and the
# SpatialTransformer's proj_in/proj_out when `use_linear_in_transformer` (detected from proj_in's shape, as
# ComfyUI's detect_unet_config does); everything else in the UNet is a conv or a norm.
LINEAR = re.compile(r"(time_embed\.[02]|label_emb\.0\.[02]|emb_layers\.1|attn[12]\.to_(q|k|v|out\.0)|"
                    r"ff\.net\.(0\.proj|2))\.weight$")
PROJ = re.compile(r"\.proj_(in|out)\.weight$")


def run_cli(*argv: object) -> int:
    try:
        main(["--quiet", *map(str, argv)])
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def comfy_linear_layers(sd: dict[str, torch.Tensor]) -> set[str]:
    """The `.weight` keys of the diffusion model's Linear layers, as ComfyUI builds the UNet."""
    proj_in = next(k for k in sd if k.startswith(PREFIX) and k.endswith(".1.proj_in.weight"))
    use_linear = sd[proj_in].dim() == 2
    return {k for k in sd if k.startswith(PREFIX) and (LINEAR.search(k) or (use_linear and PROJ.search(k)))}


def comfy_v03(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    marker = sd.get(PREFIX + "scaled_fp8")
    fp8 = None if marker is None else (torch.float8_e4m3fn if marker.dtype == torch.float32 else marker.dtype)
    linear = comfy_linear_layers(sd) if fp8 is not None else set()
    out = {}
    for key, value in sd.items():
        if key.endswith((".scale_weight", ".scale_input")) or key == PREFIX + "scaled_fp8":
            continue
        if key in linear:
            assert fp8 is not None
            scale = sd.get(key[: -len("weight")] + "scale_weight", torch.ones((), dtype=torch.float32))
            assert scale.shape == () and scale.dtype == torch.float32  # a 0-dim float32 parameter
            out[key] = value.to(fp8).to(COMPUTE) * scale.to(COMPUTE)
        else:
            out[key] = value.to(COMPUTE) if value.is_floating_point() else value
    return out


def comfy_v08(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    sd = dict(sd)
    quant: set[str] = set()
    if sd.pop(PREFIX + "scaled_fp8", None) is not None:  # convert_old_quants
        for key in [k for k in sd if k.startswith(PREFIX) and k.endswith(".scale_weight")]:
            layer = key[: -len(".scale_weight")]
            sd[layer + ".weight_scale"] = sd.pop(key)
            quant.add(layer)
    linear = comfy_linear_layers(sd)
    out = {}
    for key, value in sd.items():
        if key.endswith((".weight_scale", ".scale_weight", ".scale_input")):
            continue  # read by their Linear layer below, else unexpected keys
        layer = key[: -len(".weight")]
        if key in linear and layer in quant:
            q = value.to(torch.float8_e4m3fn)
            out[key] = (q.to(torch.float32) * sd[layer + ".weight_scale"]).to(COMPUTE)
        else:
            out[key] = value.to(COMPUTE) if value.is_floating_point() else value
    return out


def assert_loads_as(original: dict[str, torch.Tensor], effective: dict[str, torch.Tensor],
                    stored: dict[str, torch.Tensor]) -> None:
    """Scaled weights within fp8 rounding of the original; every other tensor equal to it."""
    linear = comfy_linear_layers(original)
    assert set(effective) == set(original)
    for key, want in original.items():
        got = effective[key]
        if key not in linear or not want.is_floating_point():
            assert torch.equal(got, want.to(got.dtype)), key
            continue
        scale = stored[key[: -len("weight")] + "scale_weight"].item()
        w, g = want.double(), got.double()
        # e4m3fn: 3 mantissa bits (half-ulp 2^-4 relative), subnormal step 2^-9 (in units of the scale);
        # then the fp16 product rounds once more
        bound = w.abs() * (2.0**-4 + 2.0**-10) + scale * 2.0**-10 + 2.0**-24
        assert bool(((g - w).abs() <= bound).all()), key


def check_layout(original: dict[str, torch.Tensor], stored: dict[str, torch.Tensor]) -> None:
    """ComfyUI's layout exactly: marker key/dtype/shape, a 0-dim float32 scale per UNet Linear weight and nowhere
    else, those weights in e4m3fn and every other float tensor in fp16."""
    linear = comfy_linear_layers(original)
    marker = stored[PREFIX + "scaled_fp8"]
    assert marker.dtype == torch.float8_e4m3fn and tuple(marker.shape) == (0,)
    scales = {k for k in stored if k.endswith(".scale_weight")}
    assert scales == {k[: -len("weight")] + "scale_weight" for k in linear}
    assert set(stored) == set(original) | scales | {PREFIX + "scaled_fp8"}
    for key, value in original.items():
        if not value.is_floating_point():
            assert stored[key].dtype == value.dtype
        else:
            assert stored[key].dtype == (torch.float8_e4m3fn if key in linear else torch.float16), key


@pytest.mark.parametrize("loader", [comfy_v03, comfy_v08], ids=["comfyui-0.3", "comfyui-0.8"])
@pytest.mark.parametrize("arch", ["sdxl", "sd15"])
def test_convert_scaled_fp8_loads_in_comfyui(make_ckpt: Callable[..., Path], tmp_path: Path, arch: str,
                                             loader: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]],
                                             ) -> None:
    src = make_ckpt(arch)
    out = tmp_path / "scaled.safetensors"
    assert run_cli("convert", src, out, "--dtype", "fp8_e4m3fn", "--scaled-fp8") == 0
    original, stored = load_file(src), load_file(out)
    assert comfy_linear_layers(original)  # the rule finds the Linear layers of the real key set
    check_layout(original, stored)
    assert_loads_as(original, loader(stored), stored)


@pytest.mark.parametrize("loader", [comfy_v03, comfy_v08], ids=["comfyui-0.3", "comfyui-0.8"])
def test_merge_fp8_scaled_loads_in_comfyui(tiny_sdxl_family: dict[str, Path], tmp_path: Path,
                                           loader: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]],
                                           ) -> None:
    a, b = list(tiny_sdxl_family.values())[:2]
    recipe = tmp_path / "r.yaml"
    text = (f"models: {{a: {a}, b: {b}}}\nsteps:\n  output: {{method: weighted_sum, a: a, b: b, alpha: 0.3}}\n"
            "output: {dtype: DTYPE, fp8_scaled: SCALED}\n")
    plain, scaled = tmp_path / "plain.safetensors", tmp_path / "scaled.safetensors"
    recipe.write_text(text.replace("DTYPE", "fp16").replace("SCALED", "false"))
    assert run_cli("merge", recipe, "-o", plain) == 0
    recipe.write_text(text.replace("DTYPE", "fp8_e4m3fn").replace("SCALED", "true"))
    assert run_cli("merge", recipe, "-o", scaled) == 0
    original, stored = load_file(plain), load_file(scaled)
    check_layout(original, stored)
    assert_loads_as(original, loader(stored), stored)


def test_the_old_top_level_marker_is_not_seen_by_comfyui(tiny_sdxl: Path, tmp_path: Path) -> None:
    """The emulation detects what ComfyUI detects: the same file with the marker at the top level (this tool's
    first layout) is computed with raw fp8 values, far from the original."""
    out = tmp_path / "scaled.safetensors"
    assert run_cli("convert", tiny_sdxl, out, "--dtype", "fp8_e4m3fn", "--scaled-fp8") == 0
    stored = load_file(out)
    stored["scaled_fp8"] = stored.pop(PREFIX + "scaled_fp8")
    with pytest.raises(AssertionError):
        assert_loads_as(load_file(tiny_sdxl), comfy_v03(stored), stored)


def test_scaled_fp8_refusals(tiny_sdxl: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """e5m2 would be read as e4m3fn by ComfyUI 0.8: refused, for convert and for a recipe (also via --dtype)."""
    out = tmp_path / "x.safetensors"
    assert run_cli("convert", tiny_sdxl, out, "--dtype", "fp8_e5m2", "--scaled-fp8") == 2
    assert "--scaled-fp8 needs --dtype fp8_e4m3fn" in capsys.readouterr().err and not out.exists()
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"models: {{a: {tiny_sdxl}}}\nsteps:\n  output: a\n"
                      "output: {dtype: fp8_e4m3fn, fp8_scaled: true}\n")
    assert run_cli("merge", recipe, "-o", out, "--dtype", "fp16") == 3
    assert "output.fp8_scaled needs dtype fp8_e4m3fn" in capsys.readouterr().err and not out.exists()
    recipe.write_text(recipe.read_text().replace("fp8_e4m3fn", "fp8_e5m2"))
    assert run_cli("merge", recipe, "-o", out) == 3
    assert "output.fp8_scaled: applies only to fp8_e4m3fn" in capsys.readouterr().err and not out.exists()


def test_merge_refuses_scaled_inputs(tiny_sdxl: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """fp8 codes and their scales are not weights to average: a scaled input is refused with the way out."""
    scaled, out = tmp_path / "scaled.safetensors", tmp_path / "out.safetensors"
    assert run_cli("convert", tiny_sdxl, scaled, "--dtype", "fp8_e4m3fn", "--scaled-fp8") == 0
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"models: {{a: {tiny_sdxl}, b: {scaled}}}\nsteps:\n  output: {{method: weighted_sum, "
                      "a: a, b: b, alpha: 0.5}\n")
    code = run_cli("merge", recipe, "-o", out)
    err = capsys.readouterr().err
    assert code != 0 and "scaled-fp8 file" in err and "convert" in err and not out.exists()
