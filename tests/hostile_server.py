"""A process that imported the tool once and runs CLI invocations in forked children, reporting for each the exit
code, stderr, peak RSS (wait4's ru_maxrss) and wall time, killing a child that runs past its timeout.

Used by the hostile-input and fault suites (tests/test_hardening_*.py): hundreds of cases cost a fork each, not an
interpreter start, and a hang costs its timeout instead of the test run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SERVER = r"""
import builtins, json, os, signal, sys, tempfile, time
from mergekit_sdxl.cli.main import main
import mergekit_sdxl.cli.merge_cmd, mergekit_sdxl.cli.convert_cmd, mergekit_sdxl.cli.inspect_cmd  # noqa: F401
import mergekit_sdxl.cli.hash_cmd, mergekit_sdxl.cli.bake_cmd, mergekit_sdxl.cli.export_cmd  # noqa: F401
import mergekit_sdxl.engine.run, mergekit_sdxl.io.ckpt, mergekit_sdxl.lora.bake  # noqa: F401
import mergekit_sdxl.export.diffusers, mergekit_sdxl.cli.grid_cmd  # noqa: F401
from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: F401 - imported once, not per forked case
from transformers import CLIPTextModel, CLIPTextModelWithProjection  # noqa: F401


def deny(target):
    # opening `target`, or creating anything inside it, fails with EACCES as chmod 000 / a read-only folder would
    # for a non-root user (the tests may run as root)
    real_os_open, real_open, real_mkdir = os.open, builtins.open, os.mkdir

    def hit(p):
        p = str(p)
        return p == target or p.startswith(target.rstrip("/") + "/")

    def os_open(p, *a, **k):
        if not isinstance(p, int) and hit(p):
            raise PermissionError(13, "Permission denied", str(p))
        return real_os_open(p, *a, **k)

    def open_(p, *a, **k):
        if not isinstance(p, int) and hit(p):
            raise PermissionError(13, "Permission denied", str(p))
        return real_open(p, *a, **k)

    def mkdir(p, *a, **k):
        if hit(p):
            raise PermissionError(13, "Permission denied", str(p))
        return real_mkdir(p, *a, **k)

    os.open, builtins.open, os.mkdir = os_open, open_, mkdir


for line in sys.stdin:
    job = json.loads(line)
    err = tempfile.TemporaryFile()
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:
        os.environ.update(job.get("env") or {})
        if job.get("deny"):
            deny(job["deny"])
        fd = os.open(os.devnull, os.O_RDWR)
        os.dup2(fd, 0)
        os.dup2(fd, 1)
        os.dup2(err.fileno(), 2)
        try:
            main(job["argv"])
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            import traceback
            traceback.print_exc()
            code = 99
        sys.stderr.flush()
        os._exit(code)
    timed_out = False
    while True:
        done, status, usage = os.wait4(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() - start > job["timeout"]:
            os.kill(pid, signal.SIGKILL)
            done, status, usage = os.wait4(pid, 0)
            timed_out = True
            break
        time.sleep(0.005)
    seconds = time.monotonic() - start
    err.seek(0)
    print(json.dumps({"code": os.waitstatus_to_exitcode(status), "stderr": err.read().decode(errors="replace"),
                      "maxrss_mb": usage.ru_maxrss / 1024, "seconds": seconds, "timed_out": timed_out}), flush=True)
"""


class JobServer:
    """A Python child running `script` (imports done once): one JSON job per stdin line, one JSON answer per line.

    `run(argv, env=None, **extra)` sends {"argv", "env", **extra} and returns the answer; the scripts here fork a
    child per job and answer with its exit code and stderr (and more, per script)."""

    def __init__(self, script: str, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, cwd=ROOT, env=env)

    def run(self, argv: tuple[str, ...] | list[str], env: dict[str, str] | None = None, **extra: object) -> dict:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(json.dumps({"argv": list(argv), "env": env or {}, **extra}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, "the job server died"
        return json.loads(line)

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        self.proc.wait(timeout=60)


class HostileServer(JobServer):
    """`run(argv, deny=None, timeout=120, env=None) -> {"code", "stderr", "maxrss_mb", "seconds", "timed_out"}`."""

    def __init__(self, env: dict[str, str] | None = None) -> None:
        full = {**os.environ, **(env or {})}
        full.pop("MERGEKIT_TEST_KILL_AT", None)
        super().__init__(SERVER, full)
        self._baseline: float | None = None

    def run(self, argv: tuple[str, ...] | list[str], env: dict[str, str] | None = None, *,
            deny: Path | None = None, timeout: float = 120, **extra: object) -> dict:
        return super().run(argv, env, deny=str(deny) if deny else None, timeout=timeout, **extra)

    def baseline_mb(self) -> float:
        """Peak RSS of a child that does almost nothing (`--version`): what every child starts from."""
        if self._baseline is None:
            self._baseline = max(self.run(["--version"])["maxrss_mb"] for _ in range(2))
        return self._baseline
