"""`mergekit-sdxl optimize` through the CLI (run, --report, --resume, refusals), pruning after the first images, and
best.yaml for formula and LoRA steps."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml
from search_helpers import write_recipe, write_space

pytest.importorskip("optuna")


def _cli(*args: object) -> int:
    """Run the CLI's entry point in-process; its exit code (stdout/stderr go to capsys)."""
    from mergekit_sdxl.cli.main import main

    try:
        main([str(a) for a in args])
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def _study(out: Path, name: str = "recipe"):
    import optuna

    return optuna.load_study(study_name=name, storage=f"sqlite:///{out / 'study.db'}")


def test_cli_run_report_resume_and_refusals(tmp_path, make_ckpt, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    a = make_ckpt("sdxl", seed=1)
    recipe = write_recipe(tmp_path, a, make_ckpt(seed=2, like=a, delta="noise:0.5"))
    space = write_space(tmp_path, {"output.alpha[IN04]": [0, 1]})
    out = tmp_path / "out"
    common = ["--scorer", "python:test_search_study:_brightness", "-o", out, "--device", "cpu", "--dtype", "fp32",
              "--threads", "1"]
    assert _cli("optimize", recipe, "--space", space, "--trials", "2", *common) == 0
    assert capsys.readouterr().out.strip() == str(out / "best.yaml")
    (out / "results.csv").unlink()
    # --report: outputs again from the storage alone
    assert _cli("optimize", "--report", "--study", "recipe", "-o", out) == 0
    assert (out / "results.csv").read_text().count("\n") == 3
    # --resume: recipe, space and scorers as the study recorded them
    assert _cli("optimize", "--resume", "--study", "recipe", "--trials", "3", "-o", out, "--threads", "1",
                "--device", "cpu", "--dtype", "fp32") == 0
    assert len(_study(out).trials) == 3
    # another space for the same study is refused (exit 2), and nothing runs
    other = write_space(tmp_path, {"output.alpha[OUT04]": [0, 1]})
    assert _cli("optimize", recipe, "--space", other, "--trials", "4", *common) == 2
    assert "another recipe, space" in capsys.readouterr().err
    assert len(_study(out).trials) == 3
    # usage errors
    assert _cli("optimize", recipe, "--space", space, "-o", out) == 2  # no scorer
    assert _cli("optimize", "--resume", "--study", "nope", "-o", out) == 2
    assert "no study 'nope'" in capsys.readouterr().err


def _falling(images, context):
    """Later trials score lower, on their first images too: the median pruner stops them."""
    return -float(context["trial"])


def test_trials_below_the_median_are_pruned_after_the_first_images(tmp_path, make_ckpt, monkeypatch):
    from mergekit_sdxl.search.optimize import OptimizeRequest, optimize

    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    a = make_ckpt("sdxl", seed=1)
    recipe = write_recipe(tmp_path, a, make_ckpt(seed=2, like=a, delta="noise:0.5"))
    space = write_space(tmp_path, {"output.alpha[IN04]": [0, 1]},
                        payload={"prompts": ["1girl"], "negative": "", "seeds": [1, 2], "size": "64x64", "steps": 2,
                                 "batch_size": 1})
    optimize(OptimizeRequest(out_dir=tmp_path / "out", recipe=recipe, space=space,
                             scorers=["python:test_search_cli:_falling"], trials=6, device="cpu", dtype="fp32",
                             threads=1), notify=lambda m: None)
    trials = _study(tmp_path / "out").trials
    assert [t.state.name for t in trials] == ["COMPLETE"] * 5 + ["PRUNED"]
    assert trials[5].user_attrs["first_images_score"] == -5.0
    assert len(trials[5].user_attrs["images"]) == 1 and len(trials[4].user_attrs["images"]) == 2


def _steps(recipe) -> dict:
    import dataclasses

    from mergekit_sdxl.recipe.types import MethodStep

    return {name: dataclasses.replace(step, params=tuple(dataclasses.replace(p, where="") for p in step.params))
            if isinstance(step, MethodStep) else step for name, step in recipe.steps.items()}


def test_best_recipe_writes_formula_numbers_and_lora_strengths(tmp_path):
    from mergekit_sdxl.recipe.load import load_recipe
    from mergekit_sdxl.search.best import best_recipe_text
    from mergekit_sdxl.search.space import apply_values, parse_space

    (tmp_path / "models").mkdir()
    data = {"arch": "sdxl", "models": {"a": "models/a.safetensors", "b": {"path": "models/b.safetensors"}},
            "steps": {"mix": "a + 0.5 * (b - a)",
                      "styled": {"lora": [{"path": "style.safetensors", "strength": 0.3}, "other.safetensors"],
                                 "model": "mix"},
                      "output": {"method": "weighted_sum", "a": "styled", "b": "b",
                                 "alpha": {"value": 0.5, "overrides": [{"match": "time_embed", "value": 0.0}]}}},
            "output": {"path": "out/merged.safetensors"}}
    source = tmp_path / "recipe.yaml"
    source.write_text(yaml.safe_dump(data, sort_keys=False))
    recipe = load_recipe(source)
    space = parse_space({"params": {"mix.coef[b]": [0, 1], "styled.strength": [0, 2], "output.alpha[IN04]": [0, 1]},
                         "payload": {"prompts": ["x"]}})
    dims = space.dimensions(recipe, "sdxl")
    values = {"mix.coef[b]": 0.25, "styled.strength": 1.5, "output.alpha[IN04]": 0.75}
    variant = apply_values(recipe, dims, values, "sdxl")
    elsewhere = tmp_path / "opt"
    elsewhere.mkdir()
    (elsewhere / "best.yaml").write_text(best_recipe_text(source, variant, dims, "best trial 3"))
    again = load_recipe(elsewhere / "best.yaml")
    # formula, both adapters' strengths, the alpha vector and its override (`where` names the file: differs)
    assert _steps(again) == _steps(variant)
    assert {k: v.path for k, v in again.models.items()} == {k: os.path.abspath(v.path)
                                                             for k, v in recipe.models.items()}
    assert again.output.path == str((tmp_path / "out/merged.safetensors").resolve())
    assert (elsewhere / "best.yaml").read_text().startswith("# best trial 3\n")


def test_models_named_by_hash_are_found_through_the_model_index(tmp_path, make_ckpt, monkeypatch):
    """optimize resolves a model named only by hash with index.resolve.resolve_recipe (as merge does), and its
    workers load the file the index found."""
    import shutil

    from mergekit_sdxl.io.hashes import hash_file
    from mergekit_sdxl.search.optimize import OptimizeRequest, optimize

    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    a = make_ckpt("sdxl", seed=1)
    folder = tmp_path / "models"
    folder.mkdir()
    b = shutil.copy(make_ckpt(seed=2, like=a, delta="noise:0.5"), folder / "b.safetensors")
    recipe = write_recipe(tmp_path, a, b)
    data = yaml.safe_load(recipe.read_text())
    data["models"]["b"] = {"autov2": hash_file(b).autov2}  # no path: only the index can find it
    recipe.write_text(yaml.safe_dump(data, sort_keys=False))
    space = write_space(tmp_path, {"output.alpha[IN04]": [0, 1]})
    result = optimize(OptimizeRequest(out_dir=tmp_path / "out", recipe=recipe, space=space,
                                      scorers=["python:test_search_cli:_falling"], trials=1, device="cpu",
                                      dtype="fp32", threads=1, models_dirs=[folder], db=tmp_path / "index.db"),
                      notify=lambda m: None)
    assert result.trials_run == 1
    assert [t.state.name for t in _study(tmp_path / "out").trials] == ["COMPLETE"]
