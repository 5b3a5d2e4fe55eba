"""`mergekit-sdxl inspect` on real-layout files: a full-size SDXL header over a sparse data region (no 7 GB
written), and small files with real values for the checks that read data."""

from __future__ import annotations

import hashlib
import json
import math
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from mergekit_sdxl.analysis.report import SCHEMA
from mergekit_sdxl.arch.blocks import block_of
from mergekit_sdxl.arch.tables import key_table
from mergekit_sdxl.cli.main import cli, main

SDXL_PARAMS = {"unet": 2_567_463_686, "clip_l": 123_060_480, "clip_g": 694_659_841, "vae": 83_653_863}
ITEMSIZE = {"F16": 2, "BF16": 2, "F32": 4, "I64": 8, "I32": 4, "F8_E4M3": 1}


def write_sparse(path: Path, entries: dict[str, tuple[str, tuple[int, ...]]], metadata: dict | None = None) -> Path:
    """A valid safetensors file whose data region is a hole (reads as zeros, takes no disk space)."""
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for key, (dtype, shape) in entries.items():
        size = math.prod(shape) * ITEMSIZE[dtype]
        header[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw)
        fh.truncate(8 + len(raw) + offset)
    return path


def table_entries(arch: str, float_dtype: str = "F16") -> dict[str, tuple[str, tuple[int, ...]]]:
    return {k: (float_dtype if i.dtype.startswith("float") else {"int64": "I64", "int32": "I32"}[i.dtype], i.shape)
            for k, i in key_table(arch).items()}


@pytest.fixture(scope="module")
def full_sdxl(tmp_path_factory) -> Path:
    return write_sparse(tmp_path_factory.mktemp("inspect") / "sdxl [v2].safetensors", table_entries("sdxl"),
                        {"modelspec.architecture": "stable-diffusion-xl-v1-base", "modelspec.title": "[abstract]"})


