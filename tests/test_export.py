"""`export --format diffusers` on tiny real-layout checkpoints: the folder round-trips bit-exactly to the single file,
diffusers loads it with no network, its pipeline gives our sampler's latents, and a merge recipe takes it as an input.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from mergekit_sdxl.errors import OutputError, UsageError  # noqa: E402
from mergekit_sdxl.export.diffusers import export_diffusers  # noqa: E402
from mergekit_sdxl.io.diffusers_folder import DiffusersFolderReader  # noqa: E402
from mergekit_sdxl.io.reader import open_checkpoint  # noqa: E402

UNMAPPED = {
    "sdxl": {"conditioner.embedders.0.transformer.text_model.embeddings.position_ids",
             "conditioner.embedders.1.model.logit_scale"},
    "sd15": {"cond_stage_model.transformer.text_model.embeddings.position_ids"},
}
FILES = {
    "sdxl": ["model_index.json", "scheduler/scheduler_config.json", "unet/config.json",
             "unet/diffusion_pytorch_model.safetensors", "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
             "text_encoder/config.json", "text_encoder/model.safetensors", "text_encoder_2/config.json",
             "text_encoder_2/model.safetensors", "tokenizer/vocab.json", "tokenizer/merges.txt",
             "tokenizer/tokenizer_config.json", "tokenizer_2/vocab.json", "tokenizer_2/tokenizer_config.json"],
}
FILES["sd15"] = [f for f in FILES["sdxl"] if "_2/" not in f]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, tiny_sdxl: Path, tiny_sd15: Path) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("export")
    out = {}
    for arch, src in (("sdxl", tiny_sdxl), ("sd15", tiny_sd15)):
        report = export_diffusers(src, folder / arch, dtype="fp16")
        assert report.arch == arch
        assert set(report.unmapped) == UNMAPPED[arch]
        assert report.filled == [] and report.clamped == 0
        out[arch] = folder / arch
    return out


@pytest.mark.parametrize("arch", ["sdxl", "sd15"])
def test_folder_layout(exported: dict[str, Path], arch: str) -> None:
    for name in FILES[arch]:
        assert (exported[arch] / name).is_file(), name
    assert not any(p.name.endswith(".mergekit-tmp") for p in exported[arch].parent.iterdir())


@pytest.mark.parametrize("arch", ["sdxl", "sd15"])
def test_round_trip_is_bit_exact(exported: dict[str, Path], arch: str, tiny_sdxl: Path, tiny_sd15: Path) -> None:
    src = tiny_sdxl if arch == "sdxl" else tiny_sd15
    with open_checkpoint(src) as original, DiffusersFolderReader(exported[arch]) as folder:
        assert set(original.keys()) - set(folder.keys()) == UNMAPPED[arch]
        assert set(folder.keys()) <= set(original.keys())
        for key in folder.keys():
            a, b = original.read(key), folder.read(key)
            assert a.dtype == b.dtype and a.shape == b.shape, key
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), key


def test_tokenizers(exported: dict[str, Path]) -> None:
    from transformers import CLIPTokenizer

    t1 = CLIPTokenizer.from_pretrained(exported["sdxl"] / "tokenizer", local_files_only=True)
    t2 = CLIPTokenizer.from_pretrained(exported["sdxl"] / "tokenizer_2", local_files_only=True)
    ids = t1("a photo of a cat", padding="max_length", max_length=77).input_ids
    assert ids[:8] == [49406, 320, 1125, 539, 320, 2368, 49407, 49407]
    assert t2("a photo of a cat", padding="max_length", max_length=77).input_ids[:8] == ids[:7] + [0]


def _sampler_latents(src: Path, prompt: str, steps: int, cfg: float, size: int, seed: int) -> torch.Tensor:
    from mergekit_sdxl.sampler.models import ModelSlot, WeightSource
    from mergekit_sdxl.sampler.pipeline import GenParams, Renderer

    model = ModelSlot(dtype=torch.float32).load(WeightSource.from_file(src))
    params = GenParams(prompt=prompt, steps=steps, cfg=cfg, sampler="euler", schedule="normal", width=size,
                       height=size)
    return Renderer(model).sample(params, [seed])


def _diffusers_latents(folder: Path, arch: str, prompt: str, steps: int, cfg: float, size: int,
                       seed: int) -> torch.Tensor:
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    from mergekit_sdxl.sampler.noise import ImageNoise

    cls = StableDiffusionXLPipeline if arch == "sdxl" else StableDiffusionPipeline
    pipe = cls.from_pretrained(folder, dtype=torch.float32, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="linspace")
    noise = ImageNoise([seed], (4, size // 8, size // 8)).draw()
    with torch.inference_mode():
        return pipe(prompt, num_inference_steps=steps, guidance_scale=cfg, height=size, width=size, latents=noise,
                    output_type="latent").images


@pytest.mark.parametrize("arch", ["sdxl", "sd15"])
def test_pipeline_matches_sampler(exported: dict[str, Path], arch: str, tiny_sdxl: Path, tiny_sd15: Path) -> None:
    """Euler, linspace spacing (k-diffusion's "normal"), same noise: the same latents. 2 steps (999, 0) keep the
    timesteps integers, where diffusers' linear sigma interpolation equals k-diffusion's log-linear one; the slow
    variant takes 10 (999, 888, ..., 0)."""
    _compare(arch, exported[arch], tiny_sdxl if arch == "sdxl" else tiny_sd15, steps=2)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["sdxl", "sd15"])
def test_pipeline_matches_sampler_10_steps(exported: dict[str, Path], arch: str, tiny_sdxl: Path,
                                          tiny_sd15: Path) -> None:
    _compare(arch, exported[arch], tiny_sdxl if arch == "sdxl" else tiny_sd15, steps=10)


def _compare(arch: str, folder: Path, src: Path, steps: int) -> None:
    settings = {"prompt": "a photo of a cat", "steps": steps, "cfg": 5.0, "size": 64, "seed": 3}
    ours = _sampler_latents(src, **settings)
    theirs = _diffusers_latents(folder, arch, **settings)
    assert ours.shape == theirs.shape == (1, 4, 8, 8)
    # float32 rounding differs (diffusers: sigmas from float32 alphas at integer t; ours: log-sigma interpolation at
    # t = 998.9999...); the tiny random models give latents up to ~130, the differences stay ~6e-6 of that
    rel = (theirs.float() - ours).abs().max() / ours.abs().max()
    assert rel < 1e-4, rel


def test_merge_takes_exported_folder(exported: dict[str, Path], tiny_sdxl: Path, tmp_path: Path) -> None:
    from mergekit_sdxl.engine.run import MergeOptions, run_merge
    from mergekit_sdxl.recipe.load import load_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text("arch: sdxl\nmodels:\n  a: a.safetensors\n  b: b\nsteps:\n  output:\n"
                      "    method: weighted_sum\n    a: a\n    b: b\n    alpha: 0.5\n"
                      "output:\n  path: out.safetensors\n  dtype: fp16\n  missing_keys: take_first\n")
    # the folder has no logit_scale / position_ids (no diffusers equivalent): take them from the single file
    loaded = load_recipe(recipe, {"a": str(tiny_sdxl), "b": str(exported["sdxl"])})
    result = run_merge(loaded, MergeOptions(out=tmp_path / "out.safetensors"))
    with open_checkpoint(result.path) as merged, open_checkpoint(tiny_sdxl) as a:
        key = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"
        assert torch.equal(merged.read(key), a.read(key))  # the same model twice: weighted_sum is exact
        qkv = "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"
        assert torch.equal(merged.read(qkv), a.read(qkv))


def test_refusals(exported: dict[str, Path], tiny_sdxl: Path, tmp_path: Path) -> None:
    with pytest.raises(OutputError, match="already exists"):
        export_diffusers(tiny_sdxl, exported["sdxl"])
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="not written by mergekit-sdxl"):
        export_diffusers(tiny_sdxl, plain, overwrite=True)
    assert (plain / "notes.txt").read_text() == "mine"
    with pytest.raises(UsageError, match="fp8"):
        export_diffusers(tiny_sdxl, tmp_path / "x", dtype="fp8_e4m3fn")
    assert not (tmp_path / "x").exists()


def test_dtype_and_overwrite(tiny_sd15: Path, tmp_path: Path) -> None:
    out = tmp_path / "f32"
    export_diffusers(tiny_sd15, out, dtype="fp16")
    report = export_diffusers(tiny_sd15, out, dtype="fp32", overwrite=True)
    assert report.dtype == "F32"
    with DiffusersFolderReader(out) as folder, open_checkpoint(tiny_sd15) as original:
        key = "model.diffusion_model.out.2.weight"
        assert folder.info(key).dtype == "F32"
        assert torch.equal(folder.read(key), original.read(key).float())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f32"]


def test_cli(tiny_sd15: Path, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from mergekit_sdxl.cli.main import cli

    out = tmp_path / "cli"
    result = CliRunner().invoke(cli, ["export", str(tiny_sd15), "--format", "diffusers", "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert '"arch": "sd15"' in result.output
    again = CliRunner().invoke(cli, ["export", str(tiny_sd15), "-o", str(out)])
    assert again.exit_code != 0


def test_markers(make_ckpt: object, tmp_path: Path) -> None:
    from mergekit_sdxl.errors import CheckpointError
    from mergekit_sdxl.export.folder import scheduler_config

    config = scheduler_config("sdxl", ("v_pred", "ztsnr"))
    assert config["prediction_type"] == "v_prediction" and config["rescale_betas_zero_snr"] is True
    assert config["timestep_spacing"] == "trailing"
    assert scheduler_config("sd15", ())["_class_name"] == "PNDMScheduler"
    assert scheduler_config("sd15", ("ztsnr",))["_class_name"] == "EulerDiscreteScheduler"
    with pytest.raises(CheckpointError, match="EDM"):
        export_diffusers(make_ckpt("sdxl", seed=0, include_optional=("markers",)), tmp_path / "edm")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("marker", ["model.diffusion_model.scaled_fp8", "scaled_fp8"], ids=["comfyui", "first"])
def test_scaled_fp8_input(tiny_sd15: Path, tmp_path: Path, marker: str) -> None:
    """ComfyUI's layout (and this tool's first one, marker at the top level): scaled weights are dequantized, the
    marker and the scales are left out."""
    from safetensors.torch import load_file, save_file

    from mergekit_sdxl.engine.convert import convert_checkpoint
    from mergekit_sdxl.io.dtypes import dequantize_scaled

    fp8 = tmp_path / "fp8.safetensors"
    with open_checkpoint(tiny_sd15) as reader:
        convert_checkpoint(reader, fp8, "fp8_e4m3fn", scaled_fp8=True)
    tensors = load_file(fp8)
    tensors[marker] = tensors.pop("model.diffusion_model.scaled_fp8")
    save_file(tensors, fp8)
    report = export_diffusers(fp8, tmp_path / "out", dtype="fp16")
    assert marker in report.unmapped
    key = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    with open_checkpoint(fp8) as src, DiffusersFolderReader(tmp_path / "out") as folder:
        assert src.info(key).dtype == "F8_E4M3"
        expected = dequantize_scaled(src.read(key), src.read(key.replace(".weight", ".scale_weight")), "F16")
        assert torch.equal(folder.read(key), expected)
