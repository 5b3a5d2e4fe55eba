"""Fault tests with real races and real sizes (`make test-slow`; counts in benchmarks/RESULTS.md).

- a `.ckpt` truncated by another process while `convert` reads it: exit 4 and one line (never a SIGBUS), nothing
  left behind;
- SIGTERM / SIGHUP / SIGINT sent from outside at random moments of real merges: every run ends either interrupted
  with nothing left (exit 128 + signal) or with the complete output, byte-identical to a reference (exit 0);
- a 40-step slerp DAG (each step using the previous twice) merged end to end.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from broken_corpus import record  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _cli(args: list[str], tmp_path: Path) -> subprocess.Popen:
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    env.pop("MERGEKIT_TEST_KILL_AT", None)
    return subprocess.Popen([sys.executable, "-m", "mergekit_sdxl.cli.main", *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def _read_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/io").read_text().splitlines():
            if line.startswith("rchar:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _wait_until_reading(proc: subprocess.Popen, path: Path, timeout: float = 300) -> None:
    """Until the child has `path` open. The CLI installs its stop-signal handling before it opens any input, so a
    signal sent from now on lands in the run, not in Python's own start-up (before any of the tool's code runs, a
    signal acts the OS's default way: docs/safety.md, "Not guaranteed")."""
    target, fds = os.path.realpath(path), Path(f"/proc/{proc.pid}/fd")
    if not fds.parent.is_dir():  # no /proc to look at (not Linux): give the start-up a generous second
        time.sleep(1)
        return
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            if any(os.readlink(fd) == target for fd in fds.iterdir()):
                return
        except OSError:  # an fd closed while we looked, or no /proc (not Linux): look again
            pass
        time.sleep(0.005)


def test_ckpt_truncated_while_converting(tmp_path):
    src = tmp_path / "big.ckpt"
    torch.save({f"w{i}": torch.randn(1024, 1024) for i in range(96)}, src)  # ~400 MB
    size = src.stat().st_size
    out = tmp_path / "out.safetensors"
    proc = _cli(["-q", "convert", str(src), str(out), "--dtype", "fp16"], tmp_path)
    deadline = time.monotonic() + 120
    while _read_bytes(proc.pid) < size // 4 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.truncate(src, size // 3)  # another program cuts the file under the running convert
    _, err = proc.communicate(timeout=300)
    if proc.returncode == 0:
        pytest.skip("convert finished before the truncation (machine too fast for this race)")
    assert proc.returncode == 4, err
    lines = _lines(err)
    assert len(lines) == 1 and "big.ckpt" in lines[0] and "end of file" in lines[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.ckpt"] + (["cache"] if (tmp_path / "cache").exists()
                                                                       else [])
    record("slow", "ckpt-truncated-while-converting", True, new=True)


@pytest.mark.timeout(1800)  # 25 real merges; several minutes on a loaded 2-core machine
def test_stop_signals_at_random_moments(make_ckpt, tmp_path):
    a, b = make_ckpt("sdxl", seed=51), make_ckpt("sdxl", seed=52)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps({"models": {"a": str(a), "b": str(b)},
                                  "steps": {"output": {"method": "slerp", "a": "a", "b": "b", "alpha": 0.3}}}))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "merged.safetensors"
    args = ["-q", "merge", str(recipe), "-o", str(out), "--threads", "2", "--no-input-hashes"]
    start = time.monotonic()
    ref = _cli(args, tmp_path)
    assert ref.wait(timeout=600) == 0
    duration = time.monotonic() - start
    reference = hashlib.sha256(out.read_bytes()).hexdigest()
    rng = random.Random(7)
    outcomes = {"interrupted": 0, "complete": 0}
    for i in range(24):
        out.unlink(missing_ok=True)
        choices = [getattr(signal, n) for n in ("SIGTERM", "SIGHUP", "SIGINT") if hasattr(signal, n)]
        sig = choices[i % len(choices)]
        proc = _cli(args, tmp_path)
        _wait_until_reading(proc, a)
        time.sleep(rng.uniform(0, duration))  # the reference's time includes start-up
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=600)
        names = sorted(p.name for p in out_dir.iterdir())
        assert "Traceback" not in err and "Exception ignored" not in err, err
        if proc.returncode == 0:
            assert names == [out.name] and hashlib.sha256(out.read_bytes()).hexdigest() == reference
            outcomes["complete"] += 1
        else:
            assert proc.returncode == 128 + sig, (sig, proc.returncode, err)
            assert _lines(err) == [f"interrupted ({signal.Signals(sig).name}): no output was written"], err
            assert names == [], names
            outcomes["interrupted"] += 1
        record("slow", f"signal-at-random/{i}", True, new=True)
    assert outcomes["interrupted"] > 0, outcomes


def test_forty_step_slerp_dag_merges(tiny_sd15, tmp_path):
    steps: dict = {"s1": {"method": "slerp", "a": "a", "b": "b", "alpha": 0.5}}
    for i in range(2, 41):
        steps[f"s{i}"] = {"method": "slerp", "a": f"s{i - 1}", "b": f"s{i - 1}", "alpha": 0.5}
    steps["output"] = {"method": "slerp", "a": "s40", "b": "s40", "alpha": 0.5}
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps({"models": {"a": str(tiny_sd15), "b": str(tiny_sd15)}, "steps": steps}))
    proc = _cli(["-q", "merge", str(recipe), "-o", str(tmp_path / "o.safetensors"), "--no-input-hashes"], tmp_path)
    _, err = proc.communicate(timeout=1800)
    assert proc.returncode == 0, err
    record("slow", "forty-step-slerp-dag", True, new=True)
