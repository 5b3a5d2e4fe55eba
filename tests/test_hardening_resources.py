"""Resource limits: hostile headers and zip bombs cannot make the tool allocate, and many inputs stream in bounded
memory. Peak RSS is measured with resource.getrusage in child processes (ru_maxrss of each forked job)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import broken_corpus as bc  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# Runs each job (CLI argv) in a child forked from a process that imported the tool once; prints the exit code and
# the child's peak RSS (wait4's rusage), so every job starts from the same baseline.
MEASURE = r"""
import json, os, sys
from mergekit_sdxl.cli.main import main
import mergekit_sdxl.cli.merge_cmd, mergekit_sdxl.cli.inspect_cmd, mergekit_sdxl.engine.run  # noqa: F401
import mergekit_sdxl.io.ckpt  # noqa: F401
out = []
import tempfile
for argv in json.loads(sys.argv[1]):
    err = tempfile.TemporaryFile()
    pid = os.fork()
    if pid == 0:
        fd = os.open(os.devnull, os.O_WRONLY)
        os.dup2(fd, 1)
        os.dup2(err.fileno(), 2)
        try:
            main(argv)
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        os._exit(code)
    _, status, usage = os.wait4(pid, 0)
    err.seek(0)
    out.append({"code": os.waitstatus_to_exitcode(status), "maxrss_mb": usage.ru_maxrss / 1024,
                "stderr": err.read().decode(errors="replace")[-2000:]})
import resource
print(json.dumps({"jobs": out, "parent_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def measure(jobs: list[list[str]], tmp_path: Path) -> tuple[list[dict], float]:
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-c", MEASURE, json.dumps(jobs)], capture_output=True, text=True,
                          timeout=300, cwd=ROOT, env=env)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.splitlines()[-1])
    return result["jobs"], result["parent_mb"]


def test_hostile_headers_and_zip_bombs_do_not_allocate(tmp_path):
    files = {}
    # header length 150 MB (over the 100 MB limit) in a sparse 200 MB file: refused before reading the header
    big = tmp_path / "big_header.safetensors"
    with open(big, "wb") as f:
        f.write(bc.st_bytes(bc.GOOD_HEADER, length=150 << 20))
        f.truncate(200 << 20)
    files["header 150 MB"] = big
    # header length 90 MB (under the limit) but the file ends after 1 KB: refused before allocating 90 MB
    short = tmp_path / "short.safetensors"
    short.write_bytes(bc.st_bytes(bc.GOOD_HEADER, length=90 << 20))
    files["header 90 MB, file 1 KB"] = short
    huge = tmp_path / "huge_tensor.safetensors"
    huge.write_bytes(bc.st_bytes(bc.header_with(w={"dtype": "F32", "shape": [10**12], "data_offsets": [0, 8]})))
    files["1e12-element tensor"] = huge
    bomb = tmp_path / "bomb.ckpt"
    bc.torch_zip_bomb(bomb, 256 << 20)
    assert bomb.stat().st_size < 2 << 20  # 256 MB of zeros in well under 2 MB
    files["zip bomb (256 MB deflated member)"] = bomb
    declared = tmp_path / "declared.ckpt"
    bc.torch_zip_declaring(declared, 2**31 - 1)
    files["ckpt declaring an 8 GB storage"] = declared
    baseline = tmp_path / "ok.safetensors"
    baseline.write_bytes(bc.st_bytes(bc.GOOD_HEADER))
    jobs = [["inspect", str(baseline)]] + [["inspect", str(p)] for p in files.values()]
    results, _ = measure(jobs, tmp_path)
    base = results[0]
    assert base["code"] in (0, 4)
    for (label, _path), result in zip(files.items(), results[1:]):
        grown = result["maxrss_mb"] - base["maxrss_mb"]
        assert result["code"] == 4, (label, result)
        assert grown < 64, f"{label}: peak RSS grew by {grown:.0f} MB"
        bc.record("resources", label, True, grown_mb=round(grown, 1))


def test_twenty_inputs_stream_in_bounded_memory(make_ckpt, tmp_path):
    seeds = [make_ckpt("sd15", seed=s) for s in (31, 32, 33, 34)]
    inputs = []
    for i in range(20):
        path = tmp_path / f"m{i:02d}.safetensors"
        shutil.copyfile(seeds[i % len(seeds)], path)
        inputs.append(path)

    def recipe(n: int) -> Path:
        names = [f"m{i:02d}" for i in range(n)]
        formula = "m00 + " + " + ".join(f"{1 / n:.4f} * ({m} - m00)" for m in names[1:])
        path = tmp_path / f"recipe{n}.yaml"
        path.write_text(json.dumps({"models": {m: str(p) for m, p in zip(names, inputs)},
                                    "steps": {"output": formula}, "output": {"dtype": "fp16"}}))
        return path

    jobs = [["-q", "merge", str(recipe(n)), "-o", str(tmp_path / f"out{n}.safetensors"), "--threads", "2",
             "--no-input-hashes"] for n in (2, 20)]
    (two, twenty), _ = measure(jobs, tmp_path)
    assert two["code"] == 0 and twenty["code"] == 0, (two, twenty)
    grown = twenty["maxrss_mb"] - two["maxrss_mb"]
    input_mb = sum(p.stat().st_size for p in inputs) / 2**20
    assert grown < 150, f"20 inputs ({input_mb:.0f} MB) peaked {grown:.0f} MB above 2 inputs"
    bc.record("resources", "20 inputs vs 2", True, grown_mb=round(grown, 1), inputs_mb=round(input_mb, 1))
