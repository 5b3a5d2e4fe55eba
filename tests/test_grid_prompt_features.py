"""`grid` with A1111 prompt features: the cell PNG's `parameters` carry what A1111 needs to reproduce it."""

from __future__ import annotations

import torch
from click.testing import CliRunner

from mergekit_sdxl.cli.main import cli


def test_grid_records_rng_schedule_lora_and_embeddings(tmp_path, tiny_sdxl, monkeypatch):
    from PIL import Image
    from safetensors.torch import save_file
    from test_sampler_prompt_render import _tiny_lora

    from mergekit_sdxl.sampler.models import ModelSlot, WeightSource

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    torch.set_num_threads(1)
    modules = ModelSlot().load(WeightSource.from_file(tiny_sdxl)).modules
    te1, te2 = (modules[k].config.hidden_size for k in ("text_encoder", "text_encoder_2"))
    (tmp_path / "emb").mkdir()
    (tmp_path / "lora").mkdir()
    save_file({"clip_l": torch.ones(1, te1), "clip_g": torch.ones(1, te2)}, str(tmp_path / "emb" / "shiny.safetensors"))
    _tiny_lora(tmp_path / "lora" / "style.safetensors", tiny_sdxl)
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, [
        "grid", "--models", str(tiny_sdxl), "-p", "a shiny cat, [day:night:0.5] <lora:style:0.8>", "-n", "lowres",
        "--seeds", "5", "--steps", "3", "--size", "64x64", "--device", "cpu", "--dtype", "fp32",
        "--sampler", "dpmpp_2m_sde", "--schedule", "karras", "--rng", "nv", "--embeddings", str(tmp_path / "emb"),
        "--lora-dir", str(tmp_path / "lora"), "-o", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    text = Image.open(out / "z00_y00_x00.png").info["parameters"]
    first, negative, fields = text.split("\n")
    assert first == "a shiny cat, [day:night:0.5] <lora:style:0.8>" and negative == "Negative prompt: lowres"
    for part in ("Sampler: DPM++ 2M SDE", "Schedule type: Karras", "RNG: NV", 'TI hashes: "shiny: ',
                 'Lora hashes: "style: ', "Steps: 3", "Seed: 5"):
        assert part in fields, (part, fields)


def test_grid_prompt_errors_are_usage_errors_before_loading(tmp_path, tiny_sdxl):
    from mergekit_sdxl.errors import PromptError, UsageError

    result = CliRunner().invoke(cli, ["grid", "--models", str(tiny_sdxl), "-p", "a [x:(cat:1.2.3):2]", "--steps", "4",
                                      "--device", "cpu", "-o", str(tmp_path / "o")])
    assert isinstance(result.exception, PromptError) and result.exception.exit_code == 2
    assert "at character 6" in str(result.exception) and not (tmp_path / "o").exists()
    result = CliRunner().invoke(cli, ["grid", "--models", str(tiny_sdxl), "--rng", "gpu", "--device", "cpu",
                                      "-o", str(tmp_path / "o")])
    assert isinstance(result.exception, UsageError) and "--rng gpu" in str(result.exception)
