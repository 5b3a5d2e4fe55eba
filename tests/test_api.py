"""The Python API (`from mergekit_sdxl import api`) end to end, without Click: a recipe with a LoRA step, the
in-memory merge against the file merge (bit for bit), convert, inspect, hash_file, extract_lora + bake."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mergekit_sdxl import api
from mergekit_sdxl.errors import CheckpointError, MergekitError, OutputError

KEY = "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight"  # a LoRA module of "attn"


@pytest.fixture(autouse=True)
def _without_click(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any import of click, rich or the CLI package during a test fails: the API must not need them."""
    torch.set_num_threads(2)
    blocked = [n for n in sys.modules if n.split(".")[0] in ("click", "rich") or n.startswith("mergekit_sdxl.cli")]
    for name in {"click", "rich", "mergekit_sdxl.cli", *blocked}:
        monkeypatch.setitem(sys.modules, name, None)


@pytest.fixture(scope="module")
def tuned(make_ckpt, tiny_sdxl: Path) -> Path:
    """A fine-tune of tiny_sdxl whose change is low rank (so a rank-8 LoRA captures it)."""
    return make_ckpt(seed=4, like=tiny_sdxl, delta="lowrank:4")


@pytest.fixture(scope="module")
def lora(tmp_path_factory: pytest.TempPathFactory, tiny_sdxl: Path, tuned: Path) -> api.ExtractResult:
    out = tmp_path_factory.mktemp("api-lora") / "tuned.safetensors"
    return api.extract_lora(tiny_sdxl, tuned, out, rank=8, conv_rank=8, text_encoders="off", hash_inputs=False)


