"""What every command prints: progress bars that know their total, no blank or wrapped stderr lines on a pipe."""

from __future__ import annotations

import io
import shutil
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from mergekit_sdxl.cli import console
from mergekit_sdxl.cli.main import main

WS_RECIPE = "models: {a: A, b: B}\nsteps:\n  output: {method: weighted_sum, a: a, b: b, alpha: 0.5}\n"


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MERGEKIT_SDXL_CACHE_DIR", str(tmp_path / "cache"))


def run_cli(capsys: pytest.CaptureFixture, *args: object) -> tuple[int, str, str]:
    """The real entry point, not quiet; returns (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as info:
        main([str(a) for a in args])
    out = capsys.readouterr()
    return int(info.value.code or 0), out.out, out.err


def commands(tmp: Path, a: Path, b: Path) -> list[list[object]]:
    """One ordinary run of each command that reads or writes checkpoints (each output under a long folder name,
    so a line rich wrapped at 80 columns would show)."""
    out = tmp / ("a-folder-name-long-enough-to-push-every-message-past-eighty-columns" * 2)
    out.mkdir()
    recipe = out / "r.yaml"
    recipe.write_text(WS_RECIPE)
    lora = out / "l.safetensors"
    return [
        ["hash", a], ["inspect", a, "--hash"], ["inspect", b, "--check-values"],
        ["convert", a, out / "c.safetensors", "--dtype", "bf16"],
        ["make-test-checkpoint", "-o", out / "t.safetensors", "--arch", "sd15"],
        ["merge", recipe, "-m", f"a={a}", "-m", f"b={b}", "-o", out / "m.safetensors"],
        ["merge", recipe, "-m", f"a={a}", "-m", f"b={b}", "-o", out / "d.safetensors", "--dry-run"],
        ["extract-lora", a, b, "-o", lora, "--rank", "2"],
        ["resize-lora", lora, "-o", out / "l2.safetensors", "--rank", "1"],
        ["merge-lora", lora, out / "l2.safetensors", "-o", out / "l3.safetensors", "--rank", "1"],
        ["bake", a, lora, "-o", out / "k.safetensors"],
        ["diff", a, b, "--heatmap", out / "h.png"],
        ["index", out, "--db", out / "i.sqlite3"],
        ["recipe-from", out / "m.safetensors", "-o", out / "back.yaml"],
    ]


def test_no_blank_or_broken_stderr_line_on_a_pipe(make_ckpt: Any, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    a, b = make_ckpt("sd15", seed=1), make_ckpt("sd15", seed=2)
    assert not console.console.is_terminal  # captured stderr is what a pipe or a log file gets
    for argv in commands(tmp_path, a, b):
        code, _, err = run_cli(capsys, *argv)
        assert code == 0, (argv, err)
        lines = err.splitlines()
        assert "" not in lines and not err.startswith("\n"), (argv, err)  # a bar's leftover empty line
        for line in lines:  # one message, one line: a wrapped message would start mid-sentence
            assert line.startswith(("wrote ", "warning: ", "comparing ", "read ", "heatmap: ", "indexed ", "clip_",
                                    "unet", "recipe", "scan", "skipped", "found", "no ")), (argv, err)
    for line in run_cli(capsys, "convert", a, tmp_path / "x.safetensors", "--dtype", "fp16")[2].splitlines():
        assert line.startswith("wrote ") and line.endswith(" GB"), line


class _Recorder:
    """Every bar a command opens: its total when created, and any later change of total."""

    def __init__(self) -> None:
        self.created: list[tuple[str, Any]] = []
        self.retotalled: list[tuple[str, Any]] = []
        self.completed: list[tuple[str, Any]] = []


@pytest.fixture
def bars(monkeypatch: pytest.MonkeyPatch) -> _Recorder:
    """A terminal console (so bars are drawn) whose rich Progress records what each bar was told."""
    from rich import progress as rich_progress

    record = _Recorder()

    class Recording(rich_progress.Progress):
        def add_task(self, description: str, *args: Any, **kwargs: Any) -> rich_progress.TaskID:
            record.created.append((description, kwargs.get("total", args[1] if len(args) > 1 else 100.0)))
            return super().add_task(description, *args, **kwargs)

        def update(self, task_id: rich_progress.TaskID, **kwargs: Any) -> None:
            self.completed_note(task_id, kwargs.get("completed"))
            if kwargs.get("total") is not None:
                record.retotalled.append((self.tasks[task_id].description, kwargs["total"]))
            super().update(task_id, **kwargs)

        def completed_note(self, task_id: rich_progress.TaskID, completed: Any) -> None:
            if completed is not None:
                record.completed.append((self.tasks[task_id].description, completed))

    terminal = Console(file=io.StringIO(), force_terminal=True, width=120, markup=False, highlight=False)
    monkeypatch.setattr(console, "console", terminal)
    monkeypatch.setattr(console, "Progress", Recording)
    return record


def test_every_progress_bar_knows_its_total_from_the_start(make_ckpt: Any, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture, bars: _Recorder) -> None:
    a, b = make_ckpt("sd15", seed=1), make_ckpt("sd15", seed=2)
    for argv in commands(tmp_path, a, b):
        assert run_cli(capsys, *argv)[0] == 0, argv
    drawn = {description.split()[0] for description, _ in bars.created}
    assert {"merging", "converting", "hashing", "indexing"} <= drawn, bars.created
    assert all(isinstance(total, int) and total > 0 for _, total in bars.created), bars.created
    assert bars.retotalled == []


def test_merge_bar_total_is_the_plan_s_key_count(make_ckpt: Any, tmp_path: Path, capsys: pytest.CaptureFixture,
                                                 bars: _Recorder) -> None:
    from safetensors import safe_open

    a, b = make_ckpt("sd15", seed=1), make_ckpt("sd15", seed=2)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(WS_RECIPE)
    out = tmp_path / "m.safetensors"
    assert run_cli(capsys, "merge", recipe, "-m", f"a={a}", "-m", f"b={b}", "-o", out)[0] == 0
    with safe_open(out, "np") as f:
        keys = len(list(f.keys()))
    assert bars.created == [("merging", keys)]
    # drawn before the first key is done (the engine reports 0 of N once the plan is known), and to the end
    assert bars.completed[0] == ("merging", 0) and bars.completed[-1] == ("merging", keys)


def test_quiet_and_piped_runs_draw_no_bar(make_ckpt: Any, tmp_path: Path, capsys: pytest.CaptureFixture,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from rich import progress as rich_progress

    def no_bar(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a progress bar was drawn")

    monkeypatch.setattr(rich_progress.Progress, "__init__", no_bar)
    a = make_ckpt("sd15", seed=1)
    assert run_cli(capsys, "convert", a, tmp_path / "c.safetensors", "--dtype", "bf16")[0] == 0
    assert run_cli(capsys, "hash", a)[0] == 0
    shutil.rmtree(tmp_path / "cache", ignore_errors=True)


# ----------------------------------------------------------------------------------------- one output spelling
# commands whose product is a file or folder: each takes it as -o/--out
WRITERS = {"convert", "make-test-checkpoint", "merge", "extract-lora", "bake", "resize-lora", "merge-lora", "grid",
           "export", "recipe-from", "optimize"}
# those that spelled it --output before: still accepted there, so old scripts keep working
OLD_OUTPUT = {"bake", "export", "extract-lora", "make-test-checkpoint", "merge-lora", "resize-lora"}


def _out_params(command: Any) -> list[Any]:
    import click

    return [p for p in command.params if isinstance(p, click.Option)
            and any(opt in ("-o", "--out") or opt.startswith("--output") for opt in [*p.opts, *p.secondary_opts])]


def test_every_command_spells_its_output_minus_o_dash_dash_out() -> None:
    import click

    from mergekit_sdxl.cli.main import COMMANDS, cli
    from mergekit_sdxl.cli.options import OutOption

    ctx = click.Context(cli)
    seen, old = set(), set()
    for name in COMMANDS:
        command = cli.get_command(ctx, name)
        assert command is not None, name
        for param in _out_params(command):
            assert isinstance(param, OutOption), (name, param.opts)
            shown = [opt for opt in param.opts if opt not in param.hidden_aliases]
            assert shown == ["-o", "--out"] and not param.secondary_opts, (name, param.opts)
            assert set(param.opts) - set(shown) <= {"--output"}, (name, param.opts)
            seen.add(name)
            old.update([name] if "--output" in param.opts else [])
        help_text = command.get_help(click.Context(command, info_name=name, parent=ctx))
        assert "--output" not in help_text, name
        assert ("-o, --out" in help_text) == (name in WRITERS), name
    assert seen == WRITERS and old == OLD_OUTPUT


def test_old_and_new_output_spellings_run_alike(make_ckpt: Any, tmp_path: Path,
                                                capsys: pytest.CaptureFixture) -> None:
    a = make_ckpt("sd15", seed=1)
    code, _, err = run_cli(capsys, "bake", a, a)
    assert code == 2 and "'-o' / '--out'" in err and "--output" not in err  # the hint shows the one spelling
    for i, spelling in enumerate(["-o", "--out", "--output"]):
        out = tmp_path / f"t{i}.safetensors"
        assert run_cli(capsys, "make-test-checkpoint", "--arch", "sd15", spelling, out)[0] == 0
        assert out.is_file()
    assert (tmp_path / "t0.safetensors").read_bytes() == (tmp_path / "t2.safetensors").read_bytes()
    for i, argv in enumerate([[tmp_path / "c0.safetensors"], ["-o", tmp_path / "c1.safetensors"],
                              ["--out", tmp_path / "c2.safetensors"]]):
        assert run_cli(capsys, "convert", a, *argv, "--dtype", "bf16")[0] == 0
        assert (tmp_path / f"c{i}.safetensors").is_file()
    code, _, err = run_cli(capsys, "convert", a, tmp_path / "c3.safetensors", "-o", tmp_path / "c4.safetensors",
                           "--dtype", "bf16")
    assert code == 2 and "given twice" in err and not list(tmp_path.glob("c[34]*"))
    code, _, err = run_cli(capsys, "convert", a, "--dtype", "bf16")
    assert code == 2 and "no output given: give OUT or -o/--out" in err


@pytest.mark.slow
def test_grid_on_a_pipe_prints_whole_lines_only(make_ckpt: Any, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("diffusers")  # the [sampler] extra; grid refuses to run without it
    model = make_ckpt("sd15", seed=1)
    out = tmp_path / ("a-folder-name-long-enough-to-push-every-message-past-eighty-columns" * 2) / "g"
    out.parent.mkdir()
    code, stdout, err = run_cli(capsys, "grid", "--models", model, "--seeds", "1,2", "--steps", "1", "--size",
                                "64x64", "--device", "cpu", "-o", out)
    assert code == 0, err
    lines = err.splitlines()
    assert "" not in lines and not err.startswith("\n"), err
    assert lines[0] == "2 cell(s), 1 model(s)"
    assert lines[-1] == f"grid: {out / 'grid.png'}; report: {out / 'index.html'}"
    assert stdout == f"{out / 'grid.png'}\n"
