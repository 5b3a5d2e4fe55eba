"""LoRA metadata as kohya sd-scripts writes it (networks/extract_lora_from_models.py, networks/resize_lora.py,
library/sai_model_spec.py): ss_network_dim an int, alphas as floats ("16.0"), ss_network_args "{}" without conv
layers and {"conv_dim": "4", "conv_alpha": "4.0"} with them, "Dynamic" dim and alpha for dynamic ranks, ModelSpec
1.0.1 with modelspec.date and modelspec.prediction_type."""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone

import pytest

from mergekit_sdxl.errors import UsageError
from mergekit_sdxl.io.reader import open_checkpoint
from mergekit_sdxl.lora.extract import ExtractOptions, extract_lora
from mergekit_sdxl.lora.kohya import modelspec_date
from mergekit_sdxl.lora.resize import ResizeOptions, resize_lora
from mergekit_sdxl.lora.svd import RankRule

EPOCH = 1_700_000_000  # 2023-11-14T22:13:20Z


@pytest.fixture(scope="module")
def pair(make_ckpt):
    base = make_ckpt("sd15", seed=0, dtype="F32")
    return base, make_ckpt(seed=1, like=base, delta="lowrank:4", dtype="F32")


def _meta(path):
    with open_checkpoint(path) as reader:
        return dict(reader.metadata)


def test_fixed_rank_attn(pair, tmp_path, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", str(EPOCH))
    out = tmp_path / "a.safetensors"
    extract_lora(*pair, out, ExtractOptions(rank=RankRule("fixed", 4), text_encoders="on"))
    meta = _meta(out)
    assert (meta["ss_network_dim"], meta["ss_network_alpha"], meta["ss_network_args"]) == ("4", "4.0", "{}")
    assert meta["modelspec.sai_model_spec"] == "1.0.1"
    assert meta["modelspec.prediction_type"] == "epsilon"
    assert meta["modelspec.date"] == "2023-11-14T22:13:20+00:00"
    assert meta["ss_v2"] == "False" and meta["ss_base_model_version"] == "sd_v1"


def test_given_alpha_and_conv_args(pair, tmp_path):
    out = tmp_path / "c.safetensors"
    extract_lora(*pair, out, ExtractOptions(rank=RankRule("fixed", 4), conv_rank=RankRule("fixed", 2), alpha=2,
                                            preset="attn+conv", text_encoders="on"))
    meta = _meta(out)
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("4", "2.0")
    assert meta["ss_network_args"] == '{"conv_dim": "2", "conv_alpha": "2.0"}'  # json.dumps as kohya calls it
    newest = max(os.stat(p).st_mtime for p in pair)
    assert meta["modelspec.date"] == datetime.fromtimestamp(int(newest), timezone.utc).isoformat()


def test_dynamic_resize_says_dynamic(pair, tmp_path):
    src = tmp_path / "src.safetensors"
    extract_lora(*pair, src, ExtractOptions(rank=RankRule("fixed", 4), text_encoders="on"))
    fixed, dynamic = tmp_path / "f.safetensors", tmp_path / "d.safetensors"
    resize_lora(src, fixed, ResizeOptions(rank=RankRule("fixed", 2)))
    resize_lora(src, dynamic, ResizeOptions(rank=RankRule("fro", 4, 0.9)))
    meta = _meta(fixed)
    assert (meta["ss_network_dim"], meta["ss_network_alpha"], meta["ss_network_args"]) == ("2", "2.0", "{}")
    meta = _meta(dynamic)
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("Dynamic", "Dynamic")
    assert json.loads(meta["mergekit_sdxl.lora"])["rank"].startswith("fro")


def test_outputs_are_dated_by_their_inputs_recorded_dates(pair, tmp_path):
    """resize/merge-lora take the input adapter's modelspec.date (not its file time), so re-running on a fresh copy
    of the same adapter gives the same bytes; an input without one is dated by its modification time."""
    src = tmp_path / "src.safetensors"
    extract_lora(*pair, src, ExtractOptions(rank=RankRule("fixed", 4), text_encoders="on"))
    recorded = _meta(src)["modelspec.date"]
    os.utime(src, (EPOCH, EPOCH))  # the file's own time says 2023; its metadata says otherwise
    out = tmp_path / "r.safetensors"
    resize_lora(src, out, ResizeOptions(rank=RankRule("fixed", 2)))
    assert _meta(out)["modelspec.date"] == recorded != "2023-11-14T22:13:20+00:00"
    assert modelspec_date([(src, {"modelspec.date": "2024-01-02T03:04:05"})]) == "2024-01-02T03:04:05+00:00"
    assert modelspec_date([(src, {"modelspec.date": "not a date"})]) == "2023-11-14T22:13:20+00:00"


def test_bad_source_date_epoch_is_a_usage_error(monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "yesterday")
    with pytest.raises(UsageError, match="SOURCE_DATE_EPOCH"):
        modelspec_date([])
