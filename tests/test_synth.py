"""Synthetic checkpoints: real key names, tiny and full shapes, determinism, known relations, CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from mergekit_sdxl.arch.tables import key_table, mandatory_keys
from mergekit_sdxl.arch.tiny import DIM_MAPS, norm_groups, tiny_dim, tiny_hparams, tiny_shape
from mergekit_sdxl.errors import ArchError, OutputError, UsageError
from mergekit_sdxl.io.reader import SafetensorsReader
from mergekit_sdxl.synth import (
    Delta,
    apply_delta,
    base_tensor,
    checkpoint_keys,
    iter_test_tensors,
    plan_test_checkpoint,
    write_test_checkpoint,
)
from mergekit_sdxl.synth.checkpoints import METADATA_KEY, OPTIONAL_GROUPS

ARCHS = ("sdxl", "sd15")
UNET_KEY = "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"
CONV_KEY = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"
TE1_KEY = "conditioner.embedders.0.transformer.text_model.encoder.layers.3.mlp.fc1.weight"
TE2_KEY = "conditioner.embedders.1.model.transformer.resblocks.5.attn.in_proj_weight"
VAE_KEY = "first_stage_model.decoder.up.1.block.0.conv1.weight"
NORM_KEY = "model.diffusion_model.input_blocks.1.0.in_layers.0.weight"


def read(path, key):
    with SafetensorsReader(path) as r:
        return r.read(key)


# ---------------------------------------------------------------------------------------------- key sets


@pytest.mark.parametrize(("arch", "count"), [("sdxl", 2515), ("sd15", 1131)])
def test_default_keys_are_a_real_release(arch, count):
    keys = set(checkpoint_keys(arch))
    table = key_table(arch)
    assert len(keys) == count
    assert mandatory_keys(arch) <= keys
    optional = {k for k in keys if table[k].optional}
    # exactly the text-encoder optionals: position_ids, CLIP-L layer 11 / final_layer_norm, bigG extras
    assert optional == {k for k, i in table.items() if i.optional and i.component in ("clip_l", "clip_g")}
    assert not {"v_pred", "ztsnr", "betas", "alphas_cumprod"} & keys
    if arch == "sdxl":
        assert {"conditioner.embedders.1.model.text_projection", "conditioner.embedders.1.model.logit_scale",
                "conditioner.embedders.1.model.ln_final.weight",
                "conditioner.embedders.0.transformer.text_model.embeddings.position_ids",
                "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight"} <= keys
    else:
        assert not any(k.startswith("model_ema.") for k in keys)


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_file_has_real_names_tiny_shapes_and_dtypes(arch, make_ckpt):
    path = make_ckpt(arch)
    with SafetensorsReader(path) as r:
        assert sorted(r.keys()) == checkpoint_keys(arch)
        for key in r.keys():
            info = r.info(key)
            assert info.shape == tiny_shape(arch, key), key
            assert info.dtype == ("I64" if key.endswith("position_ids") else "F16"), key
        assert r.metadata["modelspec.architecture"].startswith("stable-diffusion")
        assert json.loads(r.metadata[METADATA_KEY]) == {"arch": arch, "size": "tiny", "seed": 0, "dtype": "F16",
                                                         "optional": []}
    size = path.stat().st_size
    assert size < (40e6 if arch == "sdxl" else 15e6), f"tiny {arch} is {size / 1e6:.1f} MB"


@pytest.mark.parametrize(("arch", "count"), [("sdxl", 2531), ("sd15", 1831)])
def test_include_optional_writes_the_whole_table(arch, count, make_ckpt):
    with SafetensorsReader(make_ckpt(arch, include_optional=True)) as r:
        assert sorted(r.keys()) == sorted(key_table(arch)) and len(r.keys()) == count
        betas = r.read("betas").float()
        assert betas[0].item() == pytest.approx(0.00085, rel=1e-3) and betas[-1].item() == pytest.approx(0.012,
                                                                                                         rel=1e-3)
        assert r.read("alphas_cumprod").float()[-1].item() == pytest.approx(0.00466, rel=1e-2)
        if arch == "sdxl":
            assert r.info("v_pred").shape == (0,) and r.info("ztsnr").dtype == "I64"
        else:
            assert r.info("model_ema.num_updates").dtype == "I32"


def test_optional_groups():
    base = set(checkpoint_keys("sd15"))
    ema = set(checkpoint_keys("sd15", ["ema"]))
    assert {k for k in ema - base} == {k for k, i in key_table("sd15").items() if i.component == "ema"}
    assert set(checkpoint_keys("sdxl", {"markers"})) - set(checkpoint_keys("sdxl")) == {
        "v_pred", "ztsnr", "edm_vpred.sigma_max", "edm_vpred.sigma_min"}
    assert set(checkpoint_keys("sdxl", OPTIONAL_GROUPS)) == set(key_table("sdxl"))
    with pytest.raises(UsageError, match="unknown optional"):
        checkpoint_keys("sdxl", ["nope"])


# ---------------------------------------------------------------------------------------------- shapes


def test_full_sdxl_shapes_and_size():
    specs = plan_test_checkpoint("sdxl", "full", "F16", include_optional=True)
    assert len(specs) == 2531
    assert all(s.shape == key_table("sdxl")[s.key].shape for s in specs)
    assert round(sum(math.prod(s.shape) for s in specs) / 1e9, 3) == 3.469
    default = plan_test_checkpoint("sdxl", "full")
    params = sum(math.prod(s.shape) for s in default if s.dtype == "F16")
    assert params == 3_468_837_868
    assert round(sum(s.nbytes for s in default) / 1e9, 2) == 6.94
    unet = sum(math.prod(s.shape) for s in default if s.key.startswith("model.diffusion_model."))
    assert unet == 2_567_463_684


def test_tiny_dims_follow_the_maps():
    assert tiny_shape("sdxl", "model.diffusion_model.label_emb.0.0.weight") == (64, 112)
    assert tiny_shape("sdxl", UNET_KEY) == (32, 96)  # context 2048 -> 32 + 64
    assert tiny_shape("sd15", "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight") \
        == (16, 32)
    assert tiny_shape("sdxl", TE2_KEY) == (192, 64)
    assert tiny_shape("sdxl", "conditioner.embedders.1.model.text_projection") == (64, 64)
    assert tiny_shape("sdxl", "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight") \
        == (49408, 32)
    assert tiny_shape("sdxl", "conditioner.embedders.1.model.positional_embedding") == (77, 64)
    assert tiny_shape("sdxl", VAE_KEY) == (32, 64, 3, 3)  # real [256, 512, 3, 3]
    assert tiny_shape("sdxl", "first_stage_model.quant_conv.weight") == (8, 8, 1, 1)
    assert tiny_shape("sdxl", "model.diffusion_model.out.2.weight") == (4, 16, 3, 3)


def test_unknown_dims_and_keys_raise():
    with pytest.raises(ArchError, match="no tiny counterpart"):
        tiny_dim("sdxl", "unet", 777)
    with pytest.raises(ArchError, match="not a key"):
        tiny_shape("sdxl", "model.diffusion_model.nope.weight")
    with pytest.raises(ArchError):
        tiny_shape("sd3", UNET_KEY)
    with pytest.raises(ArchError, match="no rule"):
        base_tensor("some.scalar", ())


def test_every_table_dimension_is_mapped():
    for arch in ARCHS:
        for info in key_table(arch).values():
            assert all(d in DIM_MAPS[arch, info.component] for d in info.shape)


def test_tiny_hparams():
    assert norm_groups(16) == 8 and norm_groups(320) == 32 and norm_groups(128) == 32
    xl = tiny_hparams("sdxl")
    assert set(xl) == {"unet", "vae", "text_encoder", "text_encoder_2"}
    assert xl["text_encoder"]["hidden_size"] != xl["text_encoder_2"]["hidden_size"]  # diffusers tells them apart
    assert xl["unet"]["cross_attention_dim"] == xl["text_encoder"]["hidden_size"] + xl["text_encoder_2"][
        "hidden_size"]
    assert xl["unet"]["projection_class_embeddings_input_dim"] == xl["text_encoder_2"]["projection_dim"] + 6 * xl[
        "unet"]["addition_time_embed_dim"]
    for arch in ARCHS:
        for cfg in tiny_hparams(arch).values():
            if "hidden_size" in cfg:
                assert cfg["hidden_size"] % cfg["num_attention_heads"] == 0
            if "block_out_channels" in cfg:
                assert all(c % cfg["norm_num_groups"] == 0 for c in cfg["block_out_channels"])
    sd = tiny_hparams("sd15")
    assert sd["unet"]["cross_attention_dim"] == sd["text_encoder"]["hidden_size"] and "text_encoder_2" not in sd


# ---------------------------------------------------------------------------------------------- values


def test_value_scales(tiny_sdxl):
    with SafetensorsReader(tiny_sdxl) as r:
        for key in (UNET_KEY, CONV_KEY, TE1_KEY, TE2_KEY, VAE_KEY):
            w = r.read(key).float()
            assert w.std().item() == pytest.approx(1 / math.sqrt(math.prod(w.shape[1:])), rel=0.1), key
        norm = r.read(NORM_KEY).float()
        assert abs(norm.mean().item() - 1) < 0.02 and 0.01 < norm.std().item() < 0.03
        tok = r.read("conditioner.embedders.1.model.token_embedding.weight").float()
        assert tok.std().item() == pytest.approx(0.02, rel=0.02)
        bias = r.read("model.diffusion_model.out.2.bias").float()
        assert bias.abs().max().item() < 0.02
        ids = r.read("conditioner.embedders.0.transformer.text_model.embeddings.position_ids")
        assert ids.tolist() == [list(range(77))]
        assert r.read("conditioner.embedders.1.model.logit_scale").item() == pytest.approx(math.log(100), rel=1e-3)
        for key in r.keys():
            assert torch.isfinite(r.read(key).float()).all(), key


def test_same_seed_same_bytes_different_seed_different_values(tmp_path, tiny_sdxl):
    again = write_test_checkpoint(tmp_path / "again.safetensors", seed=0)
    assert again.read_bytes() == tiny_sdxl.read_bytes()
    other = write_test_checkpoint(tmp_path / "other.safetensors", seed=1)
    assert other.stat().st_size == tiny_sdxl.stat().st_size
    for key in (UNET_KEY, TE1_KEY, VAE_KEY, NORM_KEY):
        assert not torch.equal(read(other, key), read(tiny_sdxl, key))
    # distinct keys of the same shape get distinct values
    q = read(tiny_sdxl, UNET_KEY.replace("attn2.to_k", "attn1.to_q"))
    k = read(tiny_sdxl, UNET_KEY.replace("attn2.to_k", "attn1.to_k"))
    assert q.shape == k.shape and not torch.equal(q, k)


def test_values_do_not_depend_on_thread_count_or_chunking():
    key = "conditioner.embedders.1.model.token_embedding.weight"  # 3.2 M elements: several chunks
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = base_tensor(key, (49408, 64), seed=5)
        delta_one = apply_delta(TE2_KEY, base_tensor(TE2_KEY, (192, 64)), "lowrank:4", seed=1)
        torch.set_num_threads(max(2, threads))
        many = base_tensor(key, (49408, 64), seed=5)
        delta_many = apply_delta(TE2_KEY, base_tensor(TE2_KEY, (192, 64)), "lowrank:4", seed=1)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many) and torch.equal(delta_one, delta_many)
    # the F32 and F16 variants are the same numbers, rounded
    assert torch.equal(base_tensor(key, (49408, 64), seed=5, dtype="F32").half(), one)


def test_iter_matches_file(tiny_sd15):
    keys = []
    with SafetensorsReader(tiny_sd15) as r:
        for key, tensor in iter_test_tensors("sd15"):
            assert torch.equal(tensor, r.read(key)), key
            keys.append(key)
    assert keys == checkpoint_keys("sd15")


def test_metadata_and_progress(tmp_path):
    seen = []
    path = write_test_checkpoint(tmp_path / "m.safetensors", arch="sd15", seed=3, metadata={"zz": "1", "aa": "2"},
                                 progress=seen.append)
    assert sum(seen) == sum(s.nbytes for s in plan_test_checkpoint("sd15")) and len(seen) == 1131
    with SafetensorsReader(path) as r:
        assert r.metadata["zz"] == "1" and r.metadata["aa"] == "2"
        assert list(r.metadata) == sorted(r.metadata)
        assert r.metadata["modelspec.title"] == "synthetic sd15 tiny seed 3"


@pytest.mark.parametrize("dtype", ["bf16", "F32", "fp8_e4m3fn"])
def test_other_dtypes(dtype, make_ckpt):
    path = make_ckpt("sd15", dtype=dtype)
    code = {"bf16": "BF16", "F32": "F32", "fp8_e4m3fn": "F8_E4M3"}[dtype]
    with SafetensorsReader(path) as r:
        assert {r.info(k).dtype for k in r.keys()} == {code, "I64"}


# ---------------------------------------------------------------------------------------------- relations


def _svals(t: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(t.double().reshape(t.shape[0], -1))


SD15_UNET_KEY = "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"
SD15_TE_KEY = "cond_stage_model.transformer.text_model.encoder.layers.3.mlp.fc1.weight"
SD15_EMB_KEY = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"


def test_lowrank_delta_has_exact_rank(make_ckpt):
    a = make_ckpt("sd15", seed=11, dtype="F32")
    b = make_ckpt(seed=12, like=a, delta="lowrank:4", dtype="F32")
    for key in (SD15_UNET_KEY, CONV_KEY, SD15_TE_KEY, SD15_EMB_KEY, "model.diffusion_model.time_embed.0.weight"):
        _check_lowrank(read(a, key), read(b, key), 4, key)
    for key in (NORM_KEY, VAE_KEY, "model.diffusion_model.out.2.bias"):  # 1-D and VAE tensors stay
        assert torch.equal(read(a, key), read(b, key)), key
    # rank is capped by the matrix: out.2 is [4, 16*3*3]
    d = read(b, "model.diffusion_model.out.2.weight").double() - read(a, "model.diffusion_model.out.2.weight")
    assert torch.linalg.matrix_rank(d.reshape(4, -1)).item() == 4


@pytest.mark.parametrize("key", [TE2_KEY, "conditioner.embedders.1.model.text_projection",
                                 "model.diffusion_model.label_emb.0.0.weight"])
def test_lowrank_delta_on_sdxl_keys(key):
    w = base_tensor(key, tiny_shape("sdxl", key), seed=1, dtype="F32")
    _check_lowrank(w, apply_delta(key, w, "lowrank:3", seed=2), 3, key)


def _check_lowrank(wa, wb, rank, key):
    s = _svals(wb.double() - wa.double())
    assert s[rank - 1] / s[0] > 1e-3 and s[rank] / s[0] < 1e-5, (key, s[: rank + 2])
    ratio = torch.linalg.vector_norm(wb.double() - wa.double()) / torch.linalg.vector_norm(wa.double())
    assert ratio.item() == pytest.approx(0.05, rel=1e-4), key


def test_noise_delta_is_a_fine_tune(make_ckpt):
    a = make_ckpt("sd15", seed=21, dtype="F32")
    b = make_ckpt(seed=22, like=a, delta="noise:0.1", dtype="F32")
    for key in (SD15_UNET_KEY, SD15_TE_KEY, SD15_EMB_KEY, NORM_KEY):
        wa, wb = read(a, key).double(), read(b, key).double()
        tolerance = 0.1 if wa.numel() > 1000 else 0.5  # NORM_KEY has 16 values
        assert ((wb - wa).std() / wa.std()).item() == pytest.approx(0.1, rel=tolerance), key
        assert torch.nn.functional.cosine_similarity(wa.flatten(), wb.flatten(), dim=0) > 0.99
    assert torch.equal(read(a, VAE_KEY), read(b, VAE_KEY))
    with SafetensorsReader(b) as r:
        record = json.loads(r.metadata[METADATA_KEY])
    assert record["delta"] == "noise:0.1" and record["like"]["seed"] == 21 and record["like"]["arch"] == "sd15"


def test_components_restrict_the_delta(tmp_path, make_ckpt):
    a = make_ckpt("sdxl", seed=0)
    b = write_test_checkpoint(tmp_path / "b.safetensors", seed=3, like=a, delta="noise:0.05",
                              components=["vae"])
    assert torch.equal(read(a, UNET_KEY), read(b, UNET_KEY))
    assert not torch.equal(read(a, VAE_KEY), read(b, VAE_KEY))


def test_delta_is_deterministic_and_seeded(tmp_path, tiny_sd15):
    one = write_test_checkpoint(tmp_path / "1.safetensors", seed=4, like=tiny_sd15, delta="lowrank:2")
    two = write_test_checkpoint(tmp_path / "2.safetensors", seed=4, like=tiny_sd15, delta="lowrank:2")
    three = write_test_checkpoint(tmp_path / "3.safetensors", seed=5, like=tiny_sd15, delta="lowrank:2")
    assert one.read_bytes() == two.read_bytes() != three.read_bytes()


def test_family_fixture(tiny_sdxl_family):
    fam = tiny_sdxl_family
    assert set(fam) == {"base8", "beta7", "anxl2", "anxl3"}
    w = {name: read(path, UNET_KEY).double() for name, path in fam.items()}
    headers = []
    for path in fam.values():
        with SafetensorsReader(path) as r:
            headers.append({k: (r.info(k).dtype, r.info(k).shape) for k in r.keys()})
    assert all(h == headers[0] for h in headers)
    # anxl3 is a fine-tune of anxl2, which is one of base8: anxl3 - anxl2 is small, anxl3 - base8 larger
    small = (w["anxl3"] - w["anxl2"]).norm()
    assert small < (w["anxl3"] - w["base8"]).norm() and small < 0.1 * w["anxl2"].norm()


def test_argument_errors(tmp_path, tiny_sdxl, tiny_sd15):
    out = tmp_path / "x.safetensors"
    with pytest.raises(UsageError, match="needs a base"):
        write_test_checkpoint(out, delta="noise:0.1")
    with pytest.raises(ArchError, match="not sd15"):
        write_test_checkpoint(out, arch="sd15", like=tiny_sdxl, delta="noise:0.1")
    with pytest.raises(UsageError, match="tiny shapes, not full"):
        write_test_checkpoint(out, size="full", like=tiny_sdxl, delta="noise:0.1")
    with pytest.raises(UsageError, match="include_optional"):
        write_test_checkpoint(out, like=tiny_sdxl, include_optional=True)
    with pytest.raises(UsageError, match="unknown size"):
        write_test_checkpoint(out, size="huge")
    with pytest.raises(UsageError, match="float dtype"):
        write_test_checkpoint(out, dtype="int64")
    with pytest.raises(UsageError, match="unknown component"):
        write_test_checkpoint(out, like=tiny_sd15, delta="noise:1", components=["clip_x"])
    with pytest.raises(OutputError, match="already exists"):
        write_test_checkpoint(tiny_sdxl)
    with pytest.raises(OutputError, match="input"):
        write_test_checkpoint(tiny_sdxl, like=tiny_sdxl, delta="noise:1", overwrite=True)
    assert not out.exists() and not list(tmp_path.iterdir())


@pytest.mark.parametrize("text", ["lowrank", "lowrank:0", "lowrank:1.5", "noise:-1", "noise:nan", "svd:4", ""])
def test_bad_delta_strings(text):
    with pytest.raises(UsageError, match="bad delta"):
        Delta.parse(text)


def test_delta_strings():
    assert Delta.parse("lowrank:8") == Delta("lowrank", 8) and str(Delta.parse("noise:0.05")) == "noise:0.05"


# ---------------------------------------------------------------------------------------------- CLI


def _cli(args, capsys):
    from mergekit_sdxl.cli.main import main

    with pytest.raises(SystemExit) as exc:
        main(["-q", "make-test-checkpoint", *args])
    return exc.value.code, capsys.readouterr()


def test_cli_writes_the_same_file_as_the_api(tmp_path, capsys, tiny_sd15):
    out = tmp_path / "cli.safetensors"
    code, captured = _cli(["--arch", "sd15", "--seed", "0", "-o", str(out)], capsys)
    assert code == 0 and captured.out.strip() == str(out)
    assert out.read_bytes() == tiny_sd15.read_bytes()
    code, captured = _cli(["--arch", "sd15", "-o", str(out)], capsys)
    assert code == 6 and "already exists" in captured.err
    rel = tmp_path / "rel.safetensors"
    code, _ = _cli(["--like", str(out), "--delta", "lowrank:2", "--seed", "9", "--dtype", "fp32", "-o", str(rel)],
                   capsys)
    assert code == 0
    api = write_test_checkpoint(tmp_path / "api.safetensors", seed=9, like=tiny_sd15, delta="lowrank:2",
                                dtype="F32")
    assert rel.read_bytes() == api.read_bytes()


def test_cli_errors(tmp_path, capsys, tiny_sdxl):
    out = str(tmp_path / "x.safetensors")
    assert _cli(["-o", out, "--delta", "noise:1"], capsys)[0] == 2
    assert _cli(["-o", out, "--like", str(tiny_sdxl), "--delta", "bogus"], capsys)[0] == 2
    assert _cli(["-o", out, "--components", "unet"], capsys)[0] == 2
    assert _cli(["-o", out, "--arch", "sd15", "--like", str(tiny_sdxl), "--delta", "noise:1"], capsys)[0] == 4
    code, captured = _cli(["-o", out, "--with", "markers", "--arch", "sdxl"], capsys)
    assert code == 0
    with SafetensorsReader(out) as r:
        assert "v_pred" in r and len(r) == 2519


@pytest.mark.slow
def test_full_sd15_written_to_disk(tmp_path):
    path = write_test_checkpoint(tmp_path / "full.safetensors", arch="sd15", size="full", seed=1)
    with SafetensorsReader(path) as r:
        assert sorted(r.keys()) == checkpoint_keys("sd15")
        assert all(r.info(k).shape == key_table("sd15")[k].shape for k in r.keys())
        w = r.read("model.diffusion_model.middle_block.1.transformer_blocks.0.ff.net.0.proj.weight").float()
        assert w.shape == (10240, 1280) and w.std().item() == pytest.approx(1 / math.sqrt(1280), rel=0.01)
        emb = r.read("cond_stage_model.transformer.text_model.embeddings.token_embedding.weight")
        assert emb.shape == (49408, 768) and np.isfinite(emb.float().numpy()).all()
    data = sum(s.nbytes for s in plan_test_checkpoint("sd15", "full"))
    assert 0 < path.stat().st_size - data < 1 << 20 and round(data / 1e9, 2) == 2.13
