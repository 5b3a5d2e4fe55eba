"""Crash safety: SIGKILL at precise points of a merge, a full disk, temp-file naming and cleanup.

The kill points come from the writer's test hook (io/writer.py: MERGEKIT_TEST_KILL_AT = header, tensor:N,
before_fsync, after_fsync, before_rename, after_rename). Each killed merge runs in a child forked from a server
process that has imported the tool once (so 20+ kills cost seconds, not an interpreter start each).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).parent))
from broken_corpus import record  # noqa: E402
from hostile_server import JobServer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.mergekit-tmp$")

SERVER = r"""
import json, os, sys
from mergekit_sdxl.cli.main import main
import mergekit_sdxl.cli.merge_cmd, mergekit_sdxl.engine.run  # noqa: F401 - imported before forking
for line in sys.stdin:
    job = json.loads(line)
    pid = os.fork()
    if pid == 0:
        os.environ.update(job["env"])
        fd = os.open(os.devnull, os.O_WRONLY)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        try:
            main(job["argv"])
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"pid": pid, "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0,
                      "code": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None}), flush=True)
"""


def ForkServer(env: dict[str, str]) -> JobServer:
    return JobServer(SERVER, env)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def kill_points(n_tensors: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    middle = sorted(rng.sample(range(3, n_tensors), 14))
    return ["header", "tensor:1", "tensor:2", *(f"tensor:{n}" for n in middle), f"tensor:{n_tensors}",
            "before_fsync", "after_fsync", "before_rename", "after_rename"]


def test_sigkill_at_every_phase_leaves_no_partial_output(make_ckpt, tmp_path):
    a, b = make_ckpt("sd15", seed=11), make_ckpt("sd15", seed=12)
    inputs = {p: sha(p) for p in (a, b)}
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps({"models": {"a": str(a), "b": str(b)},
                                  "steps": {"output": {"method": "weighted_sum", "a": "a", "b": "b", "alpha": 0.3}},
                                  "output": {"dtype": "fp16"}}))
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    env.pop("MERGEKIT_TEST_KILL_AT", None)
    server = ForkServer(env)
    try:
        (tmp_path / "ref").mkdir()
        reference = tmp_path / "ref" / "merged.safetensors"  # same name: the name is in the metadata
        assert server.run(["-q", "merge", str(recipe), "-o", str(reference), "--threads", "2"])["code"] == 0
        with safe_open(reference, "pt") as f:
            n_tensors = len(list(f.keys()))
        ref_sha = sha(reference)
        out_dir = tmp_path / "out"
        out_dir.mkdir()
        out = out_dir / "merged.safetensors"
        argv = ["-q", "merge", str(recipe), "-o", str(out), "--threads", "2"]
        previous_temps: set[str] = set()
        survived = 0
        for point in kill_points(n_tensors):
            out.unlink(missing_ok=True)
            result = server.run(argv, {"MERGEKIT_TEST_KILL_AT": point})
            ok = result["signal"] == signal.SIGKILL
            assert ok, f"{point}: the hook did not fire ({result})"
            names = {p.name for p in out_dir.iterdir()}
            # temps of earlier (dead) runs were removed when this run's writer opened
            assert not (previous_temps & names), f"{point}: stale temps not cleaned: {previous_temps & names}"
            temps = {n for n in names if n != out.name}
            for name in temps:
                match = TEMP.match(name)
                assert match and match["name"] == out.name and int(match["pid"]) == result["pid"], name
            if out.exists():
                assert point == "after_rename", f"{point}: output exists before the rename"
                assert sha(out) == ref_sha, f"{point}: output differs from the reference merge"
                with safe_open(out, "pt") as f:
                    assert len(list(f.keys())) == n_tensors
                assert not temps
            else:
                assert point != "after_rename"
                assert len(temps) == 1, f"{point}: expected one recognisable temp file, found {names}"
            previous_temps = temps
            survived += 1
            record("kill", point, True)
        # a normal run afterwards cleans the last temp and writes the same bytes as the reference
        out.unlink(missing_ok=True)
        assert server.run(argv)["code"] == 0
        assert {p.name for p in out_dir.iterdir()} == {out.name}
        assert sha(out) == ref_sha
        assert survived >= 20
        assert {p: sha(p) for p in inputs} == inputs
    finally:
        server.close()


@pytest.fixture
def small_fs(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(mnt)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a size-limited tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def _merge_into(out: Path, a: Path, b: Path, tmp_path: Path, capsys) -> tuple[int, str]:
    from mergekit_sdxl.cli.main import main

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps({"models": {"a": str(a), "b": str(b)}, "steps": {"output": "a + 0.5 * (b - a)"}}))
    try:
        main(["merge", str(recipe), "-o", str(out), "--no-input-hashes"])
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    return code, capsys.readouterr().err


@pytest.mark.parametrize("preallocate", [True, False])
def test_disk_full_is_a_clear_error(small_fs, make_ckpt, tmp_path, capsys, monkeypatch, preallocate):
    a, b = make_ckpt("sdxl", seed=0), make_ckpt("sdxl", seed=21)  # 28 MB fp16 output > 20 MB
    if not preallocate:  # filesystems without fallocate: the failure comes from a data write instead
        def no_fallocate(*args: object) -> None:
            raise OSError(95, "Operation not supported")
        monkeypatch.setattr(os, "posix_fallocate", no_fallocate, raising=False)
    out = small_fs / "merged.safetensors"
    code, err = _merge_into(out, a, b, tmp_path, capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 6, err
    assert len(lines) == 1 and "merged.safetensors" in lines[0] and "Traceback" not in err
    reserved = preallocate and hasattr(os, "posix_fallocate")  # Windows and macOS have no posix_fallocate
    assert ("not enough disk space" if reserved else "disk full") in lines[0]
    assert list(small_fs.iterdir()) == []  # neither output nor temporary file
    record("disk-full", f"preallocate={preallocate}", True)
