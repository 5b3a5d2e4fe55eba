"""Runs every case of tests/broken_corpus.py through the CLI and checks the failure is the documented one.

For each case: the exit code is the README's, stderr is one line naming the file (and key/step), there is no
traceback (tracebacks only with --debug), no output (or temporary) file is left, the inputs are byte-identical
afterwards, and injected code did not run.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import broken_corpus as bc  # noqa: E402
from broken_corpus import record  # noqa: E402

from mergekit_sdxl.cli.main import main  # noqa: E402
from mergekit_sdxl.errors import CheckpointError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def corpus_ctx(tmp_path_factory, tiny_sdxl, tiny_sd15) -> bc.Ctx:
    return bc.Ctx(tmp_path_factory.mktemp("corpus"), tiny_sdxl, tiny_sd15)


@pytest.fixture(autouse=True)
def _private_hash_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "-"


def run_in_process(argv: tuple[str, ...], capsys, denied: Path | None, monkeypatch) -> tuple[int, str]:
    if denied is not None:
        _deny(denied, monkeypatch)
    try:
        main(list(argv))
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        monkeypatch.undo()
    return code, capsys.readouterr().err


def _deny(path: Path, monkeypatch) -> None:
    """Make opening `path` fail with EACCES, as chmod 000 would for a non-root user (we run as root)."""
    target = str(path)
    real_os_open, real_open = os.open, builtins.open

    def os_open(p, *a, **k):
        if str(p) == target:
            raise PermissionError(13, "Permission denied", target)
        return real_os_open(p, *a, **k)

    def open_(p, *a, **k):
        if not isinstance(p, int) and str(p) == target:
            raise PermissionError(13, "Permission denied", target)
        return real_open(p, *a, **k)

    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(builtins, "open", open_)


CHILD = """
import contextlib, io, json, sys
from mergekit_sdxl.cli.main import main
results = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            main(argv)
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    results.append([code, err.getvalue()])
print(json.dumps(results))
"""


def run_subprocess(argvs: list[tuple[str, ...]]) -> list[tuple[int, str]]:
    """Run several CLI invocations in one child process (a hang is killed by the timeout, not the test run)."""
    try:
        done = subprocess.run([sys.executable, "-c", CHILD, json.dumps([list(a) for a in argvs])],
                              capture_output=True, text=True, timeout=120, cwd=ROOT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"one of {argvs} hung (killed after 120 s)")
    assert done.returncode == 0, done.stderr
    return [(code, err) for code, err in json.loads(done.stdout.splitlines()[-1])]


def check(c: bc.Case, code: int, err: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == c.code, f"{c.name}: exit {code}, expected {c.code}; stderr: {err}"
    assert "Traceback" not in err, f"{c.name}: traceback without --debug:\n{err}"
    assert len(lines) == 1 or (c.code == 2 and len(lines) <= 3), f"{c.name}: not one line: {err!r}"
    message = lines[-1]
    for needle in c.needles:
        assert needle in message, f"{c.name}: {needle!r} not in {message!r}"
    if c.output is not None:
        assert not c.output.exists(), f"{c.name}: output {c.output} exists"
        if c.output.parent.is_dir():
            temps = [p.name for p in c.output.parent.iterdir() if p.name.endswith(".mergekit-tmp")]
            assert not temps, f"{c.name}: temporary files left: {temps}"
    if c.marker is not None:
        assert not c.marker.exists(), f"{c.name}: injected code ran ({c.marker} was created)"


@pytest.mark.parametrize("builder", bc.case_names())
def test_broken_input(builder, corpus_ctx, capsys, monkeypatch):
    cases = bc.build(corpus_ctx, [builder])
    assert cases
    before_all = {p: sha(p) for c in cases for p in c.inputs}
    in_child = [c for c in cases if c.subprocess]
    child_results = dict(zip([c.name for c in in_child], run_subprocess([c.argv for c in in_child]))) \
        if in_child else {}
    for c in cases:
        before = {p: before_all[p] for p in c.inputs}
        try:
            if c.subprocess:
                code, err = child_results[c.name]
            else:
                code, err = run_in_process(c.argv, capsys, c.denied, monkeypatch)
            check(c, code, err)
            assert {p: sha(p) for p in c.inputs} == before, f"{c.name}: an input changed"
        except BaseException:
            record("corpus", c.name, False)
            raise
        record("corpus", c.name, True)


def test_debug_shows_the_exception(corpus_ctx):
    c = bc.build(corpus_ctx, ["st-invalid-json"])[0]
    with pytest.raises(CheckpointError, match="not valid JSON"):
        main(["--debug", *c.argv])


def test_lora_for_wrong_architecture(corpus_ctx, capsys, tmp_path):
    code, _ = run_in_process(("bake", "--help"), capsys, None, pytest.MonkeyPatch())
    if code != 0:
        pytest.xfail("LoRA commands not landed")
    import torch

    from mergekit_sdxl.io.writer import save_file

    # an SD1.5 kohya LoRA (768-wide cross-attention) baked into an SDXL checkpoint: refused, exit 4
    prefix = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
    lora = tmp_path / "sd15_lora.safetensors"
    save_file({f"{prefix}.lora_down.weight": torch.zeros(4, 768), f"{prefix}.lora_up.weight": torch.zeros(320, 4),
               f"{prefix}.alpha": torch.tensor(4.0)}, lora)
    out = tmp_path / "baked.safetensors"
    before = sha(corpus_ctx.sdxl)
    code, err = run_in_process(("bake", str(corpus_ctx.sdxl), str(lora), "-o", str(out)), capsys, None,
                               pytest.MonkeyPatch())
    assert code in (2, 4) and "Traceback" not in err, err
    assert not out.exists() and sha(corpus_ctx.sdxl) == before
