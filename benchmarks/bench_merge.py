"""Benchmark: the Kohaku-XL gamma rev2 recipe on four synthetic SDXL fp16 checkpoints.

In the same run, per round: (a) the I/O floor: `cat` of the four inputs to /dev/null and `dd` of an output-sized
file with fsync; (b) this tool on the full rev2 recipe (formula + MBW step) and on the formula alone; (c) sd-mecha
1.1.8 on the formula (`beta7 + (anxl3 - anxl2) + (base8 - beta7) * 0.25`, fp16 output). Peak RSS of each child from
getrusage. Prints one JSON line per measurement and a summary line with medians and ratios.

`--fallback` adds, right after each `rev2` run, the same run in the portability test mode (tests/portable/:
os.pread/os.preadv/os.pwrite and glibc's malloc tuning hidden, so positional I/O takes the locked seek + readinto
path Windows uses), its ratio to `rev2` of the same round, and whether the two outputs are byte-identical (sha256,
outside the timing).

    python benchmarks/bench_merge.py --size full --rounds 2          # real SDXL shapes: 4 x 6.94 GB inputs
    python benchmarks/bench_merge.py --size full --rounds 2 --fallback --skip-mecha   # + the Windows I/O path
    python benchmarks/bench_merge.py --size tiny --rounds 3          # quick check of the script itself

Page cache: the four full inputs (27.8 GB) exceed the 24 GiB of RAM, so reads are mostly from disk in every
measurement (cyclic reads larger than the cache defeat LRU); nothing is dropped explicitly (needs privileges).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, emit, measured_child, summary  # noqa: E402

ALIASES = ("beta7", "anxl2", "anxl3", "base8")
FORMULA_RECIPE = """version: 1
arch: sdxl
models: {beta7: beta7.safetensors, anxl2: anxl2.safetensors, anxl3: anxl3.safetensors, base8: base8.safetensors}
steps:
  output: "beta7 + 1.0 * (anxl3 - anxl2) + 0.25 * (base8 - beta7)"
output: {dtype: fp16}
"""
MECHA = """
import sys, torch, sd_mecha
d = sys.argv[1]
m = {a: sd_mecha.model(f"{d}/{a}.safetensors") for a in ("beta7", "anxl2", "anxl3", "base8")}
recipe = m["beta7"] + (m["anxl3"] - m["anxl2"]) + (m["base8"] - m["beta7"]) * 0.25
sd_mecha.merge(recipe, output=f"{d}/mecha.safetensors", output_dtype=torch.float16, merge_dtype=torch.float32,
               merge_device="cpu", output_device="cpu")
