"""A1111 re-merge of our files: A1111's metadata reader parses every value starting with "{" as JSON, and its
checkpoint merger (default settings: "Copy metadata from merged models" on) re-serialises only sd_merge_recipe /
sd_merge_models before safetensors saves the rest, which must be str. Every checkpoint we write (merge, convert,
bake, make-test-checkpoint) must survive that round trip, and our sd_merge_recipe must carry A1111's field types.
The A1111 side is tests/published_tools.py (written from A1111's source, independently of the code under test)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from published_tools import a1111_merge, a1111_metadata_of
from safetensors import safe_open
from safetensors.torch import save_file

from mergekit_sdxl.cli.main import main
from mergekit_sdxl.io.metadata import a1111_safe, json_value

A1111_OBJECT_KEYS = {"sd_merge_recipe", "sd_merge_models"}


def run_cli(*argv: object) -> int:
    try:
        main(["--quiet", *map(str, argv)])
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def resave_as_a1111(path: Path, out: Path) -> dict[str, object]:
    """A1111's merger with "No interpolation" on `path` alone: read, parse "{"-values, copy, save with safetensors.
    Returns the output's metadata as A1111 reads it."""
    a1111_merge(out, path, None, None, "No interpolation", 0.0, copy_metadata=True)
    return a1111_metadata_of(out)


def parsed_objects(path: Path) -> set[str]:
    return {key for key, value in a1111_metadata_of(path).items() if not isinstance(value, str)}


@pytest.fixture(scope="module")
def merged(tmp_path_factory: pytest.TempPathFactory, tiny_sdxl_family: dict[str, Path]) -> Path:
    folder = tmp_path_factory.mktemp("a1111")
    recipe = folder / "mix.yaml"
    recipe.write_text(f"models: {{a: {tiny_sdxl_family['base8']}, b: {tiny_sdxl_family['beta7']}, "
                      f"v: {tiny_sdxl_family['anxl2']}}}\n"
                      "steps:\n  out: {method: weighted_sum, a: a, b: b, alpha: 0.3}\n"
                      "output: {vae: v, metadata: {user.note: '{\"k\": 1}'}}\n")
    out = folder / "mix.safetensors"
    assert run_cli("merge", recipe, "-o", out) == 0
    return out


def test_plain_safetensors_refuses_parsed_values(tmp_path: Path) -> None:
    """The failure this guards against, shown on safetensors itself (so the round trip below has teeth)."""
    with pytest.raises(TypeError):
        save_file({"x": torch.zeros(1)}, tmp_path / "x.safetensors", metadata={"k": {"a": 1}})  # type: ignore[dict-item]


def test_merged_file_survives_a1111_remerge(merged: Path, tmp_path: Path) -> None:
    assert parsed_objects(merged) == A1111_OBJECT_KEYS  # our recipe, the user's JSON value: strings to A1111
    meta = resave_as_a1111(merged, tmp_path / "again.safetensors")
    ours = json.loads(str(meta["mergekit_sdxl.recipe"]))  # copied through as text, still JSON
    assert ours["steps"]["out"]["method"] == "weighted_sum"
    assert json.loads(str(meta["user.note"])) == {"k": 1}
    lineage = meta["sd_merge_models"]
    assert isinstance(lineage, dict)
    with safe_open(merged, "pt") as f:
        mine = json.loads(f.metadata()["sd_merge_recipe"])
    assert any(entry.get("sd_merge_recipe") == mine for entry in lineage.values())


def test_sd_merge_recipe_has_a1111_types(merged: Path, tiny_sdxl_family: dict[str, Path]) -> None:
    recipe = a1111_metadata_of(merged)["sd_merge_recipe"]
    assert isinstance(recipe, dict)
    assert type(recipe["multiplier"]) is float and recipe["multiplier"] == 0.3  # the output step's alpha
    assert recipe["bake_in_vae"] == tiny_sdxl_family["anxl2"].name  # VAE taken from model `v`
    assert isinstance(recipe["save_as_half"], bool) and isinstance(recipe["config_source"], int)


def test_no_vae_and_no_scalar_alpha(tiny_sdxl_family: dict[str, Path], tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"models: {{a: {tiny_sdxl_family['base8']}, b: {tiny_sdxl_family['beta7']}}}\n"
                      "steps:\n  out: {formula: 0.25*a + 0.75*b}\n")
    out = tmp_path / "f.safetensors"
    assert run_cli("merge", recipe, "-o", out) == 0
    fields = a1111_metadata_of(out)["sd_merge_recipe"]
    assert isinstance(fields, dict)
    assert fields["bake_in_vae"] == "None" and fields["multiplier"] == 0.0 and type(fields["multiplier"]) is float


def test_converted_baked_and_synthetic_files_survive(merged: Path, tiny_sdxl: Path, tmp_path: Path) -> None:
    assert parsed_objects(tiny_sdxl) == set()  # mergekit_sdxl.synth
    resave_as_a1111(tiny_sdxl, tmp_path / "synth.safetensors")
    converted = tmp_path / "c.safetensors"
    assert run_cli("convert", merged, converted, "--dtype", "bf16") == 0
    assert parsed_objects(converted) == A1111_OBJECT_KEYS  # mergekit.convert and the copied values
    resave_as_a1111(converted, tmp_path / "c2.safetensors")
    lora = tmp_path / "l.safetensors"
    assert run_cli("extract-lora", tiny_sdxl, merged, "-o", lora, "--rank", "2", "--no-hash") == 0
    baked = tmp_path / "b.safetensors"
    assert run_cli("bake", merged, lora, "-o", baked) == 0
    assert parsed_objects(baked) == A1111_OBJECT_KEYS  # mergekit_sdxl.bake
    resave_as_a1111(baked, tmp_path / "b2.safetensors")


def test_recipe_from_reads_the_newest_record(merged: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A1111 copies our mergekit_sdxl.recipe into its output; the newest record there is A1111's sd_merge_recipe."""
    again = tmp_path / "again.safetensors"
    resave_as_a1111(merged, again)
    out = tmp_path / "r.yaml"
    assert run_cli("recipe-from", again, "-o", out) == 0
    assert "A1111" in out.read_text()


def test_a1111_safe_keeps_json_and_non_json() -> None:
    meta = a1111_safe({"sd_merge_recipe": '{"a":1}', "x": '{"a":1}', "t": "{not json", "s": "plain", "e": ""})
    assert meta == {"sd_merge_recipe": '{"a":1}', "x": ' {"a":1}', "t": "{not json", "s": "plain", "e": ""}
    assert json.loads(json_value({"b": 1, "a": [1]})) == {"a": [1], "b": 1}
    assert json_value([1]) == "[1]"
