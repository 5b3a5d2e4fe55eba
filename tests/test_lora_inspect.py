"""`inspect` on LoRA files: a LoRA summary (naming, algorithms, architecture and what told it, rank/alpha per
component, module count, block coverage) in text and JSON, instead of "architecture unknown"."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from mergekit_sdxl.arch.blocks import block_names
from mergekit_sdxl.arch.registry import arch_name
from mergekit_sdxl.cli.main import cli
from mergekit_sdxl.lora.extract import ExtractOptions, extract_lora
from mergekit_sdxl.lora.summary import SCHEMA
from mergekit_sdxl.lora.svd import RankRule


def inspect(*args: object) -> str:
    result = CliRunner().invoke(cli, ["inspect", *map(str, args)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def pair(make_ckpt):
    base = make_ckpt("sd15", seed=0, dtype="F32")
    return base, make_ckpt(seed=1, like=base, delta="lowrank:4", dtype="F32")


@pytest.fixture(scope="module")
def loras(pair, tmp_path_factory):
    folder = tmp_path_factory.mktemp("inspect-lora")
    made = {}
    for name, options in {
        "kohya": ExtractOptions(rank=RankRule("fixed", 4), alpha=2, text_encoders="on"),
        "unet_only": ExtractOptions(rank=RankRule("fixed", 3), text_encoders="off"),
        "peft": ExtractOptions(rank=RankRule("fixed", 4), text_encoders="on", fmt="peft"),
        "dynamic": ExtractOptions(rank=RankRule("fro", 4, 0.5), text_encoders="on", preset="attn+conv"),
    }.items():
        made[name] = folder / f"{name}.safetensors"
        made[name + "_report"] = extract_lora(*pair, made[name], options)
    return made


def test_kohya_lora_summary(loras):
    summary = json.loads(inspect(loras["kohya"], "--json"))
    assert summary["schema"] == SCHEMA and summary["kind"] == "adapter" and summary["naming"] == "kohya"
    assert (summary["architecture"], summary["architecture_source"]) == ("sd15", "key names")
    kept = loras["kohya_report"].kept
    assert summary["n_modules"] == len(kept) and summary["algorithms"] == {"lora": len(kept)}
    by_component = {c: sum(r.component == c for r in kept) for c in {r.component for r in kept}}
    assert {c: row["modules"] for c, row in summary["components"].items()} == by_component
    assert all(row["ranks"] == {"4": row["modules"]} and row["alphas"] == {"2.0": row["modules"]}
               for row in summary["components"].values())
    cover = summary["blocks"]["modules"]
    assert list(cover) == list(block_names("sd15")) and cover["BASE"] == by_component["clip_l"]
    assert sum(cover.values()) == len(kept) and summary["unknown_keys"] == []
    text = inspect(loras["kohya"])
    assert f"architecture  {arch_name('sd15')} (from key names)" in text and "kohya names (lora " in text
    assert "rank 4 x" in text and "alpha 2.0 x" in text and "blocks        " in text
    assert "architecture  unknown" not in text


def test_unet_only_lora_takes_the_architecture_from_metadata(loras):
    summary = json.loads(inspect(loras["unet_only"], "--json"))
    assert (summary["architecture"], summary["architecture_source"]) == ("sd15", "ss_base_model_version")
    assert set(summary["components"]) == {"unet"} and summary["blocks"]["modules"]["BASE"] == 0


def test_peft_and_dynamic(loras):
    peft = json.loads(inspect(loras["peft"], "--json"))
    assert peft["naming"] == "peft" and peft["architecture"] == "sd15"
    assert all(row["alphas"] == {"-": row["modules"]} for row in peft["components"].values())  # none stored
    dynamic = json.loads(inspect(loras["dynamic"], "--json"))
    ranks = {rank for row in dynamic["components"].values() for rank in row["ranks"]}
    assert ranks == {str(r.rank) for r in loras["dynamic_report"].kept}
