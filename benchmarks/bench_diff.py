"""Benchmark: `mergekit-sdxl diff A B` of two full-size synthetic SDXL fp16 checkpoints against the disk floor
(the time `cat A B > /dev/null` takes to read both files), cold (both files dropped from the page cache first,
with posix_fadvise on these two files only) and warm (both files in the page cache). Reports wall and CPU seconds
and the load average: on a shared machine the CPU a run gets decides its wall time. `diff_seconds` and
`diff_cpu_seconds` are the comparison's own (from `diff --json`), without the process start-up and imports, and
`cpu_seconds_per_gb` is the comparison's CPU time per GB read (both files).

    python benchmarks/bench_diff.py --size full --work /work/bench-xy     # 2 x 6.94 GB, written once
    python benchmarks/bench_diff.py --size full --arch sd15 --cache warm  # 2 x 2.13 GB: a mid-size check
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, emit  # noqa: E402


def timed(argv: list[str]) -> dict:
    """Wall seconds, CPU seconds (user + system), exit code and standard output of one child process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(argv, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"seconds": wall, "cpu_seconds": cpu, "rc": done.returncode, "stdout": done.stdout}


def evict(*paths: Path) -> None:
    """Drop the files' pages from the page cache (their own pages only; clean pages, so nothing is lost)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def inputs(work: Path, size: str, arch: str) -> tuple[Path, Path]:
    from mergekit_sdxl.synth.checkpoints import write_test_checkpoint

    a, b = work / f"diff_a_{arch}_{size}.safetensors", work / f"diff_b_{arch}_{size}.safetensors"
    if not a.exists():
        write_test_checkpoint(a, arch, size, seed=1)
    if not b.exists():
        write_test_checkpoint(b, seed=2, like=a, delta="noise:0.02")
    return a, b


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("tiny", "full"), default="full")
    parser.add_argument("--arch", choices=("sdxl", "sd15"), default="sdxl")
    parser.add_argument("--work", type=Path, default=ROOT / "bench-out" / "diff")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--cache", nargs="+", choices=("cold", "warm"), default=["cold", "warm"])
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    a, b = inputs(args.work, args.size, args.arch)
    total = os.path.getsize(a) + os.path.getsize(b)
    cat = ["sh", "-c", 'cat "$1" "$2" > /dev/null', "sh", str(a), str(b)]
    diff = [sys.executable, "-m", "mergekit_sdxl.cli.main", "--quiet", "diff", str(a), str(b), "--no-heatmap",
            "--json"]
    for cache in args.cache:
        for _ in range(args.rounds):
            if cache == "cold":
                evict(a, b)
            floor = timed(cat)
            if cache == "cold":
                evict(a, b)
            run = timed(diff)
            own = json.loads(run["stdout"]) if run["rc"] == 0 else {}
            emit({"what": f"diff {args.size} {args.arch} ({cache} page cache)", "bytes": total,
                  "seconds": run["seconds"], "cpu_seconds": run["cpu_seconds"], "rc": run["rc"],
                  "diff_seconds": own.get("seconds"), "diff_cpu_seconds": own.get("cpu_seconds"),
                  "cpu_seconds_per_gb": own["cpu_seconds"] / (total / 1e9) if own else None,
                  "floor_seconds": floor["seconds"], "ratio_to_floor": run["seconds"] / floor["seconds"],
                  "floor_gb_per_s": total / floor["seconds"] / 1e9, "load_average": os.getloadavg()[0]})


if __name__ == "__main__":
    main()
