"""Helpers shared by the benchmark scripts: child processes with peak RSS, JSON lines, medians."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def emit(record: dict) -> None:
    """Print one JSON line (the benchmarks' only output format) and flush it."""
    print(json.dumps(record, sort_keys=True), flush=True)


def measured_child(argv: list[str], cwd: Path | None = None, env: dict[str, str] | None = None) -> dict:
    """Like run_child but with a fresh per-child peak RSS: runs the command under a tiny Python wrapper."""
    wrapper = ("import os,resource,subprocess,sys,time,json;t=time.perf_counter();"
               "p=subprocess.run(sys.argv[1:]);w=time.perf_counter()-t;"
               "r=resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss;"
               "print(json.dumps({'seconds':w,'peak_rss_mb':r/1024,'rc':p.returncode}),file=sys.stderr)")
    import os

    proc = subprocess.run([sys.executable, "-c", wrapper, *argv], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, **(env or {})})
    last = proc.stderr.strip().splitlines()[-1]
    result = json.loads(last)
    if result["rc"]:
        result["stderr_tail"] = proc.stderr[-600:]
    result["stdout"] = proc.stdout
    return result


def summary(values: list[float]) -> dict:
    """Median and spread (min, max) of repeated measurements."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}
