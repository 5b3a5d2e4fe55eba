"""XY(Z) grids: axes over recipe parameters, single blocks, joint axes, presets, pinpoint; grid.png metadata."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from mergekit_sdxl.cli.main import cli
from mergekit_sdxl.errors import UsageError
from mergekit_sdxl.recipe.parser import parse_recipe
from mergekit_sdxl.sampler.axes import axis, parse_flag, pinpoint_axis
from mergekit_sdxl.sampler.gridplan import GridPlan, variant

COMMON = ["-p", "a cat", "-n", "", "--steps", "2", "--size", "64x64", "--device", "cpu", "--dtype", "fp32",
          "--sampler", "euler", "--no-diff"]


@pytest.fixture(autouse=True)
def one_thread(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def pair(make_ckpt, tiny_sdxl):
    return tiny_sdxl, make_ckpt(seed=3, like=tiny_sdxl, delta="noise:0.1")


@pytest.fixture(scope="module")
def reference(pair, tmp_path_factory):
    """A and B rendered straight from their files, seeds 1 and 2 (models are the columns, seeds the rows), by batch
    size: `reference(2)[model, seed]`.

    Bit-exact comparisons need the same torch thread count and the same batches on both sides: torch's CPU
    kernels (convolutions, matrix products) split their sums by thread and by batch size, which moves the last
    bits of the latents (~2e-4 here) and flips a few 8-bit pixel values. So the references are rendered inside
    the tests (after `one_thread`; a module fixture is set up before function fixtures) with the batch size of
    the cells they are compared with."""
    cache: dict = {}

    def render(batch_size):
        assert torch.get_num_threads() == 1
        if batch_size not in cache:
            out = tmp_path_factory.mktemp(f"ref{batch_size}")
            _run(["grid", "--models", str(pair[0]), str(pair[1]), "--y", "seed=1,2", *COMMON, "--batch-size",
                  str(batch_size), "-o", str(out)])
            cache[batch_size] = {(m, s): _pixels(out / f"z00_y{s - 1:02d}_x{m:02d}.png") for m in (0, 1)
                                 for s in (1, 2)}
        return cache[batch_size]

    return render


def _recipe(tmp_path, pair, alpha="0"):
    path = tmp_path / "r.yaml"
    path.write_text(f"version: 1\narch: sdxl\nmodels:\n  a: {pair[0]}\n  b: {pair[1]}\n"
                    f"steps:\n  out:\n    method: weighted_sum\n    a: a\n    b: b\n    alpha: {alpha}\n")
    return path


def _run(args):
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def _pixels(path):
    from PIL import Image

    return torch.tensor(list(Image.open(path).convert("RGB").tobytes()))


def _different(a, b):
    return float((a - b).abs().float().mean()) > 2


def test_block_axis_by_seed(tmp_path, pair, reference):
    from PIL import Image

    out = tmp_path / "g"
    _run(["grid", "--recipe", str(_recipe(tmp_path, pair)), "--x", "out.alpha[IN04]=0,1", "--y", "seed=1,2",
          *COMMON, "--batch-size", "2", "-o", str(out)])
    names = sorted(p.name for p in out.glob("z*.png"))
    assert names == ["z00_y00_x00.png", "z00_y00_x01.png", "z00_y01_x00.png", "z00_y01_x01.png"]
    for x, value in enumerate(("0", "1")):
        for y, seed in enumerate((1, 2)):
            text = Image.open(out / f"z00_y{y:02d}_x{x:02d}.png").info["parameters"]
            assert f"Seed: {seed}," in text and f'\\"out.alpha[IN04]\\": \\"{value}\\"' in text
    # IN04 = 0 on a constant 0 is model A bit for bit (seeds 1 and 2 batched, like the reference); IN04 = 1 is not
    ref = reference(2)
    assert torch.equal(_pixels(out / "z00_y00_x00.png"), ref[0, 1])
    assert torch.equal(_pixels(out / "z00_y01_x00.png"), ref[0, 2])
    assert _different(_pixels(out / "z00_y00_x01.png"), ref[0, 1])
    grid = json.loads(Image.open(out / "grid.png").info["mergekit_grid"])
    assert grid["axes"]["x"] == {"title": "out.alpha[IN04]", "values": ["0", "1"]}
    assert grid["axes"]["y"] == {"title": "seed", "values": ["1", "2"]}
    assert [(c["x"], c["y"], c["settings"]) for c in grid["cells"]][-1] == (1, 1, {"seed": "2",
                                                                                   "out.alpha[IN04]": "1"})
    assert "Seed: 1" in Image.open(out / "grid.png").info["parameters"]
    assert (out / "index.html").is_file()


def test_joint_axis_with_a_preset(tmp_path, pair, reference):
    out = tmp_path / "j"
    result = _run(["grid", "--recipe", str(_recipe(tmp_path, pair, "0.5")), "--x", "out.alpha=ALL_A;1",
                   "--x", "seed=1,2", *COMMON, "--batch-size", "2", "-o", str(out)])
    assert sorted(p.name for p in out.glob("z*.png")) == ["z00_y00_x00.png", "z00_y00_x01.png"]
    ref = reference(1)  # each cell is its own model here, rendered alone
    assert torch.equal(_pixels(out / "z00_y00_x00.png"), ref[0, 1])  # preset ALL_A (all 0) with seed 1: A
    assert torch.equal(_pixels(out / "z00_y00_x01.png"), ref[1, 2])  # alpha 1 with seed 2: B
    assert _different(ref[0, 1], ref[1, 2])
    assert "2 model(s)" in result.output


def test_variants_merge_once_and_settings_reuse_the_model(tmp_path, pair):
    x = axis(["out.alpha=0,1"])
    y = axis(["cfg=4,5", "steps=1,2"])  # joint
    z = axis(["seed=3,4"])
    plan = GridPlan.build(x, y, z)
    assert len(plan.cells) == 8 and len(plan.by_model()) == 2
    order = [cell for _, cells in plan.by_model() for cell in cells]
    assert [c.model_key for c in order] == [(("out.alpha", "0"),)] * 4 + [(("out.alpha", "1"),)] * 4
    assert y.points[1].label == "cfg 5 | steps 2" and y.points[1].settings[1].value == 2


def test_pinpoint_one_column_per_block(tmp_path, pair):
    recipe = _recipe(tmp_path, pair, "0.25")
    result = _run(["grid", "--recipe", str(recipe), "--pinpoint", "out.alpha=1", "--y", "seed=1,2", *COMMON,
                   "--dry-run", "-o", str(tmp_path / "p")])
    assert "x: out.alpha[block] = 1 (20 values): BASE, IN00, IN01" in result.output
    assert "40 cell(s), 20 model(s)" in result.output
    assert not (tmp_path / "p").exists()
    from mergekit_sdxl.arch.blocks import block_names
    from mergekit_sdxl.arch.mbw import parse_mbw

    parsed = parse_recipe({"arch": "sdxl", "models": {"a": "a", "b": "b"},
                           "steps": {"out": {"method": "weighted_sum", "a": "a", "b": "b", "alpha": 0.25}}})
    ax = pinpoint_axis("out.alpha=1", block_names("sdxl"))
    assert [p.label for p in ax.points] == list(block_names("sdxl"))
    for point in ax.points:
        weights = parse_mbw(variant(parsed, point.settings, "sdxl").steps["out"].params[0].blocks, "sdxl")
        assert {b for b, w in weights.items() if w == 1} == {point.label}
        assert {w for b, w in weights.items() if b != point.label} == {0.25}


@pytest.mark.parametrize(("flag", "message"), [
    ("colour=1,2", "unknown kind 'colour'; valid kinds: model, seed, prompt, negative, steps, cfg, sampler"),
    ("seed=1,x", "seed values are whole numbers"),
    ("seed", "expected KIND=V1,V2"),
    ("out.alpha[IN99x]=1", "not a block name"),
])
def test_axis_errors_name_the_problem(flag, message):
    with pytest.raises(UsageError, match=message.replace("[", r"\[")):
        parse_flag(flag)


def test_grid_usage_errors_exit_2(tmp_path, pair, capsys):
    from mergekit_sdxl.cli.main import main

    recipe = _recipe(tmp_path, pair)
    cases = [
        (["--x", "out.alpha=0,1", "--x", "seed=1,2,3"], "same number of values"),
        (["--x", "seed=1,2", "--y", "seed=3"], "varies on two axes"),
        (["--x", "out.beta=1"], "has no parameter 'beta'"),
        (["--x", "nope.alpha=1"], "no step 'nope'"),
        (["--x", "sampler=euler,warp"], "unknown sampler 'warp'"),
        (["--pinpoint", "out.alpha=1", "--x", "seed=1"], "drop --x"),
    ]
    for args, message in cases:
        with pytest.raises(SystemExit) as exc:
            main(["grid", "--recipe", str(recipe), *args, *COMMON, "--dry-run", "-o", str(tmp_path / "e")])
        err = capsys.readouterr().err
        assert exc.value.code in (2, 3) and message in " ".join(err.split()), (args, err)
    assert not (tmp_path / "e").exists()


def test_value_separators():
    vector = ",".join(["0.1"] * 20)
    assert parse_flag(f"out.alpha={vector};")[2] == [vector]  # one whole vector
    assert parse_flag("out.alpha=GRAD_V;GRAD_A")[2] == ["GRAD_V", "GRAD_A"]
    assert parse_flag("prompt=1girl, smile;1boy, night")[2] == ["1girl, smile", "1boy, night"]
    assert parse_flag("negative=;lowres")[2] == ["", "lowres"]
    assert parse_flag("seed=1, 2,3")[2] == [1, 2, 3]
    assert parse_flag("model=anxl3=/m/a.safetensors;anxl3=/m/b.safetensors")[2][1] == "anxl3=/m/b.safetensors"
