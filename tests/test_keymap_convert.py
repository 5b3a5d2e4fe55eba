"""io/keyconvert.py round trips and io/diffusers_folder.py: a diffusers folder read back as LDM keys."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mergekit_sdxl.arch.keymap import PREFIXES, build_keymap
from mergekit_sdxl.arch.tables import key_table
from mergekit_sdxl.errors import ArchError, CheckpointError
from mergekit_sdxl.io.diffusers_folder import DiffusersFolderReader, folder_arch, open_diffusers_folder
from mergekit_sdxl.io.keyconvert import (
    diffusers_to_ldm,
    expected_diffusers_keys,
    ldm_to_diffusers,
    to_diffusers_tensor,
)
from mergekit_sdxl.io.reader import open_checkpoint

ARCHS = ("sdxl", "sd15")
FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _shrink(d: int) -> int:
    return d // 128 if d >= 128 else d


def fake_state_dict(arch: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Every key of the real table with proper ranks, small shapes, random values and mixed dtypes."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for n, (key, info) in enumerate(key_table(arch).items()):
        shape = tuple(_shrink(d) for d in info.shape)
        if info.dtype.startswith("int"):
            out[key] = torch.randint(0, 1000, shape, generator=gen, dtype=getattr(torch, info.dtype))
        else:
            out[key] = torch.randn(shape, generator=gen).to(FLOATS[n % 3])
    return out


def mapped_part(arch: str, sd: dict) -> dict:
    unmapped = set(build_keymap(arch, sd).unmapped_keys)
    return {k: v for k, v in sd.items() if k not in unmapped}


def assert_equal_dicts(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("style", ["flat", "text_model"])
@pytest.mark.parametrize("arch", ARCHS)
def test_round_trip_is_bit_exact(arch, style):
    sd = fake_state_dict(arch)
    components = ldm_to_diffusers(arch, sd, clip_l_style=style)
    assert set(components) == set(PREFIXES[arch])
    back = diffusers_to_ldm(arch, components)
    assert_equal_dicts(back, mapped_part(arch, sd))
    again = ldm_to_diffusers(arch, back, clip_l_style=style)
    for c in components:
        assert_equal_dicts(again[c], components[c])


def test_ops():
    w = torch.arange(24.0).reshape(6, 4).to(torch.bfloat16)
    q, k, v = (to_diffusers_tensor(f"qkv{i}", w) for i in range(3))
    assert torch.equal(torch.cat([q, k, v]), w) and q.dtype == torch.bfloat16
    assert q.untyped_storage().data_ptr() != w.untyped_storage().data_ptr()  # no shared storage for writers
    assert torch.equal(to_diffusers_tensor("transpose", w[:4]), w[:4].T)
    conv = torch.randn(5, 5, 1, 1)
    assert to_diffusers_tensor("conv1x1_to_linear", conv).shape == (5, 5)
    assert to_diffusers_tensor("conv1x1_to_linear", conv[:, :, 0, 0]).shape == (5, 5)  # already linear
    with pytest.raises(CheckpointError, match="1x1"):
        to_diffusers_tensor("conv1x1_to_linear", torch.randn(5, 5, 3, 3), "k")
    with pytest.raises(CheckpointError, match="divisible by 3"):
        to_diffusers_tensor("qkv0", torch.randn(4, 2), "k")
    with pytest.raises(CheckpointError, match="matrix"):
        to_diffusers_tensor("transpose", torch.randn(4), "k")


def test_expected_keys_and_unmapped():
    sd = fake_state_dict("sdxl")
    keys = expected_diffusers_keys("sdxl", sd, clip_l_style="flat")
    assert len(keys["text_encoder_2"]) == 517 and "text_projection.weight" in keys["text_encoder_2"]
    assert "final_layer_norm.weight" in keys["text_encoder"]
    strict_fail = {**sd, "model.diffusion_model.input_blocks.1.0.bogus.weight": torch.zeros(1)}
    with pytest.raises(ArchError, match="bogus"):
        ldm_to_diffusers("sdxl", strict_fail, clip_l_style="flat")


# ---------------------------------------------------------------------------------------------- folders


def write_folder(root: Path, arch: str, components: dict, *, shard: str = "", te_prefix: bool = False) -> Path:
    """A diffusers-style folder: model_index.json plus one safetensors per component (optionally sharded)."""
    name = {"sdxl": "StableDiffusionXLPipeline", "sd15": "StableDiffusionPipeline"}[arch]
    root.mkdir(parents=True, exist_ok=True)
    (root / "model_index.json").write_text(json.dumps({"_class_name": name}))
    for component, sd in components.items():
        folder = root / component
        folder.mkdir()
        stem = "model" if component.startswith("text_encoder") else "diffusion_pytorch_model"
        if component == "text_encoder" and te_prefix:
            sd = {k if k.startswith("text_model.") else "text_model." + k: v for k, v in sd.items()}
        if component == shard:
            keys = sorted(sd)
            halves = {f"{stem}-0000{i + 1}-of-00002.safetensors": keys[i::2] for i in range(2)}
            for fname, part in halves.items():
                save_file({k: sd[k].contiguous() for k in part}, str(folder / fname))
            weight_map = {k: fname for fname, part in halves.items() for k in part}
            (folder / f"{stem}.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
        else:
            save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / f"{stem}.safetensors"))
    return root


@pytest.mark.parametrize("te_prefix", [False, True])
@pytest.mark.parametrize("arch", ARCHS)
def test_folder_reads_back_as_ldm(tmp_path, arch, te_prefix):
    sd = fake_state_dict(arch, seed=1)
    components = ldm_to_diffusers(arch, sd, clip_l_style="flat")
    root = write_folder(tmp_path / "pipe", arch, components, shard="unet", te_prefix=te_prefix)
    expected = mapped_part(arch, sd)
    with open_checkpoint(root) as reader:
        assert isinstance(reader, DiffusersFolderReader) and reader.arch == arch
        assert set(reader.keys()) == set(expected) and len(reader) == len(expected)
        for key, tensor in expected.items():
            info = reader.info(key)
            assert info.shape == tuple(tensor.shape) and info.start == 0
            assert info.nbytes == tensor.numel() * tensor.element_size()
            got = reader.read(key)
            assert got.dtype == tensor.dtype and torch.equal(got, tensor), key
        assert "v_pred" not in reader
        with pytest.raises(CheckpointError, match="no tensor"):
            reader.info("v_pred")
    if arch == "sdxl":
        fused = "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"
        sources = DiffusersFolderReader(root).source(fused)
        assert [op for _, _, op in sources] == ["qkv0", "qkv1", "qkv2"]


def test_folder_arch_without_model_index(tmp_path):
    components = ldm_to_diffusers("sdxl", fake_state_dict("sdxl"), clip_l_style="flat")
    root = write_folder(tmp_path / "pipe", "sdxl", components)
    (root / "model_index.json").unlink()
    assert folder_arch(root) == "sdxl"
    assert open_diffusers_folder(root).arch == "sdxl"
    with pytest.raises(CheckpointError, match="not a diffusers folder"):
        folder_arch(tmp_path)


def test_folder_refuses_pickle_and_reports_missing_parts(tmp_path):
    components = ldm_to_diffusers("sd15", fake_state_dict("sd15"), clip_l_style="flat")
    root = write_folder(tmp_path / "pipe", "sd15", components)
    (root / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    (root / "vae" / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x02")
    with pytest.raises(CheckpointError, match="pickle"):
        DiffusersFolderReader(root)
    for f in (root / "vae").iterdir():
        f.unlink()
    (root / "vae").rmdir()
    with pytest.raises(CheckpointError, match="vae"):
        DiffusersFolderReader(root)


def test_folder_variants(tmp_path):
    components = ldm_to_diffusers("sd15", fake_state_dict("sd15"), clip_l_style="flat")
    root = write_folder(tmp_path / "pipe", "sd15", components)
    unet = root / "unet" / "diffusion_pytorch_model.safetensors"
    unet.rename(root / "unet" / "diffusion_pytorch_model.fp16.safetensors")
    assert "model.diffusion_model.out.2.weight" in DiffusersFolderReader(root)  # the only variant
    (root / "unet" / "diffusion_pytorch_model.ema.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="variant"):
        DiffusersFolderReader(root)
    assert "model.diffusion_model.out.2.weight" in DiffusersFolderReader(root, variant="fp16")


def test_folder_rejects_unknown_keys_and_pipelines(tmp_path):
    components = ldm_to_diffusers("sd15", fake_state_dict("sd15"), clip_l_style="flat")
    components["unet"]["bogus.weight"] = torch.zeros(2)
    root = write_folder(tmp_path / "pipe", "sd15", components)
    with pytest.raises(ArchError, match="bogus"):
        DiffusersFolderReader(root)
    (root / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(ArchError, match="FluxPipeline"):
        DiffusersFolderReader(root)


def test_weight_file_names(tmp_path):
    from mergekit_sdxl.io.diffusers_folder import weight_files

    stem = "diffusion_pytorch_model"
    shards = [f"{stem}.fp16-0000{i}-of-00002.safetensors" for i in (1, 2)]
    for name in shards:
        (tmp_path / name).write_bytes(b"")
    index = tmp_path / f"{stem}.safetensors.index.fp16.json"  # diffusers' variant index name
    index.write_text(json.dumps({"weight_map": {"a": shards[0], "b": shards[1]}}))
    assert weight_files(tmp_path, stem) == [tmp_path / n for n in shards]  # the only variant
    assert weight_files(tmp_path, stem, "fp16") == [tmp_path / n for n in shards]
    index.write_text(json.dumps({"weight_map": {"a": "../escape.safetensors"}}))
    with pytest.raises(CheckpointError, match="escape"):
        weight_files(tmp_path, stem)
    index.write_text("[]")
    with pytest.raises(CheckpointError, match="weight_map"):
        weight_files(tmp_path, stem)
