"""Benchmark: `mergekit-sdxl convert` of a full-size synthetic SDXL fp16 checkpoint to fp8 (plain and scaled) and
bf16, with peak RSS of each run, next to the I/O floor (read the input, write an output-sized file with fsync).

    python benchmarks/bench_convert.py --size full     # 6.94 GB input (written once under bench-out/convert)
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, emit, measured_child  # noqa: E402

TARGETS = (("fp8_e4m3fn", []), ("fp8_e4m3fn", ["--scaled-fp8"]), ("bf16", []))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("tiny", "full"), default="full")
    parser.add_argument("--input", type=Path, help="an existing checkpoint to convert instead of a synthetic one")
    parser.add_argument("--work", type=Path, default=ROOT / "bench-out" / "convert")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    src = args.input or args.work / f"sdxl_{args.size}.safetensors"
    if not src.exists():
        from mergekit_sdxl.synth.checkpoints import write_test_checkpoint

        write_test_checkpoint(src, "sdxl", args.size, seed=1)
    size = os.path.getsize(src)
    read = measured_child(["sh", "-c", 'cat "$1" > /dev/null', "sh", str(src)])
    for dtype, extra in TARGETS:
        out = args.work / f"out_{dtype}{'_scaled' if extra else ''}.safetensors"
        out_bytes = size // 2 if dtype.startswith("fp8") else size
        write = measured_child(["dd", "if=/dev/zero", f"of={args.work / 'floor.bin'}", "bs=16M",
                                f"count={max(1, out_bytes >> 24)}", "conv=fsync", "status=none"])
        (args.work / "floor.bin").unlink(missing_ok=True)
        run = measured_child([sys.executable, "-m", "mergekit_sdxl.cli.main", "--quiet", "convert", str(src),
                              str(out), "--dtype", dtype, "--overwrite", *extra], cwd=ROOT)
        floor = read["seconds"] + write["seconds"]
        emit({"what": f"convert to {dtype}{' scaled' if extra else ''}", "input_bytes": size, "seconds": run["seconds"],
              "peak_rss_mb": run["peak_rss_mb"], "rc": run["rc"], "floor_seconds": floor,
              "ratio_to_floor": run["seconds"] / floor})
        out.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
