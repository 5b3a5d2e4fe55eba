"""Benchmark: `mergekit-sdxl index` of N full-size checkpoints (first run against the hashing floor measured in the
same run, then the incremental second run), each in a child process with its peak RSS.

    python benchmarks/bench_index.py --dir /work/bench-reproduce --count 20 --arch sd15 --dtype fp8_e4m3fn

The files are synthetic real-layout checkpoints with distinct seeds (written once, kept unless --clean). The floor
is `io.hashes.hash_file` over the same files (the one streaming pass the index cannot avoid: sha256 and AutoV3
digests on two threads, legacy hash), run before and after the first index run; the index and the hash cache start
empty for the first run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, measured_child  # noqa: E402

INDEX = ("import json,subprocess,sys,time\nt=time.perf_counter()\n"
         "p=subprocess.run(sys.argv[1:],capture_output=True,text=True)\n"
         "w=time.perf_counter()-t\nr=json.loads(p.stdout) if p.returncode==0 else {}\n"
         "print(json.dumps({'wall':w,'scan_seconds':r.get('seconds'),'hashed':r.get('hashed'),"
         "'unchanged':r.get('unchanged'),'rc':p.returncode}))")
FLOOR = ("import sys,time,json\nfrom mergekit_sdxl.io.hashes import hash_file\nt=time.perf_counter()\n"
         "n=0\nfor p in sys.argv[1:]:\n    hash_file(p); n+=1\n"
         "print(json.dumps({'files':n,'seconds':time.perf_counter()-t}))")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path("/work/bench-reproduce"))
    parser.add_argument("--count", type=int, default=20)
    parser.add_argument("--arch", choices=("sdxl", "sd15"), default="sd15")
    parser.add_argument("--size", choices=("tiny", "full"), default="full")
    parser.add_argument("--dtype", default="fp8_e4m3fn", help="storage dtype of the synthetic files")
    parser.add_argument("--clean", action="store_true", help="delete the files afterwards")
    args = parser.parse_args()
    folder = args.dir / "models"
    folder.mkdir(parents=True, exist_ok=True)
    files = [folder / f"{args.arch}_{args.size}_{args.dtype}_s{i:02d}.safetensors" for i in range(args.count)]
    made = time.perf_counter()
    for i, path in enumerate(files):
        if not path.exists():
            from mergekit_sdxl.synth.checkpoints import write_test_checkpoint

            write_test_checkpoint(path, args.arch, args.size, seed=1000 + i, dtype=args.dtype)
    total = sum(p.stat().st_size for p in files)
    emit({"bench": "index", "what": "files", "count": len(files), "arch": args.arch, "size": args.size,
          "dtype": args.dtype, "bytes": total, "gb": round(total / 1e9, 2),
          "make_seconds": round(time.perf_counter() - made, 1)})
    work = Path(tempfile.mkdtemp(prefix="index-bench-", dir=args.dir))
    env = {"MERGEKIT_SDXL_CACHE_DIR": str(work / "cache")}  # empty hash cache and index for the first run
    index = [sys.executable, "-m", "mergekit_sdxl.cli.main", "--quiet", "index", str(folder), "--db",
             str(work / "index.sqlite3"), "--json"]
    try:
        floor1 = measured_child([sys.executable, "-c", FLOOR, *map(str, files)])
        first = measured_child([sys.executable, "-c", INDEX, *index], env=env)
        floor2 = measured_child([sys.executable, "-c", FLOOR, *map(str, files)])
        second = measured_child([sys.executable, "-c", INDEX, *index], env=env)
        third = measured_child([sys.executable, "-c", INDEX, *index], env=env)
        floor = min(floor1["seconds"], floor2["seconds"])
        for name, run in (("floor_before", floor1), ("first_index", first), ("floor_after", floor2),
                          ("second_index", second), ("third_index", third)):
            inner = json.loads(run["stdout"].strip().splitlines()[-1]) if name.endswith("index") else {}
            emit({"bench": "index", "what": name, "seconds": round(run["seconds"], 3), **inner,
                  "gb_per_s": round(total / 1e9 / run["seconds"], 3), "peak_rss_mb": round(run["peak_rss_mb"], 1),
                  "rc": run["rc"], **({"stderr": run["stderr_tail"]} if run.get("stderr_tail") else {})})
        emit({"bench": "index", "what": "summary", "first_over_floor": round(first["seconds"] / floor, 3),
              "second_seconds": round(second["seconds"], 3), "third_seconds": round(third["seconds"], 3),
              "load_average_1min": os.getloadavg()[0]})
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if args.clean:
            for path in files:
                path.unlink(missing_ok=True)
            if not any(folder.iterdir()):
                os.rmdir(folder)


if __name__ == "__main__":
    main()
