"""extract-lora and bake on tiny real-layout checkpoints: planted deltas, reproducibility, strengths, blocks."""

from __future__ import annotations

import hashlib
import json
import warnings

import pytest
import torch

from mergekit_sdxl.arch.lora_names import lora_modules, select
from mergekit_sdxl.errors import ArchError, CheckpointError
from mergekit_sdxl.io.reader import open_checkpoint
from mergekit_sdxl.lora.bake import AdapterSet, AdapterSpec, bake
from mergekit_sdxl.lora.extract import ExtractOptions, extract_lora, noise_floor
from mergekit_sdxl.lora.svd import RankRule, SolverOptions

FP32 = ExtractOptions(save_dtype="F32", preset="attn+conv", text_encoders="on")


@pytest.fixture(scope="module")
def pair(make_ckpt):
    base = make_ckpt("sdxl", seed=0, dtype="F32")
    tuned = make_ckpt(seed=1, like=base, delta="lowrank:4", dtype="F32")
    return base, tuned


@pytest.fixture(scope="module")
def extracted(pair, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "planted.safetensors"
    report = extract_lora(*pair, out, FP32)
    return out, report


def _modules(path, preset="attn+conv"):
    with open_checkpoint(path) as r:
        return select(lora_modules("sdxl", {k: r.info(k).shape for k in r.keys()}), preset)


def _rel_errors(base, tuned, baked, modules):
    errors = {}
    with open_checkpoint(base) as rb, open_checkpoint(tuned) as rt, open_checkpoint(baked) as rk:
        for key in {m.key for m in modules}:
            b, t, k = rb.read(key).double(), rt.read(key).double(), rk.read(key).double()
            errors[key] = float((t - k).norm() / (t - b).norm())
    return errors


def test_planted_low_rank_recovered_everywhere(pair, extracted, tmp_path):
    """linear, conv 3x3, conv 1x1 and te2 in_proj: bake(extract) == tuned to 1e-5 relative."""
    out, report = extracted
    assert len(report.kept) == 72 + 192 + 788
    assert min(row.energy for row in report.kept) > 1 - 1e-6
    baked = tmp_path / "baked.safetensors"
    bake(pair[0], [AdapterSpec(str(out))], baked)
    errors = _rel_errors(*pair, baked, _modules(pair[0]))
    kinds = {
        "linear": "input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight",
        "conv3x3": "input_blocks.4.0.in_layers.2.weight",
        "conv1x1": "input_blocks.4.0.skip_connection.weight",
        "te2 in_proj": "resblocks.0.attn.in_proj_weight",
    }
    for kind, fragment in kinds.items():
        key = next(k for k in errors if k.endswith(fragment))
        assert errors[key] <= 1e-5, kind
    assert max(errors.values()) <= 1e-5


def test_bake_reproduces_within_reported_energy(make_ckpt, tmp_path):
    base = make_ckpt("sdxl", seed=0, dtype="F32")
    tuned = make_ckpt(seed=2, like=base, delta="noise:0.05", dtype="F32")
    out = tmp_path / "noisy.safetensors"
    options = ExtractOptions(rank=RankRule("fixed", 8), conv_rank=RankRule("fixed", 4), save_dtype="F32",
                             text_encoders="on")
    report = extract_lora(base, tuned, out, options)
    baked = tmp_path / "baked.safetensors"
    bake(base, [AdapterSpec(str(out))], baked)
    errors = _rel_errors(base, tuned, baked, _modules(base, "attn"))
    rows = {row.key: row for row in report.kept if row.component == "unet"}
    for key, row in rows.items():
        assert errors[key] ** 2 == pytest.approx(1 - row.energy, rel=1e-3, abs=1e-6)
    stored = json.loads(open_checkpoint(out).metadata["mergekit_sdxl.lora_layers"])
    assert set(stored) == {row.name for row in report.kept}


def test_files_are_byte_identical_across_runs(pair, tmp_path):
    options = ExtractOptions(rank=RankRule("fixed", 8), solver=SolverOptions(seed=7))
    digests = []
    for i in range(2):
        (tmp_path / str(i)).mkdir()
        out = tmp_path / str(i) / "run.safetensors"
        extract_lora(*pair, out, options)
        digests.append(hashlib.sha256(out.read_bytes()).hexdigest())
    assert digests[0] == digests[1]


def test_metadata(extracted):
    out, _ = extracted
    meta = open_checkpoint(out).metadata
    assert meta["ss_network_module"] == "networks.lora"
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert len(meta["sshs_model_hash"]) == 64 and len(meta["sshs_legacy_hash"]) == 8
    info = json.loads(meta["mergekit_sdxl.lora"])
    assert info["summary"]["layers"] == 72 + 192 + 788
    keys = open_checkpoint(out).keys()
    assert "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in keys
    assert "lora_unet_input_blocks_4_1_proj_in.alpha" in keys


def test_identical_inputs_give_empty_adapter_and_warning(make_ckpt, tmp_path):
    base = make_ckpt("sd15", seed=0)
    out = tmp_path / "empty.safetensors"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = extract_lora(base, base, out, ExtractOptions())
    assert not report.kept and any("empty adapter" in str(w.message) for w in caught)
    assert open_checkpoint(out).keys() == []


def test_mismatched_architectures_fail_before_reading(make_ckpt, tmp_path, monkeypatch):
    from mergekit_sdxl.io import reader

    def no_reads(self, key):
        raise AssertionError("a tensor was read")

    monkeypatch.setattr(reader.SafetensorsReader, "read", no_reads)
    with pytest.raises(ArchError, match="same architecture"):
        extract_lora(make_ckpt("sdxl", seed=0), make_ckpt("sd15", seed=0), tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def test_text_encoder_auto_uses_noise_floor(make_ckpt, tmp_path):
    base = make_ckpt("sd15", seed=0)  # fp16
    tuned = make_ckpt(seed=3, like=base, delta="noise:0.0002")  # below the fp16 floor
    report = extract_lora(base, tuned, tmp_path / "a.safetensors", ExtractOptions(rank=RankRule("fixed", 4)))
    te = [row for row in report.layers if row.component == "clip_l"]
    assert te and not any(row.kept for row in te) and all("noise floor" in row.reason for row in te)
    assert report.te_floor == pytest.approx(noise_floor(["F16"]))
    assert noise_floor(["BF16"]) > noise_floor(["F16"]) >= 1e-3
    tuned2 = make_ckpt(seed=3, like=base, delta="noise:0.05")
    report2 = extract_lora(base, tuned2, tmp_path / "b.safetensors", ExtractOptions(rank=RankRule("fixed", 4)))
    assert all(row.kept for row in report2.layers if row.component == "clip_l")


def test_strength_is_linear_and_blocks_touch_only_their_block(pair, extracted):
    out, _ = extracted
    with open_checkpoint(pair[0]) as r:
        shapes = {k: r.info(k).shape for k in r.keys()}
    key_in4 = "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight"
    key_out2 = "model.diffusion_model.output_blocks.2.1.transformer_blocks.0.attn1.to_q.weight"
    key_te = "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"
    with AdapterSet([AdapterSpec(str(out))], "sdxl", shapes) as one, \
            AdapterSet([AdapterSpec(str(out), strength=0.3, te_strength=2.0)], "sdxl", shapes) as scaled:
        for key in (key_in4, key_out2):
            torch.testing.assert_close(scaled.delta(key), 0.3 * one.delta(key), rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(scaled.delta(key_te), 2.0 * one.delta(key_te), rtol=1e-6, atol=1e-9)
    blocks = "IN04:1, default:0"
    with AdapterSet([AdapterSpec(str(out))], "sdxl", shapes) as full, \
            AdapterSet([AdapterSpec(str(out), blocks=blocks)], "sdxl", shapes) as only4:
        torch.testing.assert_close(only4.delta(key_in4), full.delta(key_in4))
        for key in full.keys():
            if ".input_blocks.4." not in key:
                d = only4.delta(key)
                assert d is None or not d.any(), key


def test_unknown_keys_are_an_error(extracted, pair, tmp_path):
    from mergekit_sdxl.io.writer import save_file

    bad = tmp_path / "bad.safetensors"
    tensors = {"lora_unet_not_a_module.lora_down.weight": torch.zeros(2, 2),
               "lora_unet_not_a_module.lora_up.weight": torch.zeros(2, 2)}
    save_file(tensors, bad)
    with open_checkpoint(pair[0]) as r:
        shapes = {k: r.info(k).shape for k in r.keys()}
    with pytest.raises(CheckpointError, match="--ignore-unknown"):
        AdapterSet([AdapterSpec(str(bad))], "sdxl", shapes)
    with AdapterSet([AdapterSpec(str(bad))], "sdxl", shapes, ignore_unknown=True) as aset:
        assert len(aset.unconsumed) == 2 and aset.keys() == []
