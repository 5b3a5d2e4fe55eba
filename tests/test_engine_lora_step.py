"""Recipe LoRA steps (`{lora: FILE, model: NAME, strength, te_strength, blocks}`) through the merge engine."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from mergekit_sdxl.cli.main import main
from mergekit_sdxl.io.writer import save_file

UNET_KEY = "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight"
OUT_KEY = "model.diffusion_model.output_blocks.2.1.transformer_blocks.0.attn2.to_v.weight"
TE_KEY = "conditioner.embedders.0.transformer.text_model.encoder.layers.3.mlp.fc1.weight"


def run_cli(*argv: object) -> int:
    try:
        main(["--quiet", *map(str, argv)])
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def kohya_name(key: str) -> str:
    from mergekit_sdxl.arch.lora_names import lora_modules
    from mergekit_sdxl.arch.tables import key_table

    modules = lora_modules("sdxl", {k: v.shape for k, v in key_table("sdxl").items()})
    return next(m.name for m in modules if m.key == key)


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory: pytest.TempPathFactory, tiny_sdxl: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """A hand-made rank-2 kohya LoRA on three modules (UNet IN04, UNet OUT02, te1), alpha 1 (scale 1/2)."""
    shapes = {k: v.shape for k, v in load_file(tiny_sdxl).items()}
    g = torch.Generator().manual_seed(5)
    tensors, deltas = {}, {}
    for key in (UNET_KEY, OUT_KEY, TE_KEY):
        out_dim, in_dim = shapes[key]
        up, down = torch.randn(out_dim, 2, generator=g) * 0.1, torch.randn(2, in_dim, generator=g) * 0.1
        name = kohya_name(key)
        tensors |= {f"{name}.lora_up.weight": up, f"{name}.lora_down.weight": down,
                    f"{name}.alpha": torch.tensor(1.0)}
        deltas[key] = (up @ down) * 0.5
    path = tmp_path_factory.mktemp("lora") / "hand.safetensors"
    save_file(tensors, path)
    return path, deltas


def _merge(tmp_path: Path, base: Path, lora: Path, extra: str = "") -> dict[str, np.ndarray]:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"models: {{a: {base}}}\nsteps:\n  output: {{lora: {lora}, model: a{extra}}}\n")
    out = tmp_path / "out.safetensors"
    assert run_cli("merge", recipe, "-o", out, "--dtype", "fp32") == 0
    return load_file(out)


def test_lora_step_adds_the_closed_form_delta(tiny_sdxl: Path, lora_file: tuple[Path, dict], tmp_path: Path) -> None:
    path, deltas = lora_file
    base = load_file(tiny_sdxl)
    got = _merge(tmp_path, tiny_sdxl, path, ", strength: 0.8, te_strength: 0.3")
    for key, delta in deltas.items():
        factor = 0.3 if key == TE_KEY else 0.8
        want = base[key].astype(np.float32) + factor * delta.numpy()
        np.testing.assert_allclose(got[key], want, rtol=1e-6, atol=1e-6)
    untouched = "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_k.weight"
    np.testing.assert_array_equal(got[untouched], base[untouched].astype(np.float32))


def test_lora_step_block_weights_touch_only_their_block(tiny_sdxl: Path, lora_file: tuple[Path, dict],
                                                       tmp_path: Path) -> None:
    path, deltas = lora_file
    base = load_file(tiny_sdxl)
    vector = "[" + ",".join(["1"] + ["0"] * 4 + ["1"] + ["0"] * 14) + "]"  # BASE and IN04 on, everything else off
    got = _merge(tmp_path, tiny_sdxl, path, f", blocks: {vector}")
    np.testing.assert_allclose(got[UNET_KEY], base[UNET_KEY] + deltas[UNET_KEY].numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got[TE_KEY], base[TE_KEY] + deltas[TE_KEY].numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(got[OUT_KEY], base[OUT_KEY].astype(np.float32))


def test_lora_for_the_wrong_architecture_fails_before_reading(tiny_sd15: Path, lora_file: tuple[Path, dict],
                                                             tmp_path: Path) -> None:
    path, _ = lora_file
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"models: {{a: {tiny_sd15}}}\nsteps:\n  output: {{lora: {path}, model: a}}\n")
    out = tmp_path / "out.safetensors"
    assert run_cli("merge", recipe, "-o", out) in (3, 4)
    assert not out.exists()


def test_grid_recipe_variants_run_lora_steps(tiny_sdxl: Path, lora_file: tuple[Path, dict], tmp_path: Path) -> None:
    """`grid --recipe` merges its variants in memory through lora.steps, so a LoRA step works there too (the engine
    alone refuses it: it cannot open adapters)."""
    from mergekit_sdxl.recipe.load import load_recipe
    from mergekit_sdxl.sampler.gridmodels import merge_in_memory

    path, deltas = lora_file
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"models: {{a: {tiny_sdxl}}}\nsteps:\n  output: {{lora: {path}, model: a, strength: 0.5}}\n"
                      "output: {dtype: fp32}\n")
    source = merge_in_memory(load_recipe(recipe), "variant", "cpu")
    base = load_file(tiny_sdxl)[UNET_KEY].astype(np.float32)
    np.testing.assert_allclose(source.read(UNET_KEY).numpy(), base + 0.5 * deltas[UNET_KEY].numpy(),
                               rtol=1e-6, atol=1e-6)
