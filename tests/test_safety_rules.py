"""Regression tests for the output rules and bounded-work guarantees of README "Safety" / docs/safety.md that are
easier to state as API-level tests than as corpus cases: where a recipe's output.path writes, linear-time user
regexes, planning cost linear in the recipe's size, and a grid interrupted by Ctrl-C leaving no folder."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from broken_corpus import record  # noqa: E402

from mergekit_sdxl import patterns
from mergekit_sdxl.cli.main import main
from mergekit_sdxl.errors import RecipeError, UsageError
from mergekit_sdxl.recipe.load import load_recipe
from mergekit_sdxl.recipe.parse_output import output_target


def _run(argv: list[str], capsys) -> tuple[int, str]:
    try:
        main(argv)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    return code, capsys.readouterr().err


def _recipe(folder: Path, a: Path, out: str | None) -> Path:
    recipe = folder / "recipe.yaml"
    data: dict = {"models": {"a": str(a), "b": str(a)}, "steps": {"output": "a + 0.5 * (b - a)"}}
    if out is not None:
        data["output"] = {"path": out}
    recipe.write_text(json.dumps(data))
    return recipe


# ------------------------------------------------------------------------------------------------ output.path


def test_output_path_is_relative_to_the_recipe(tmp_path, tiny_sd15, capsys, monkeypatch):
    """Like model paths: the working directory does not matter (it used to)."""
    folder = tmp_path / "recipes"
    folder.mkdir()
    recipe = _recipe(folder, tiny_sd15, "merged.safetensors")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    code, err = _run(["-q", "merge", str(recipe), "--no-input-hashes"], capsys)
    assert code == 0, err
    assert (folder / "merged.safetensors").is_file() and list(elsewhere.iterdir()) == []
    record("rules", "output-path-relative-to-recipe", True, new=True)


def test_absolute_output_path_needs_out(tmp_path, tiny_sd15, capsys):
    target = tmp_path / "victim.safetensors"
    target.write_bytes(b"someone's file")
    recipe = _recipe(tmp_path, tiny_sd15, str(target))
    for extra in ([], ["--overwrite"], ["--dry-run"]):
        code, err = _run(["merge", str(recipe), *extra], capsys)
        assert code == 3 and "output.path" in err and "is absolute" in err, err
    assert target.read_bytes() == b"someone's file"
    chosen = tmp_path / "chosen.safetensors"
    code, err = _run(["-q", "merge", str(recipe), "-o", str(chosen), "--no-input-hashes"], capsys)
    assert code == 0 and chosen.is_file(), err  # --out is the user's own choice
    record("rules", "absolute-output-path", True, new=True)


@pytest.mark.parametrize("text", ["/tmp/x.safetensors", "~/x.safetensors", "C:\\models\\x.safetensors",
                                  "\\\\server\\share\\x.safetensors", "sub/../../x.safetensors"])
def test_output_paths_that_leave_the_folder(tmp_path, text):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({"models": {"a": "a.safetensors"}, "steps": {"output": "a"},
                                  "output": {"path": text}}))
    with pytest.raises(RecipeError, match="output.path"):
        output_target(load_recipe(recipe).output, str(recipe))


def test_symlink_escape_refused(tmp_path, tiny_sd15, capsys):
    folder = tmp_path / "shared"
    folder.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (folder / "out").symlink_to(outside)
    recipe = _recipe(folder, tiny_sd15, "out/merged.safetensors")
    code, err = _run(["merge", str(recipe)], capsys)
    assert code == 3 and "symbolic link" in err, err
    assert list(outside.iterdir()) == []
    inside = folder / "sub"
    inside.mkdir()
    (folder / "alias").symlink_to(inside)  # a link that stays inside the folder is fine
    assert output_target(load_recipe(_recipe(folder, tiny_sd15, "alias/m.safetensors")).output,
                         str(recipe)) == folder / "alias" / "m.safetensors"
    record("rules", "symlink-escape", True, new=True)


def test_no_output_path_is_a_usage_error(tmp_path, tiny_sd15):
    recipe = _recipe(tmp_path, tiny_sd15, None)
    with pytest.raises(UsageError, match="no output path"):
        output_target(load_recipe(recipe).output, str(recipe))


# ------------------------------------------------------------------------------------------------ regexes


EVIL = ["(a+)+$", "(a|a)*b", "(x+x+)+y", "^(([a-z])+.)+[A-Z]([a-z])+$", "(.*a){20}"]


@pytest.mark.parametrize("pattern", EVIL)
def test_backtracking_patterns_are_linear(pattern):
    """Each of these takes hours with Python's re on such a text; RE2 answers at once (the 10 s bound is only a
    hang detector, not a speed claim)."""
    import time

    text = "a" * 30_000 + "!"
    start = time.monotonic()
    patterns.compile_user(pattern, "test")
    patterns.search(pattern, text)
    assert time.monotonic() - start < 10
    record("rules", f"regex-linear/{pattern}", True, new=True)


@pytest.mark.parametrize("pattern", [r"(a)\1", r"(?=x)y", r"(?<!x)y", r"(?P<n>a)(?P=n)"])
def test_constructs_re2_cannot_do_are_refused(pattern):
    with pytest.raises(UsageError, match="linear time"):
        patterns.compile_user(pattern, "--drop")


def test_fallback_without_re2_refuses_backtracking(monkeypatch):
    monkeypatch.setattr(patterns, "_re2", None)
    patterns._compiled.cache_clear()
    try:
        for pattern in EVIL[:4] + [r"(a)\1", r"(?=x)"]:
            with pytest.raises(UsageError, match="exponential time"):
                patterns.compile_user(pattern, "x")
        assert patterns.search(r"input_blocks\.[0-3]\.", "model.input_blocks.2.x")
        assert patterns.engine() == "re (restricted)"
    finally:
        patterns._compiled.cache_clear()


def test_recipe_regex_goes_through_re2(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({"models": {"a": "a.safetensors", "b": "b.safetensors"},
                                  "steps": {"output": {"method": "weighted_sum", "a": "a", "b": "b", "alpha": {
                                      "value": 0.5, "overrides": [{"match": r"(x)\1", "value": 1}]}}}}))
    with pytest.raises(RecipeError, match=r"overrides\[0\]\.match.*linear time"):
        load_recipe(recipe)


# ------------------------------------------------------------------------------------------------ planning cost


def _chain(folder: Path, model: Path, n: int, method: str) -> Path:
    steps: dict = {"s1": {"method": method, "a": "a", "b": "b", "alpha": 0.5}}
    for i in range(2, n + 1):
        steps[f"s{i}"] = {"method": method, "a": f"s{i - 1}", "b": f"s{i - 1}", "alpha": 0.5}
    steps["output"] = {"method": method, "a": f"s{n}", "b": f"s{n}", "alpha": 0.5}
    recipe = folder / f"chain{n}.yaml"
    recipe.write_text(json.dumps({"models": {"a": str(model), "b": str(model)}, "steps": steps}))
    return recipe


def test_node_walks_visit_each_node_once(tmp_path, tiny_sd15, monkeypatch):
    """A chain of n steps each using the previous one twice is a DAG with 2**n paths. Counted, not timed: the calls
    of the engine's lower() (recursion included) grow linearly with n; without its memo they would double per step
    (a ratio of 1024 between 20 and 10 steps instead of about 2)."""
    from contextlib import ExitStack

    from mergekit_sdxl.engine import evaluate
    from mergekit_sdxl.engine.run import headers_of, open_inputs, plan_recipe
    from mergekit_sdxl.recipe.nodes import loads_of

    real = evaluate.lower
    calls = {}
    for n in (10, 20):
        recipe = load_recipe(_chain(tmp_path, tiny_sd15, n, "slerp"))
        with ExitStack() as stack:
            readers = open_inputs(recipe, stack)
            plan = plan_recipe(recipe, headers_of(recipe, readers))
        kp = next(k for k in plan.keys if k.key.endswith("out.2.weight"))
        count = [0]

        def counting(node, memo=None, _count=count):
            _count[0] += 1
            return real(node, memo)

        monkeypatch.setattr(evaluate, "lower", counting)  # the recursion goes through the module name too
        lowered = evaluate.lower(kp.node)
        monkeypatch.setattr(evaluate, "lower", real)
        calls[n] = count[0]
        assert loads_of(lowered) == loads_of(kp.node)
    assert calls[20] <= 2.5 * calls[10], calls
    record("rules", "node-walks-linear", True, new=True)


def test_forty_step_dag_dry_run_and_merge(tmp_path, tiny_sd15, capsys):
    recipe = _chain(tmp_path, tiny_sd15, 40, "slerp")
    code, err = _run(["merge", str(recipe), "-o", str(tmp_path / "o.safetensors"), "--dry-run"], capsys)
    assert code == 0, err
    linear = _chain(tmp_path, tiny_sd15, 40, "weighted_sum")
    code, err = _run(["-q", "merge", str(linear), "-o", str(tmp_path / "o.safetensors"), "--no-input-hashes"], capsys)
    assert code == 0 and (tmp_path / "o.safetensors").is_file(), err
    record("rules", "dag-dry-run-and-merge", True, new=True)


# ------------------------------------------------------------------------------------------------ grid


def test_ctrl_c_in_grid_leaves_no_folder(tmp_path, tiny_sd15, capsys, monkeypatch):
    pytest.importorskip("diffusers")
    from mergekit_sdxl.sampler import grid as grid_mod

    real = grid_mod._save_cell
    calls = [0]

    def save(*args, **kwargs):
        calls[0] += 1
        record_ = real(*args, **kwargs)
        if calls[0] == 1:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C after the first cell landed in the temporary folder
        return record_

    monkeypatch.setattr(grid_mod, "_save_cell", save)
    out = tmp_path / "grid"
    code, err = _run(["-q", "grid", "--models", str(tiny_sd15), "--seeds", "1,2", "--steps", "1", "--size", "64x64",
                      "--device", "cpu", "-o", str(out)], capsys)
    assert code == 130, err
    assert [line for line in err.splitlines() if line.strip()] == ["interrupted (SIGINT): no output was written"]
    assert list(tmp_path.iterdir()) == []
    record("rules", "grid-ctrl-c", True, new=True)


# ------------------------------------------------------------------------------------- no clobber, end to end


@pytest.mark.parametrize("command", ["merge", "convert"])
def test_a_file_that_appears_at_the_output_during_a_run_is_kept(tmp_path, tiny_sd15, capsys, monkeypatch, command):
    """Another program (or a second merge to the same new output) creates the output while the run writes: the
    run ends with exit 6 and one line, the other file is kept byte for byte, and no temporary file is left."""
    from mergekit_sdxl.io.writer import SafetensorsWriter

    out = tmp_path / "out" / "merged.safetensors"
    out.parent.mkdir()
    real_commit = SafetensorsWriter.commit

    def commit_after_someone_else(self: SafetensorsWriter) -> None:
        out.write_bytes(b"the other program's file")
        real_commit(self)

    monkeypatch.setattr(SafetensorsWriter, "commit", commit_after_someone_else)
    if command == "merge":
        argv = ["merge", str(_recipe(tmp_path, tiny_sd15, None)), "-o", str(out), "--no-input-hashes"]
    else:
        argv = ["convert", str(tiny_sd15), str(out), "--dtype", "bf16"]
    code, err = _run(["-q", *argv], capsys)
    assert code == 6, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "appeared while the output was being written" in lines[0], err
    assert out.read_bytes() == b"the other program's file"
    assert [p.name for p in out.parent.iterdir()] == ["merged.safetensors"]
    record("rules", f"output-appears-during-{command}", True, new=True)