def test_importing_the_api_loads_neither_torch_nor_click() -> None:
    code = ("import sys\nimport mergekit_sdxl\nfrom mergekit_sdxl import api\nassert mergekit_sdxl.api is api\n"
            "print(sorted(m for m in ('torch', 'click', 'rich', 'mergekit_sdxl.cli') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_public_surface_is_listed() -> None:
    import mergekit_sdxl

    assert set(mergekit_sdxl.__all__) == {"__version__", "api", "errors"}
    assert {"merge", "merge_to_state_dict", "convert", "inspect", "hash_file", "extract_lora", "bake", "grid",
            "render"} <= set(api.__all__)
    assert all(hasattr(api, name) for name in api.__all__)
    assert (Path(mergekit_sdxl.__file__).parent / "py.typed").is_file()


def test_recipe_with_a_lora_step_in_memory_equals_the_file_bit_for_bit(tmp_path: Path, tiny_sdxl: Path,
                                                                       tuned: Path, lora: api.ExtractResult) -> None:
    recipe = {"models": {"a": str(tiny_sdxl)}, "steps": {"output": {"lora": str(lora.path), "model": "a"}}}
    events: list[api.ProgressEvent] = []
    result = api.merge(recipe, out=tmp_path / "out.safetensors", device="cpu", progress=events.append)
    assert isinstance(result, api.MergeResult) and result.path.is_file() and result.arch == "sdxl"
    assert set(result.input_hashes["a"]) >= {"sha256", "autov2", "autov3"} and result.seconds > 0
    assert events[-1].task == "merging" and events[-1].done == events[-1].total == result.keys
    written = load_file(result.path)
    memory = api.merge_to_state_dict(recipe, device="cpu")
    assert sorted(memory.tensors) == sorted(written)
    assert list(memory.tensors) == [kp.key for kp in memory.plan.keys]  # in the output's order
    for key, tensor in written.items():
        assert memory.tensors[key].dtype == tensor.dtype and torch.equal(memory.tensors[key], tensor), key
    # the step added the adapter: the merged key moved from the base most of the way to the fine-tune
    base, goal = load_file(tiny_sdxl)[KEY].float(), load_file(tuned)[KEY].float()
    assert (written[KEY].float() - goal).norm() < 0.1 * (base - goal).norm()


def test_extract_lora_then_bake_round_trips(tmp_path: Path, tiny_sdxl: Path, tuned: Path,
                                            lora: api.ExtractResult) -> None:
    assert lora.arch == "sdxl" and lora.summary["layers"] > 0 and lora.path.is_file()
    assert any(row.kept and row.key == KEY for row in lora.layers)
    summary = api.inspect(lora.path)  # an adapter gets the adapter summary, not "architecture unknown"
    assert summary.kind == "adapter" and summary.architecture == "sdxl" and summary.text()
    half = api.AdapterSpec(str(lora.path), strength=0.5)
    baked = api.bake(tiny_sdxl, [half], tmp_path / "baked.safetensors")
    assert baked.changed_keys == lora.summary["layers"] and baked.total_keys > baked.changed_keys
    base, goal, got = (load_file(p)[KEY].float() for p in (tiny_sdxl, tuned, baked.path))
    midpoint = (base + goal) / 2
    assert (got - midpoint).norm() < 0.05 * (goal - base).norm()
    untouched = "model.diffusion_model.out.2.bias"
    assert torch.equal(load_file(baked.path)[untouched], load_file(tiny_sdxl)[untouched])


def test_convert_inspect_and_hash(tmp_path: Path, tiny_sdxl: Path) -> None:
    converted = api.convert(tiny_sdxl, tmp_path / "fp32.safetensors", "fp32")
    source, out = load_file(tiny_sdxl), load_file(converted.path)
    assert converted.tensors == len(source) and converted.cast > 0 and not converted.clamped
    assert all(out[k].dtype == torch.float32 for k in source if source[k].is_floating_point())
    assert all(torch.equal(out[k], source[k].to(out[k].dtype)) for k in source)
    inspected = api.inspect(converted.path, blocks=True, convention="supermerger")
    assert inspected.architecture == "sdxl" and inspected.report["n_keys"] == len(source)
    assert inspected.report["blocks"] is not None and "sdxl" in inspected.text().lower()
    hashed = api.hash_file(converted.path, use_cache=False)
    assert hashed.sha256 == hashlib.sha256(converted.path.read_bytes()).hexdigest()
    assert hashed.autov2 == hashed.sha256[:10] and not hashed.from_cache
    assert api.hash_file(converted.path).from_cache


def test_errors_are_the_package_exceptions(tmp_path: Path, tiny_sdxl: Path) -> None:
    recipe = {"models": {"a": str(tmp_path / "missing.safetensors")}, "steps": {"output": "a"}}
    with pytest.raises(CheckpointError, match="missing.safetensors") as caught:
        api.merge(recipe, out=tmp_path / "out.safetensors", device="cpu")
    assert caught.value.exit_code == 4 and not (tmp_path / "out.safetensors").exists()
    with pytest.raises(OutputError):  # the output is an input: refused before anything is written
        api.convert(tiny_sdxl, tiny_sdxl, "fp16", overwrite=True)
    with pytest.raises(MergekitError):
        api.inspect(tmp_path / "nothing.safetensors")


def test_plan_grid_checks_a_lora_step_axis_without_rendering(tmp_path: Path, tiny_sdxl: Path,
                                                            lora: api.ExtractResult) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"models: {{a: {tiny_sdxl}}}\nsteps:\n  output: {{lora: {lora.path}, model: a}}\n")
    job = api.plan_grid(api.GridOptions(recipe=recipe, x=("output.strength=0,0.5,1",), seeds=(1, 2), device="cpu"))
    job.check()
    assert len(job.plan.cells) == 6 and len(job.plan.by_model()) == 3 and "r.yaml" in job.title
    with pytest.raises(MergekitError, match="nosuch"):
        api.plan_grid(api.GridOptions(recipe=recipe, x=("nosuch.alpha=0,1",), device="cpu")).check()
    with pytest.raises(MergekitError, match="not both"):
        api.plan_grid(api.GridOptions(models=(tiny_sdxl,), recipe=recipe))


@pytest.mark.slow
def test_render_writes_one_png_with_its_parameters(tmp_path: Path, tiny_sdxl: Path) -> None:
    from PIL import Image

    result = api.render(tiny_sdxl, tmp_path / "out", prompt="1girl, solo", seed=7, steps=2, size="64x64",
                        device="cpu", dtype="fp32")
    assert len(result.cells) == 1 and result.grid.is_file() and result.report.is_file()
    with Image.open(result.cells[0].path) as image:
        assert image.size == (64, 64)
        text = image.info["parameters"]
    assert text.startswith("1girl, solo") and "Steps: 2" in text and "Seed: 7" in text
