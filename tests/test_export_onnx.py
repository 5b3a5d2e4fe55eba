"""`export --format onnx`: the folder layout and names optimum expects, the ONNX UNet equal to the PyTorch one within
1e-3 (relative), and (when optimum-onnx imports) `ORTStableDiffusion(XL)Pipeline.from_pretrained` loading and running
it with the latents of the diffusers pipeline.

SD1.5 runs by default; SDXL (its tiny UNet alone takes ~40 s to trace on a busy 2-core machine) is marked slow.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("onnx", reason="the [onnx] extra (onnx, onnxruntime) is not installed")
ort = pytest.importorskip("onnxruntime", reason="the [onnx] extra (onnx, onnxruntime) is not installed")

from mergekit_sdxl.export.onnx import export_onnx  # noqa: E402
from mergekit_sdxl.export.source import ExportSource, build_modules, load_module  # noqa: E402

PARTS = {"sd15": ["text_encoder", "unet", "vae_decoder", "vae_encoder"],
         "sdxl": ["text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder"]}
ARCHS = [pytest.param("sd15"), pytest.param("sdxl", marks=pytest.mark.slow)]


@pytest.fixture(scope="module")
def onnx_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {}


def _exported(arch: str, folders: dict[str, Path], tmp_path_factory: pytest.TempPathFactory, src: Path) -> Path:
    if arch not in folders:
        out = tmp_path_factory.mktemp("onnx") / arch
        report = export_onnx(src, out)
        assert report.format == "onnx" and report.dtype == "F32"
        folders[arch] = out
    return folders[arch]


@pytest.fixture(params=ARCHS)
def case(request: pytest.FixtureRequest, onnx_folders: dict[str, Path], tmp_path_factory: pytest.TempPathFactory,
         make_ckpt: object) -> tuple[str, Path, Path]:
    arch = request.param
    src = make_ckpt(arch, seed=0)
    return arch, src, _exported(arch, onnx_folders, tmp_path_factory, src)


def test_layout(case: tuple[str, Path, Path]) -> None:
    arch, _, folder = case
    parts = sorted(p.name for p in folder.iterdir() if (p / "model.onnx").is_file())
    assert parts == PARTS[arch]
    for part in parts:
        assert (folder / part / "config.json").is_file()
    for name in ("model_index.json", "scheduler/scheduler_config.json", "tokenizer/vocab.json"):
        assert (folder / name).is_file()
    session = ort.InferenceSession(str(folder / "unet" / "model.onnx"), providers=["CPUExecutionProvider"])
    inputs = [i.name for i in session.get_inputs()]
    extra = ["text_embeds", "time_ids"] if arch == "sdxl" else []
    assert inputs == ["sample", "timestep", "encoder_hidden_states", *extra]
    assert [o.name for o in session.get_outputs()] == ["out_sample"]
    te = ort.InferenceSession(str(folder / "text_encoder" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [o.name for o in te.get_outputs()][:2] == ["last_hidden_state", "pooler_output"]
    if arch == "sdxl":  # diffusers takes a text encoder's first output as the pooled embedding when it is 2-D
        te2 = ort.InferenceSession(str(folder / "text_encoder_2" / "model.onnx"), providers=["CPUExecutionProvider"])
        names = [o.name for o in te2.get_outputs()]
        assert names[:3] == ["text_embeds", "last_hidden_state", "hidden_states.0"] and len(names) == 2 + 33


def test_unet_matches_pytorch(case: tuple[str, Path, Path]) -> None:
    arch, src, folder = case
    with ExportSource(src, "fp32") as source:
        config = source.configs["unet"]
        unet = load_module(source, "unet", build_modules(source.configs)["unet"], torch.float32)
    g = torch.Generator().manual_seed(0)
    batch, size = 3, 24  # not the traced 2 x 16 x 16: the graph must be dynamic
    feeds = {"sample": torch.randn(batch, 4, size, size, generator=g), "timestep": torch.tensor(421.0),
             "encoder_hidden_states": torch.randn(batch, 77, config["cross_attention_dim"], generator=g)}
    added = None
    if arch == "sdxl":
        pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
        feeds["text_embeds"] = torch.randn(batch, pooled, generator=g)
        feeds["time_ids"] = torch.tensor([[96.0, 96, 0, 0, 96, 96]] * batch)
        added = {"text_embeds": feeds["text_embeds"], "time_ids": feeds["time_ids"]}
    with torch.no_grad():
        expected = unet(feeds["sample"], feeds["timestep"], feeds["encoder_hidden_states"], added_cond_kwargs=added,
                        return_dict=False)[0].numpy()
    session = ort.InferenceSession(str(folder / "unet" / "model.onnx"), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {k: v.numpy() for k, v in feeds.items()})
    rel = np.abs(got - expected).max() / np.abs(expected).max()
    assert got.shape == expected.shape
    assert rel < 1e-3, rel


def _optimum_pipelines() -> dict[str, type]:
    """optimum-onnx 0.1.0 (its only release) pins transformers < 4.58; on transformers 5 / diffusers 0.42 its
    pipeline imports and runs with four compatibility shims, applied here (only when the plain import fails)."""
    try:
        from optimum.onnxruntime import modeling_diffusion as md
    except ImportError:
        try:
            md = _import_with_shims()
        except ImportError as exc:
            pytest.skip(f"optimum-onnx is not usable here: {exc}")
    for cls in (md.ORTModelMixin, md.ORTVae):
        if not hasattr(cls, "modules"):
            cls.modules = lambda self: iter(())  # diffusers 0.42 walks modules() to find offload hooks
    return {"sdxl": md.ORTStableDiffusionXLPipeline, "sd15": md.ORTStableDiffusionPipeline}


def _import_with_shims() -> types.ModuleType:
    import transformers

    image_processor = transformers.CLIPImageProcessor  # this access may replace the module object
    sys.modules["transformers"].CLIPFeatureExtractor = image_processor
    import optimum.exporters

    # optimum's exporter needs transformers 4 internals; loading an exported folder never calls it
    stub = types.ModuleType("optimum.exporters.onnx")
    stub.main_export = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("optimum export unavailable"))
    sys.modules["optimum.exporters.onnx"] = stub
    optimum.exporters.onnx = stub
    for name in [m for m in sys.modules if m.startswith("optimum.onnxruntime")]:
        del sys.modules[name]
    from optimum.onnxruntime import modeling_diffusion

    return modeling_diffusion


def test_optimum_pipeline_loads_and_matches(case: tuple[str, Path, Path], tmp_path: Path) -> None:
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    from mergekit_sdxl.export.diffusers import export_diffusers

    arch, src, folder = case
    pipelines = _optimum_pipelines()
    ort_pipe = pipelines[arch].from_pretrained(folder, local_files_only=True)
    export_diffusers(src, tmp_path / "diffusers", dtype="fp32")
    cls = StableDiffusionXLPipeline if arch == "sdxl" else StableDiffusionPipeline
    torch_pipe = cls.from_pretrained(tmp_path / "diffusers", local_files_only=True)
    latents = []
    for pipe in (ort_pipe, torch_pipe):
        pipe.set_progress_bar_config(disable=True)
        pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="linspace")
        noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
        with torch.inference_mode():
            out = pipe("a photo of a cat", num_inference_steps=2, guidance_scale=5.0, height=64, width=64,
                       latents=noise, output_type="latent").images
        latents.append(torch.as_tensor(np.asarray(out)).float())
    rel = (latents[0] - latents[1]).abs().max() / latents[1].abs().max()
    assert rel < 1e-3, rel
