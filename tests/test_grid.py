"""`grid` and `diff` commands on tiny real-layout checkpoints (CPU, 64x64 px, few steps)."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from mergekit_sdxl.cli.main import cli
from mergekit_sdxl.errors import UsageError


@pytest.fixture(autouse=True)
def one_thread(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # the hash cache stays out of the home folder
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def variant(make_ckpt, tiny_sdxl):
    return make_ckpt(seed=3, like=tiny_sdxl, delta="noise:0.1")


def _run(args):
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def _pixels(path):
    from PIL import Image

    return torch.tensor(list(Image.open(path).convert("RGB").tobytes()))


def test_grid_models_png_metadata_round_trip(tmp_path, tiny_sdxl, variant, monkeypatch):
    import socket

    from PIL import Image
    from sd_parsers import ParserManager

    from mergekit_sdxl.io.hashes import hashes_for

    def refuse(*args, **kwargs):
        raise AssertionError("a socket was opened")

    monkeypatch.setattr(socket.socket, "connect", refuse)  # building, encoding, sampling: nothing goes online
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    out = tmp_path / "grid"
    result = _run(["grid", "--models", str(tiny_sdxl), str(variant), "-p", "1girl, (smile:1.2)", "-n", "lowres",
                   "--seeds", "3,4", "--steps", "2", "--cfg", "5.5", "--size", "64x64", "--device", "cpu",
                   "--dtype", "fp32", "-o", str(out)])
    grid = Image.open(out / "grid.png")
    assert grid.width > 2 * 64 and grid.height > 2 * 64
    cells = sorted(p.name for p in out.glob("z*.png"))  # models are the columns (x), seeds the rows (y)
    assert cells == ["z00_y00_x00.png", "z00_y00_x01.png", "z00_y01_x00.png", "z00_y01_x01.png"]
    assert "[2/4]" in result.output  # progress per image (stderr is mixed into output)
    assert result.output.count("s per cell") == 1  # the per-cell time is printed once

    info = ParserManager().parse(out / "z00_y01_x01.png")
    [sampler] = info.samplers
    assert sampler.name == "Euler a"
    assert sampler.parameters == {"scheduler": "Uniform", "cfg_scale": "5.5", "seed": "4", "steps": "2"}
    assert [p.value for p in info.prompts] == ["1girl, (smile:1.2)"]
    assert [p.value for p in info.negative_prompts] == ["lowres"]
    assert sampler.model.hash == hashes_for(variant).autov2 and sampler.model.name == variant.stem
    assert info.metadata["Size"] == "64x64"
    # columns differ, rows (seeds) differ
    assert not torch.equal(_pixels(out / "z00_y00_x00.png"), _pixels(out / "z00_y00_x01.png"))
    assert not torch.equal(_pixels(out / "z00_y00_x00.png"), _pixels(out / "z00_y01_x00.png"))


def test_grid_recipe_sweep(tmp_path, tiny_sdxl, variant):
    from PIL import Image
    from sd_parsers import ParserManager

    recipe = tmp_path / "sweep.yaml"
    recipe.write_text(f"version: 1\nmodels:\n  a: {tiny_sdxl}\n  b: {variant}\n"
                      "steps:\n  out:\n    method: weighted_sum\n    a: a\n    b: b\n    alpha: 0.5\n")
    common = ["-p", "a cat", "-n", "", "--seeds", "1", "--steps", "2", "--size", "64x64", "--device", "cpu",
              "--dtype", "fp32", "--sampler", "euler", "--batch-size", "1"]
    _run(["grid", "--recipe", str(recipe), "--sweep", "out.alpha=0,1", *common, "-o", str(tmp_path / "s")])
    _run(["grid", "--models", str(tiny_sdxl), str(variant), *common, "-o", str(tmp_path / "m")])
    # alpha=0 is model a and alpha=1 model b: the same pixels as rendering the files
    for c in ("x00", "x01"):
        assert torch.equal(_pixels(tmp_path / "s" / f"z00_y00_{c}.png"), _pixels(tmp_path / "m" / f"z00_y00_{c}.png"))
    image = Image.open(tmp_path / "s" / "z00_y00_x01.png")
    assert json.loads(image.info["mergekit_recipe"]) == {"recipe": str(recipe), "settings": {"out.alpha": "1"}}
    info = ParserManager().parse(tmp_path / "s" / "z00_y00_x01.png")
    assert info.samplers[0].parameters["seed"] == "1" and info.samplers[0].name == "Euler"
    assert "Merge recipe" in image.info["parameters"]


def test_grid_usage_errors(tmp_path, tiny_sdxl):
    from mergekit_sdxl.sampler.sizes import parse_size

    result = CliRunner().invoke(cli, ["grid", "-o", str(tmp_path)])
    assert isinstance(result.exception, UsageError)
    assert parse_size("portrait") == (832, 1216) and parse_size("13:19") == (832, 1216)
    assert parse_size("1024x1024") == (1024, 1024)
    for bad in ("1000x1001", "huge", "0x512"):
        with pytest.raises(UsageError):
            parse_size(bad)


def test_parameters_text_quotes_like_a1111():
    from mergekit_sdxl.sampler.pngmeta import parameters_text

    text = parameters_text("a", "", 20, "dpmpp_2m", "karras", 7.0, 5, 832, 1216, "0123456789", "m", 2, '{"x": 1}')
    assert text.split("\n") == ["a", 'Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 5, '
                                     'Size: 832x1216, Model hash: 0123456789, Model: m, Clip skip: 2, '
                                     'RNG: CPU, Merge recipe: "{\\"x\\": 1}"']


def test_diff_json_and_heatmap(tmp_path, tiny_sdxl, variant):
    from PIL import Image

    png = tmp_path / "heat.png"
    result = _run(["diff", str(tiny_sdxl), str(variant), "--json", "--heatmap", str(png)])
    data = json.loads(result.stdout)
    rows = {(r["kind"], r["group"]): r for r in data["rows"]}
    assert rows["component", "vae"]["relative_change"] == 0 and rows["component", "vae"]["cosine"] == 1
    assert 0.05 < rows["block", "M00"]["relative_change"] < 0.2 and rows["block", "M00"]["cosine"] < 1
    assert {g for k, g in rows if k == "block"} >= {"BASE", "IN00", "M00", "OUT08"}
    assert Image.open(png).width > 200
    same = json.loads(_run(["diff", str(tiny_sdxl), str(tiny_sdxl), "--json", "--no-heatmap"]).stdout)
    assert all(r["relative_change"] == 0 and r["cosine"] == pytest.approx(1) for r in same["rows"])
