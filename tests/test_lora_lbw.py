"""LoRA Block Weight vectors bake exactly the per-key scaling the lora-block-weight extension applies."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.numpy import load_file

from mergekit_sdxl.arch.lbw import BLOCKS26, LAYOUTS
from mergekit_sdxl.arch.lora_names import lora_modules
from mergekit_sdxl.cli.main import main
from mergekit_sdxl.io.reader import open_checkpoint
from mergekit_sdxl.io.writer import save_file
from mergekit_sdxl.lora.bake import AdapterSet, AdapterSpec
from tests.test_arch_lbw import extension_position


def _run(*args: object) -> int:
    with pytest.raises(SystemExit) as exc:
        main(["--quiet", *map(str, args)])
    return int(exc.value.code or 0)


def _shapes(path: Path) -> dict[str, tuple[int, ...]]:
    with open_checkpoint(path) as reader:
        return {k: tuple(reader.info(k).shape) for k in reader.keys()}


def _every_module_lora(ckpt: Path, out: Path, arch: str) -> Path:
    """A rank-1 kohya LoRA on every UNet and text-encoder module (attention, conv and the rest), alpha 1."""
    g = torch.Generator().manual_seed(11)
    tensors = {}
    for module in lora_modules(arch, _shapes(ckpt)):
        if not module.group:
            continue
        out_dim, fan_in = module.shape[0], math.prod(module.shape[1:])
        up = torch.randn(out_dim, 1, generator=g) * 0.1
        down = torch.randn(1, fan_in, generator=g) * 0.1
        if module.is_conv:
            up, down = up.reshape(out_dim, 1, 1, 1), down.reshape(1, *module.shape[1:])
        tensors |= {f"{module.name}.lora_up.weight": up, f"{module.name}.lora_down.weight": down,
                    f"{module.name}.alpha": torch.tensor(1.0)}
    save_file(tensors, out)
    return out


@pytest.mark.parametrize(("arch", "length"), [("sdxl", 12), ("sd15", 17)])
def test_lbw_bake_equals_explicit_per_key_scaling(make_ckpt, tmp_path, arch, length):
    base = make_ckpt(arch, seed=21, dtype="F32")
    lora = _every_module_lora(base, tmp_path / "all.safetensors", arch)
    values = [round(0.1 * (i + 2) * (-1) ** i, 2) for i in range(length)]  # distinct, some negative
    by_block = dict.fromkeys(BLOCKS26, 0.0) | dict(zip(LAYOUTS[length], values))
    baked = tmp_path / "baked.safetensors"
    assert _run("bake", base, lora, "-o", baked, "--strength", "0.7", "--blocks", ",".join(map(str, values)),
                "--dtype", "fp32") == 0
    got, original = load_file(baked), load_file(base)
    shapes = _shapes(base)
    changed = 0
    with AdapterSet([AdapterSpec(str(lora))], arch, shapes) as plain:
        for key in plain.keys():
            position = extension_position(key)
            factor = 1.0 if position is None else by_block[BLOCKS26[position]]
            want = torch.from_numpy(original[key]) + 0.7 * factor * plain.delta(key)
            torch.testing.assert_close(torch.from_numpy(got[key]), want, rtol=1e-5, atol=1e-6, msg=key)
            changed += factor != 0
    assert changed > 100
    untouched = set(original) - set(plain.keys())
    assert all((got[k] == original[k]).all() for k in untouched)


def test_lbw_preset_in_a_recipe_lora_step(make_ckpt, tmp_path):
    base = make_ckpt("sdxl", seed=21, dtype="F32")
    lora = _every_module_lora(base, tmp_path / "all.safetensors", "sdxl")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"models: {{a: {base}}}\nsteps:\n  output: {{lora: {lora}, model: a, blocks: MIDD}}\n")
    out = tmp_path / "out.safetensors"
    assert _run("merge", recipe, "-o", out, "--dtype", "fp32") == 0
    explicit = tmp_path / "explicit.safetensors"
    midd = "1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0"
    assert _run("bake", base, lora, "-o", explicit, "--blocks", midd, "--dtype", "fp32") == 0
    a, b = load_file(out), load_file(explicit)
    mid = "model.diffusion_model.middle_block.1.proj_in.weight"
    assert not (a[mid] == load_file(base)[mid]).all()  # MIDD keeps M00
    for key in b:
        torch.testing.assert_close(torch.from_numpy(a[key]), torch.from_numpy(b[key]), rtol=1e-6, atol=1e-7)


def test_random_lbw_values_are_refused(make_ckpt, tmp_path):
    base = make_ckpt("sdxl", seed=21, dtype="F32")
    lora = _every_module_lora(base, tmp_path / "all.safetensors", "sdxl")
    code = _run("bake", base, lora, "-o", tmp_path / "x.safetensors", "--blocks", "1,R,R,1,1,1,1,1,1,1,1,1")
    assert code != 0 and not (tmp_path / "x.safetensors").exists()