"""


def make_inputs(work: Path, size: str) -> None:
    """Write the four inputs once (seeded; reused across runs of the benchmark)."""
    from mergekit_sdxl.synth.checkpoints import write_test_checkpoint

    for i, alias in enumerate(ALIASES):
        path = work / f"{alias}.safetensors"
        if not path.exists():
            write_test_checkpoint(path, "sdxl", size, seed=100 + i)


def floor(work: Path, out_bytes: int) -> dict:
    """Plain-tool floor: read the inputs once, write one output-sized file with fsync."""
    inputs = [str(work / f"{a}.safetensors") for a in ALIASES]
    read = measured_child(["sh", "-c", 'cat "$@" > /dev/null', "sh", *inputs])
    blocks = max(1, out_bytes // (16 << 20))
    write = measured_child(["dd", "if=/dev/zero", f"of={work / 'floor.bin'}", "bs=16M", f"count={blocks}",
                            "conv=fsync", "status=none"])
    (work / "floor.bin").unlink(missing_ok=True)
    return {"read": read["seconds"], "write": write["seconds"], "total": read["seconds"] + write["seconds"]}




def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("tiny", "full"), default="full")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--work", type=Path, default=ROOT / "bench-out" / "merge")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip-mecha", action="store_true")
    parser.add_argument("--fallback", action="store_true", help="also run rev2 on the portable fallback I/O path")
    parser.add_argument("--clean", action="store_true", help="delete the inputs afterwards")
    args = parser.parse_args()
    work = args.work / args.size
    work.mkdir(parents=True, exist_ok=True)
    make_inputs(work, args.size)
    (work / "formula.yaml").write_text(FORMULA_RECIPE)
    out_bytes = os.path.getsize(work / "beta7.safetensors")
    results: dict[str, list[dict]] = {"floor": [], "rev2_cold_hashes": [], "rev2": [], "rev2_fallback": [],
                                      "formula": [], "formula_nohash": [], "mecha": []}
    for rnd in range(args.rounds):
        results["floor"].append(floor(work, out_bytes))
        emit({"what": "floor", "round": rnd, **results["floor"][-1]})
        rev2 = ROOT / "recipes" / "kohaku_xl_gamma_rev2.yaml"
        cold = work / f"hash-cache-{rnd}"
        shutil.rmtree(cold, ignore_errors=True)
        cached = {"MERGEKIT_SDXL_CACHE_DIR": str(cold)}
        runs = [("rev2_cold_hashes", rev2, [], cached),  # inputs hashed in-stream
                ("rev2", rev2, [], cached)]  # hashes now cached
        if args.fallback:
            runs.append(("rev2_fallback", rev2, [], {**cached, **FALLBACK_ENV}))
        runs += [("formula", work / "formula.yaml", [], cached),
                 ("formula_nohash", work / "formula.yaml", ["--no-input-hashes"], {})]
        for name, recipe, extra, env in runs:
            run = ours_with(work, recipe, args.device, extra, env)
            if name in ("rev2", "rev2_fallback"):
                run["sha256"] = _sha256(work / "ours.safetensors")
            results[name].append(run)
            emit({"what": f"mergekit-sdxl {name}", "round": rnd, "device": args.device, **run})
        if not args.skip_mecha:
            run = measured_child([sys.executable, "-c", MECHA, str(work)], cwd=ROOT)
            results["mecha"].append(run)
            emit({"what": "sd-mecha 1.1.8 formula", "round": rnd, **run})
    report(results, args)
    for name in ("ours.safetensors", "mecha.safetensors"):
        (work / name).unlink(missing_ok=True)
    if args.clean:
        shutil.rmtree(work)


FALLBACK_ENV = {"PYTHONPATH": str(ROOT / "tests" / "portable"), "MERGEKIT_TEST_HIDE_POSIX": "1"}


def _sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def ours_with(work: Path, recipe: Path, device: str, extra: list[str], env: dict[str, str]) -> dict:
    argv = [sys.executable, "-m", "mergekit_sdxl.cli.main", "--quiet", "merge", str(recipe), "--overwrite",
            "--device", device, "-o", str(work / "ours.safetensors"), *extra]
    argv += [x for a in ALIASES for x in ("-m", f"{a}={work / f'{a}.safetensors'}")]
    return measured_child(argv, cwd=ROOT, env=env)


def report(results: dict[str, list[dict]], args: argparse.Namespace) -> None:
    floor_total = summary([r["total"] for r in results["floor"]])
    line = {"what": "summary", "size": args.size, "device": args.device, "rounds": args.rounds,
            "floor_seconds": floor_total}
    for name, runs in results.items():
        if name == "floor" or not runs:
            continue
        ok = [r for r in runs if r["rc"] == 0]
        if not ok:
            line[name] = {"failed": runs[-1].get("stderr_tail", "")}
            continue
        line[name] = {"seconds": summary([r["seconds"] for r in ok]),
                      "ratio_to_floor": summary([r["seconds"] / f["total"] for r, f in zip(ok, results["floor"])]),
                      "peak_rss_mb": summary([r["peak_rss_mb"] for r in ok])}
    pairs = list(zip(results["rev2"], results["rev2_fallback"]))
    if pairs:
        line["rev2_fallback_vs_rev2"] = {
            "ratio": summary([f["seconds"] / n["seconds"] for n, f in pairs]),
            "byte_identical": all(n.get("sha256") == f.get("sha256") and n["rc"] == f["rc"] == 0 for n, f in pairs)}
    emit(line)


if __name__ == "__main__":
    main()