def run(*args: str) -> str:
    result = CliRunner().invoke(cli, ["inspect", *map(str, args)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def inspect_json(*args: str) -> dict:
    return json.loads(run(*args, "--json"))


def test_full_sdxl_from_the_header_alone(full_sdxl):
    report = inspect_json(full_sdxl, "--no-hash")
    assert report["schema"] == SCHEMA and report["architecture"] == "sdxl" and report["format"] == "safetensors"
    assert {c: report["components"][c]["params"] for c in SDXL_PARAMS} == SDXL_PARAMS
    assert report["components"]["unet"]["dtypes"] == {"F16": 1682, "I64": 2}
    assert report["components"]["clip_l"]["keys"] == 197
    assert report["n_keys"] == 2531 and report["size_bytes"] > 6.9e9
    assert report["markers"] == ["v_pred", "ztsnr", "edm_vpred.sigma_max", "edm_vpred.sigma_min"]
    odd = report["oddities"]
    assert odd["missing_mandatory"] == odd["unknown_keys"] == odd["shape_mismatches"] == []
    assert odd["non_finite"] is None and report["blocks"] is None
    assert report["hashes"]["legacy"] is None and report["metadata"]["modelspec.title"] == "[abstract]"


def test_full_sdxl_inspects_fast(full_sdxl):
    run(full_sdxl, "--no-hash")  # warm imports
    start = time.perf_counter()
    run(full_sdxl, "--blocks")
    assert time.perf_counter() - start < 2.0


def test_header_only_inspect_does_not_import_torch(full_sdxl):
    code = ("import sys\nfrom mergekit_sdxl.cli.main import main\n"
            f"try:\n    main(['inspect', {str(full_sdxl)!r}, '--json'])\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules, file=sys.stderr)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stderr.strip().splitlines()[-1] == "False"


def test_text_output_prints_brackets_verbatim(full_sdxl):
    text = run(full_sdxl, "--no-hash")
    assert "sdxl [v2].safetensors" in text and "modelspec.title: [abstract]" in text
    assert "architecture  SDXL" in text and "2,567,463,686" in text and "oddities      none" in text
    assert "markers       v_pred, ztsnr" in text


@pytest.mark.parametrize("convention", ["supermerger", "supermerger-2023", "sd-mecha"])
def test_blocks(full_sdxl, convention):
    report = inspect_json(full_sdxl, "--no-hash", "--blocks", "--convention", convention)
    blocks = report["blocks"]
    assert blocks["convention"] == convention
    table = key_table("sdxl")
    kept = sorted(k for k in table if block_of(k, "sdxl", convention) is None)
    assert blocks["kept_from_a"] == kept
    assert "conditioner.embedders.1.model.text_projection" in kept and "v_pred" in kept
    assert blocks["blocks"]["IN04"]["keys"] == 58
    assert sum(b["keys"] for b in blocks["blocks"].values()) + len(kept) == 2531
    assert ("VAE" in blocks["blocks"]) == (convention == "sd-mecha")
    total = sum(b["params"] for b in blocks["blocks"].values())
    assert total <= sum(SDXL_PARAMS.values())
    text = run(full_sdxl, "--no-hash", "--blocks", "--convention", convention)
    assert f"convention {convention}" in text and f"kept from A ({len(kept)})" in text


def test_oddities_missing_unknown_shapes_and_fp8_scales(tmp_path):
    entries = table_entries("sdxl", "F8_E4M3")
    del entries["model.diffusion_model.out.2.weight"]
    entries["model.diffusion_model.input_blocks.1.0.in_layers.2.scale_weight"] = ("F32", ())
    entries["scaled_fp8"] = ("F8_E4M3", (0,))  # this tool's first marker, and ComfyUI's below: neither is unknown
    entries["model.diffusion_model.scaled_fp8"] = ("F8_E4M3", (0,))
    entries["lora_unet_extra.alpha"] = ("F32", ())
    entries["model.diffusion_model.out.0.weight"] = ("F8_E4M3", (7,))
    report = inspect_json(write_sparse(tmp_path / "odd.safetensors", entries), "--no-hash")
    odd = report["oddities"]
    assert odd["missing_mandatory"] == ["model.diffusion_model.out.2.weight"]
    assert odd["unknown_keys"] == ["lora_unet_extra.alpha"]
    assert odd["shape_mismatches"] == [{"key": "model.diffusion_model.out.0.weight", "shape": [7], "expected": [320]}]
    assert odd["fp8_scales"] == 1
    assert report["components"]["unet"]["bytes"] < SDXL_PARAMS["unet"]  # one byte per fp8 value
    text = run(tmp_path / "odd.safetensors", "--no-hash")
    assert "missing mandatory keys (1):" in text and "unknown keys (1):" in text


def test_legacy_sd1_layout_and_unknown_architecture(tmp_path):
    legacy = {k.replace("transformer.text_model.", "transformer."): v for k, v in table_entries("sd15").items()}
    report = inspect_json(write_sparse(tmp_path / "old.safetensors", legacy), "--no-hash")
    assert report["architecture"] == "sd15" and report["oddities"]["missing_mandatory"] == []
    assert report["components"]["clip_l"]["params"] == 123_060_480
    lora = write_sparse(tmp_path / "lora.safetensors", {"lora_unet_a.lora_down.weight": ("F16", (4, 8))})
    report = inspect_json(lora, "--no-hash", "--blocks")  # an adapter: the LoRA summary (tests/test_lora_inspect.py)
    assert report["kind"] == "adapter" and report["architecture"] is None and report["blocks"] is None
    assert report["unknown_keys"] == ["lora_unet_a.lora_down.weight"] and report["n_modules"] == 0
    assert "architecture  unknown" in run(lora, "--no-hash")


def _small_sd15(path: Path, metadata: dict[str, str]) -> Path:
    tensors = {
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": torch.zeros(4, 3),
        "model.diffusion_model.input_blocks.0.0.weight": torch.tensor([1.0, float("nan"), float("inf")]).half(),
        "model.diffusion_model.out.2.bias": torch.ones(2, dtype=torch.bfloat16),
        "first_stage_model.quant_conv.weight": torch.tensor([0.5, float("nan")]).to(torch.float8_e4m3fn),
        "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(3)[None],
    }
    save_file(tensors, str(path), metadata=metadata)
    return path


def test_check_values_and_lineage(tmp_path):
    recipe = {"type": "webui", "primary_model_hash": "aa", "interp_method": "Weighted sum", "multiplier": 0.3}
    models = {"ab" * 32: {"name": "base7", "legacy_hash": "1234abcd", "sd_merge_recipe": recipe}}
    metadata = {"sd_merge_recipe": json.dumps(recipe), "sd_merge_models": json.dumps(models),
                "mergekit_sdxl.recipe": json.dumps({"steps": [{"name": "rev2"}]}), "ss_note": "x" * 300,
                "sshs_model_hash": "f" * 64}
    path = _small_sd15(tmp_path / "small.safetensors", metadata)
    report = inspect_json(path, "--no-hash", "--check-values")
    assert report["architecture"] == "sd15"
    assert report["oddities"]["non_finite"] == {"model.diffusion_model.input_blocks.0.0.weight": 2,
                                                "first_stage_model.quant_conv.weight": 1}
    assert report["lineage"]["sd_merge_recipe"] == recipe and report["lineage"]["sd_merge_models"] == models
    assert report["lineage"]["mergekit"] == {"mergekit_sdxl.recipe": {"steps": [{"name": "rev2"}]}}
    assert report["components"]["clip_l"]["params"] == 12  # int64 position_ids are not parameters
    text = run(path, "--no-hash", "--check-values")
    assert "tensors with NaN/Inf (2):" in text and '"interp_method": "Weighted sum"' in text
    assert "base7 [1234abcd] sha256 abababab" in text and "interp_method=Weighted sum" in text
    assert "ss_note: " + "x" * 117 + "..." in text
    assert "sshs_model_hash (metadata): " + "f" * 64 in run(path)
    clean = inspect_json(path, "--no-hash")
    assert clean["oddities"]["non_finite"] is None and clean["hashes"]["metadata"]["sshs_model_hash"] == "f" * 64


def test_ckpt_file(tmp_path):
    path = tmp_path / "old.ckpt"
    torch.save({"state_dict": {"cond_stage_model.transformer.text_model.embeddings.token_embedding.weight":
                               torch.zeros(4, 3, dtype=torch.float16)}}, path)
    report = inspect_json(path, "--check-values")
    assert report["format"] == "ckpt" and report["architecture"] == "sd15"
    assert report["components"]["clip_l"] == {"keys": 1, "params": 12, "bytes": 24, "dtypes": {"F16": 1}}
    assert report["oddities"]["non_finite"] == {} and report["hashes"]["legacy"]
    assert "values        all finite" in run(path, "--check-values")


@pytest.fixture(autouse=True)
def hash_cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("MERGEKIT_SDXL_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_hashes(tmp_path):
    data = bytes(range(256)) * 5000  # 1.28 MB: the legacy window lies inside
    path = tmp_path / "h.safetensors"
    save_file({"model.diffusion_model.x": torch.frombuffer(bytearray(data), dtype=torch.uint8)}, str(path))
    raw = path.read_bytes()
    report = inspect_json(path)
    assert report["hashes"]["legacy"] == hashlib.sha256(raw[0x100000:0x110000]).hexdigest()[:8]
    assert report["hashes"]["autov2"] is None and report["hashes"]["source"] is None
    assert "(AutoV2/AutoV3: use --hash)" in run(path)
    full = inspect_json(path, "--hash")["hashes"]
    assert full["source"] == "computed" and full["legacy"] == report["hashes"]["legacy"]
    assert full["sha256"] == hashlib.sha256(raw).hexdigest() and full["autov2"] == full["sha256"][:10]
    header_end = 8 + struct.unpack("<Q", raw[:8])[0]
    assert full["data_sha256"] == hashlib.sha256(raw[header_end:]).hexdigest()
    assert full["autov3"] == full["data_sha256"][:12]
    cached = inspect_json(path)["hashes"]  # now known to the cache: shown without --hash
    assert cached == {**full, "source": "cache"}
    assert "(from the hash cache)" in run(path)
    assert inspect_json(path, "--no-hash")["hashes"]["legacy"] is None


def test_hash_and_no_hash_contradict(full_sdxl, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["inspect", str(full_sdxl), "--hash", "--no-hash"])
    assert exc.value.code == 2
    assert "contradict" in capsys.readouterr().err


def test_missing_file_exits_4(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["inspect", str(tmp_path / "nope.safetensors")])
    assert exc.value.code == 4


def test_blocks_use_the_convention_the_merge_recorded(tmp_path, full_sdxl):
    """A merge of ours records its block convention (mergekit_sdxl.recipe); --blocks uses it unless --convention."""
    from mergekit_sdxl.io.metadata import json_value

    merged = write_sparse(tmp_path / "merged.safetensors", table_entries("sdxl"),
                          {"mergekit_sdxl.recipe": json_value({"convention": "sd-mecha", "steps": {}})})
    blocks = inspect_json(merged, "--no-hash", "--blocks")["blocks"]
    assert (blocks["convention"], blocks["convention_source"]) == ("sd-mecha", "recorded in mergekit_sdxl.recipe")
    assert "VAE" in blocks["blocks"]  # sd-mecha's table, not the default's
    assert "convention sd-mecha (recorded in mergekit_sdxl.recipe)" in run(merged, "--no-hash", "--blocks")
    given = inspect_json(merged, "--no-hash", "--blocks", "--convention", "supermerger-2023")["blocks"]
    assert (given["convention"], given["convention_source"]) == ("supermerger-2023", "given")
    plain = inspect_json(full_sdxl, "--no-hash", "--blocks")["blocks"]
    assert (plain["convention"], plain["convention_source"]) == ("supermerger", "default")
