"""`export --format onnx`: the folder layout and input/output names optimum's ORT pipelines expect, and the ONNX UNet
equal to the PyTorch one within 1e-3 (relative), run with onnxruntime. (optimum-onnx itself is not a test
dependency: its only release pins transformers < 4.58, which this project's environment does not have.)

SD1.5 runs by default; SDXL (its tiny UNet alone takes ~40 s to trace on a busy 2-core machine) is marked slow.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort  # the test extra installs onnx and onnxruntime: a missing one is a failure, not a skip
import pytest
import torch

from mergekit_sdxl.export.onnx import export_onnx
from mergekit_sdxl.export.source import ExportSource, build_modules, load_module

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
