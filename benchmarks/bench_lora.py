"""LoRA extraction: our default (seeded randomized SVD) vs an exact per-layer `torch.linalg.svd`, the way kohya's
`extract_lora_from_models.py` and LyCORIS' `extract_locon` call it, on the same two checkpoints in the same run.

Inputs: a synthetic SDXL checkpoint (`--size full`: the real layout, 6.94 GB fp16; `tiny` for a quick check) and a
"tuned" copy whose difference on every extracted layer (preset attn+conv, text encoders on: 1,052 layers) has a
known decaying spectrum: ΔW = c · U diag(s) V with s_i = i^-decay (i = 1..K), Gaussian U, V, and c chosen so that
‖ΔW‖ = 0.05 ‖W‖. Files are written once into --workdir and reused (full size: ~14 GB).

Each measurement runs in a child process (peak RSS from resource.getrusage(RUSAGE_CHILDREN)); prints one JSON line
per measurement and a comparison line: time ratio and retained-energy / reconstruction-error differences per layer.

    python benchmarks/bench_lora.py --size tiny            # quick check (seconds)
    python benchmarks/bench_lora.py --size full --threads 2  # the real thing (~15 min on 2 cores, 14 GB of disk)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_inputs(workdir: Path, size: str, rank_k: int, decay: float) -> tuple[Path, Path]:
    """The base checkpoint (synth) and the tuned copy with a known-spectrum delta on every extracted layer."""
    import torch

    from mergekit_sdxl.arch.lora_names import lora_modules, select
    from mergekit_sdxl.io.dtypes import cast
    from mergekit_sdxl.io.reader import open_checkpoint
    from mergekit_sdxl.io.writer import SafetensorsWriter, TensorSpec
    from mergekit_sdxl.synth import write_test_checkpoint

    workdir.mkdir(parents=True, exist_ok=True)
    base = workdir / f"base_{size}.safetensors"
    tuned = workdir / f"tuned_{size}_k{rank_k}_d{decay:g}.safetensors"
    if not base.exists():
        write_test_checkpoint(base, arch="sdxl", size=size, seed=0, dtype="F16")
    if tuned.exists():
        return base, tuned
    with open_checkpoint(base) as reader:
        infos = {k: reader.info(k) for k in reader.keys()}
        keys = {m.key for m in select(lora_modules("sdxl", {k: i.shape for k, i in infos.items()}), "attn+conv")}
        specs = [TensorSpec(k, i.dtype, i.shape) for k, i in infos.items()]
        with SafetensorsWriter(tuned, specs, dict(reader.metadata), overwrite=True) as writer:
            for key, info in infos.items():
                if key not in keys:
                    writer.write_bytes(key, reader.read_bytes(key))
                    continue
                w = reader.read(key).float()
                m = w.reshape(w.shape[0], -1)
                k = min(rank_k, *m.shape)
                g = torch.Generator().manual_seed(zlib.crc32(key.encode()))
                u = torch.randn(m.shape[0], k, generator=g) / math.sqrt(m.shape[0])
                v = torch.randn(k, m.shape[1], generator=g) / math.sqrt(m.shape[1])
                s = torch.arange(1, k + 1, dtype=torch.float32) ** -decay
                delta = (u * s) @ v
                delta *= 0.05 * float(m.norm()) / float(delta.norm())
                writer.write(key, cast((m + delta).reshape(info.shape), info.dtype)[0])
    return base, tuned


def child(args: argparse.Namespace) -> None:
    """One measurement, in this (child) process: prints {"seconds", "energies"} as JSON on stdout."""
    import torch

    torch.set_num_threads(args.threads)
    from mergekit_sdxl.lora.extract import ExtractOptions, extract_lora
    from mergekit_sdxl.lora.svd import RankRule

    start = time.perf_counter()
    if args.child == "ours":
        options = ExtractOptions(rank=RankRule("fixed", args.rank), conv_rank=RankRule("fixed", args.rank),
                                 preset="attn+conv", text_encoders="on", device=args.device)
        report = extract_lora(args.base, args.tuned, args.out, options, overwrite=True)
        energies = {row.name: row.energy for row in report.kept}
    else:
        energies = exact_baseline(Path(args.base), Path(args.tuned), args.rank, args.device)
    print(json.dumps({"seconds": time.perf_counter() - start, "energies": energies}))


def exact_baseline(base: Path, tuned: Path, rank: int, device: str) -> dict[str, float]:
    """kohya/LyCORIS style: full `torch.linalg.svd(mat)` per layer (no transpose, full matrices), truncate."""
    import torch

    from mergekit_sdxl.arch.lora_names import lora_modules, select
    from mergekit_sdxl.io.reader import open_checkpoint

    energies = {}
    with open_checkpoint(base) as rb, open_checkpoint(tuned) as rt:
        modules = select(lora_modules("sdxl", {k: rb.info(k).shape for k in rb.keys()}), "attn+conv")
        for module in modules:
            rows = module.rows()
            d = rt.read(module.key).to(device, torch.float32) - rb.read(module.key).to(device, torch.float32)
            d = d if rows is None else d[rows[0]:rows[1]]
            mat = d.reshape(d.shape[0], -1)
            _, s, _ = torch.linalg.svd(mat)  # as kohya's extract_lora_from_models.py calls it
            r = min(rank, s.numel())
            s2 = s.double() ** 2
            energies[module.name] = float(s2[:r].sum() / s2.sum()) if float(s2.sum()) else 1.0
    return energies


def measure(kind: str, args: argparse.Namespace, base: Path, tuned: Path) -> dict:
    out = Path(args.workdir) / f"lora_{args.size}.safetensors"
    cmd = [sys.executable, __file__, "--child", kind, "--base", str(base), "--tuned", str(tuned), "--out", str(out),
           "--rank", str(args.rank), "--threads", str(args.threads), "--device", args.device]
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - start
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    result = json.loads(done.stdout.strip().splitlines()[-1])
    # ru_maxrss of RUSAGE_CHILDREN is the largest child so far; children run largest-last is not guaranteed,
    # so report it only when it grew (else: not above the earlier child's peak)
    result.update(kind=kind, wall=wall, peak_rss_gb=peak_kb / 1e6 if peak_kb > before else None)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=("tiny", "full"), default="tiny")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--spectrum-rank", type=int, default=256, help="K: rank of the planted delta")
    parser.add_argument("--decay", type=float, default=1.0, help="s_i = i^-decay")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workdir", default=str(ROOT / "bench-out" / "lora"))
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--skip-exact", action="store_true", help="only time our default")
    parser.add_argument("--child", choices=("ours", "exact"), help=argparse.SUPPRESS)
    parser.add_argument("--base", help=argparse.SUPPRESS)
    parser.add_argument("--tuned", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    start = time.perf_counter()
    base, tuned = make_inputs(Path(args.workdir), args.size, args.spectrum_rank, args.decay)
    print(json.dumps({"measurement": "inputs", "size": args.size, "seconds": round(time.perf_counter() - start, 2),
                      "bytes": base.stat().st_size + tuned.stat().st_size}), flush=True)
    results: dict[str, list[dict]] = {"ours": [], "exact": []}
    for _ in range(args.repeats):
        for kind in ("ours",) if args.skip_exact else ("exact", "ours"):  # exact first: RSS attribution
            r = measure(kind, args, base, tuned)
            results[kind].append(r)
            print(json.dumps({"measurement": f"extract_{kind}", "size": args.size, "rank": args.rank,
                              "threads": args.threads, "device": args.device, "seconds": round(r["seconds"], 2),
                              "wall": round(r["wall"], 2), "peak_rss_gb": r["peak_rss_gb"],
                              "layers": len(r["energies"])}), flush=True)
    if args.skip_exact:
        return
    ours, exact = results["ours"][-1]["energies"], results["exact"][-1]["energies"]
    common = sorted(set(ours) & set(exact))
    d_energy = [exact[n] - ours[n] for n in common]
    err_ratio = [math.sqrt(max(1 - ours[n], 0)) / math.sqrt(max(1 - exact[n], 1e-30)) for n in common
                 if 1 - exact[n] > 1e-9]
    t_ours = sorted(r["seconds"] for r in results["ours"])[len(results["ours"]) // 2]
    t_exact = sorted(r["seconds"] for r in results["exact"])[len(results["exact"]) // 2]
    print(json.dumps({
        "measurement": "compare", "size": args.size, "rank": args.rank, "layers": len(common),
        "speedup_vs_exact": round(t_exact / t_ours, 2),
        "mean_energy_ours": round(sum(ours[n] for n in common) / len(common), 6),
        "mean_energy_exact": round(sum(exact[n] for n in common) / len(common), 6),
        "mean_energy_difference": round(sum(d_energy) / len(d_energy), 7),
        "mean_error_ratio": round(sum(err_ratio) / len(err_ratio), 5) if err_ratio else None,
        "max_error_ratio": round(max(err_ratio), 5) if err_ratio else None,
        "ours_seconds_all": [round(r["seconds"], 2) for r in results["ours"]],
        "exact_seconds_all": [round(r["seconds"], 2) for r in results["exact"]],
    }), flush=True)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
