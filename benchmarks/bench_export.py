"""Benchmark: `mergekit-sdxl export` of one checkpoint, wall time and peak RSS of the child process.

Also measures the I/O floor in the same run: `cat` of the input to /dev/null and a `cp` of it (read + write of
the same byte count, fsynced). Prints one JSON line per measurement.

    python benchmarks/bench_export.py --input bench-out/merge/full/base8.safetensors --format diffusers
    python benchmarks/bench_export.py --size tiny --format onnx        # makes a tiny SDXL first
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, emit, measured_child  # noqa: E402

CLI = [sys.executable, "-m", "mergekit_sdxl.cli.main"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", type=Path, help="checkpoint to export (default: a synthetic one of --size)")
    parser.add_argument("--size", choices=("tiny", "full"), default="tiny")
    parser.add_argument("--format", choices=("diffusers", "onnx"), default="diffusers")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--work", type=Path, default=ROOT / "bench-out" / "export")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--no-floor", action="store_true", help="skip the cat/cp I/O floor")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    src = args.input
    if src is None:
        src = args.work / f"sdxl_{args.size}.safetensors"
        if not src.exists():
            measured_child([*CLI, "make-test-checkpoint", "--arch", "sdxl", "--size", args.size, "-o", str(src)])
    src = src.resolve()
    size = os.path.getsize(src)
    if not args.no_floor:
        emit({"what": "floor_cat", "bytes": size, **measured_child(["cat", str(src)], cwd=args.work)})
        copy = args.work / "floor_copy.safetensors"
        emit({"what": "floor_cp_fsync", "bytes": size,
              **measured_child(["sh", "-c", f"cp '{src}' '{copy}' && sync '{copy}'"])})
        copy.unlink(missing_ok=True)
    out = args.work / f"out_{args.format}"
    for round_ in range(args.rounds):
        shutil.rmtree(out, ignore_errors=True)
        argv = [*CLI, "-q", "export", str(src), "--format", args.format, "-o", str(out)]
        if args.dtype:
            argv += ["--dtype", args.dtype]
        result = measured_child(argv, cwd=ROOT)
        written = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) if out.exists() else 0
        emit({"what": f"export_{args.format}", "round": round_, "input": str(src), "input_bytes": size,
              "output_bytes": written, **result})
    shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
