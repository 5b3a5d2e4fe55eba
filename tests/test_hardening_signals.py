"""Stop signals at precise points of a run: SIGINT, SIGTERM and SIGHUP end it the same way (one line, exit
128 + signal, nothing left), and the commit is atomic with respect to them (a signal during or after the rename
leaves the complete output and exit 0, never "interrupted" nor an "Exception ignored" message).

Signals come from the writer's test hook (MERGEKIT_TEST_KILL_AT=point=SIGNAME, io/commit.py `_test_kill`), so they
arrive at exactly the point named; each run is a child forked from a server that imported the tool once.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from broken_corpus import record  # noqa: E402
from hostile_server import JobServer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

SERVER = r"""
import json, os, sys, tempfile
from mergekit_sdxl.cli.main import main
import mergekit_sdxl.cli.merge_cmd, mergekit_sdxl.cli.export_cmd, mergekit_sdxl.engine.run  # noqa: F401
import mergekit_sdxl.export.diffusers  # noqa: F401
from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: F401 - imported once, not per forked job
from transformers import CLIPTextModel, CLIPTextModelWithProjection  # noqa: F401
for line in sys.stdin:
    job = json.loads(line)
    err = tempfile.TemporaryFile()
    pid = os.fork()
    if pid == 0:
        os.environ.update(job["env"])
        fd = os.open(os.devnull, os.O_WRONLY)
        os.dup2(fd, 1)
        os.dup2(err.fileno(), 2)
        try:
            main(job["argv"])
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        sys.stderr.flush()
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    err.seek(0)
    print(json.dumps({"code": os.waitstatus_to_exitcode(status), "stderr": err.read().decode(errors="replace")}),
          flush=True)
"""

# the stop signals this OS has (no SIGHUP on Windows, nor in the portability test mode)
SIGNALS = {name: 128 + getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name)}
BEFORE = ["header", "tensor:1", "tensor:5", "before_fsync", "before_rename"]
AFTER = ["in_commit", "after_rename"]


def Server(env: dict[str, str]) -> JobServer:
    return JobServer(SERVER, env)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path_factory.mktemp("cache"))}
    env.pop("MERGEKIT_TEST_KILL_AT", None)
    s = Server(env)
    yield s
    s.close()


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def test_stop_signals_during_a_merge(server, make_ckpt, tmp_path):
    a, b = make_ckpt("sd15", seed=11), make_ckpt("sd15", seed=12)
    inputs = {p: sha(p) for p in (a, b)}
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps({"models": {"a": str(a), "b": str(b)},
                                  "steps": {"output": {"method": "weighted_sum", "a": "a", "b": "b", "alpha": 0.3}},
                                  "output": {"dtype": "fp16"}}))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "merged.safetensors"
    argv = ["-q", "merge", str(recipe), "-o", str(out), "--threads", "2"]
    assert server.run(argv)["code"] == 0
    reference = sha(out)
    checked = 0
    for name, code in SIGNALS.items():
        for point in BEFORE + AFTER:
            out.unlink(missing_ok=True)
            result = server.run(argv, {"MERGEKIT_TEST_KILL_AT": f"{point}={name}"})
            err = result["stderr"]
            assert "Traceback" not in err and "Exception ignored" not in err, (name, point, err)
            assert sorted(p.name for p in out_dir.iterdir()) in ([], [out.name]), (name, point)
            if point in BEFORE:
                assert result["code"] == code, (name, point, result)
                assert lines(err) == [f"interrupted ({name}): no output was written"], (name, point, err)
                assert not out.exists(), (name, point)
            else:  # the output landed: the run is done, whatever arrives now
                assert result["code"] == 0, (name, point, result)
                assert lines(err) == [], (name, point, err)
                assert sha(out) == reference, (name, point)
            assert {p: sha(p) for p in inputs} == inputs
            checked += 1
            record("signals", f"merge/{name}/{point}", True, new=True)
    assert checked == len(SIGNALS) * (len(BEFORE) + len(AFTER))


@pytest.mark.parametrize("name", list(SIGNALS))
def test_stop_signals_during_an_export(server, tiny_sd15, tmp_path, name):
    out = tmp_path / "pipe"
    result = server.run(["-q", "export", str(tiny_sd15), "-o", str(out)],
                        {"MERGEKIT_TEST_KILL_AT": f"tensor:3={name}"})
    assert result["code"] == SIGNALS[name], result
    assert lines(result["stderr"]) == [f"interrupted ({name}): no output was written"], result
    assert list(tmp_path.iterdir()) == []  # no folder, no temporary folder
    record("signals", f"export/{name}", True, new=True)


def test_sigterm_from_outside(make_ckpt, tmp_path):
    """A real SIGTERM from another process (as a service manager sends it) while the merge streams."""
    a = make_ckpt("sdxl", seed=41)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps({"models": {"a": str(a), "b": str(a)},
                                  "steps": {"output": {"method": "slerp", "a": "a", "b": "b", "alpha": 0.3}}}))
    out = tmp_path / "out.safetensors"
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), "MERGEKIT_TEST_KILL_AT": "tensor:40=SIGSTOP"}
    proc = subprocess.Popen([sys.executable, "-m", "mergekit_sdxl.cli.main", "-q", "merge", str(recipe), "-o",
                             str(out), "--threads", "1"], cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    # the hook stops the child mid-stream; a SIGTERM then CONT resumes it straight into the handler
    for _ in range(600):
        try:
            state = Path(f"/proc/{proc.pid}/stat").read_text().split()[2]
        except OSError:
            break
        if state == "T":
            break
        import time

        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGCONT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert lines(err) == ["interrupted (SIGTERM): no output was written"], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "recipe.yaml"] or \
        sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"]
    record("signals", "merge/SIGTERM-external", True, new=True)
