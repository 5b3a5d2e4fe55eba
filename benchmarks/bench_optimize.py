"""optimize throughput: trials/hour and the per-trial split (merge / load / render / score) on synthetic models.

    python benchmarks/bench_optimize.py --size tiny --trials 12 [--workers 2] [--device cuda] [--image 1024]

Prints one JSON line per trial and a summary line. `--size full` builds full-size SDXL checkpoints under
--work (6.94 GB each; delete them afterwards); on a GPU use e.g. --device cuda --image 1024 --steps 20.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import yaml


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", choices=("tiny", "full"), default="tiny")
    ap.add_argument("--trials", type=int, default=12)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--image", type=int, default=64)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--seeds", default="1,2")
    ap.add_argument("--work", type=Path, default=Path("bench-out/optimize"))
    args = ap.parse_args()

    from mergekit_sdxl.search.optimize import OptimizeRequest, optimize
    from mergekit_sdxl.synth import write_test_checkpoint

    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    a, b = work / f"a-{args.size}.safetensors", work / f"b-{args.size}.safetensors"
    if not a.exists():
        write_test_checkpoint(a, arch="sdxl", size=args.size, seed=1)
    if not b.exists():
        write_test_checkpoint(b, seed=2, like=a, delta="noise:0.5")
    recipe = work / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"arch": "sdxl", "models": {"a": str(a), "b": str(b)}, "steps": {"output": {
        "method": "weighted_sum", "a": "a", "b": "b", "alpha": [0.0] * 20}}}))
    space = work / "space.yaml"
    space.write_text(yaml.safe_dump({"params": {"output.alpha[IN04]": [0, 1], "output.alpha[OUT04]": [0, 1]},
                                     "payload": {"prompts": ["1girl, solo"], "negative": "",
                                                 "seeds": [int(s) for s in args.seeds.split(",")],
                                                 "size": f"{args.image}x{args.image}", "steps": args.steps}}))
    (work / "bench_scorer.py").write_text("import numpy as np\n\ndef brightness(images, context):\n"
                                          "    return float(np.mean([np.asarray(i.image).mean() for i in images]))\n")
    sys.path.insert(0, str(work))
    out = work / f"out-{time.time_ns()}"
    events = []
    start = time.perf_counter()
    optimize(OptimizeRequest(out_dir=out, recipe=recipe, space=space, scorers=["python:bench_scorer:brightness"],
                             trials=args.trials, device=args.device, dtype=args.dtype, threads=args.threads,
                             workers=args.workers, prune=False), on_event=events.append, notify=lambda m: None)
    wall = time.perf_counter() - start
    for e in events:
        print(json.dumps({"trial": e.number, **{k: round(v, 3) for k, v in e.timings.items()}}))
    steady = events[1:] or events  # the first trial of each worker also builds the sampler's modules
    split = {k: round(statistics.median(e.timings.get(k, 0.0) for e in steady), 3)
             for k in ("merge", "load", "render", "score")}
    print(json.dumps({"size": args.size, "device": args.device, "workers": args.workers, "trials": args.trials,
                      "images_per_trial": len(args.seeds.split(",")), "image": args.image, "steps": args.steps,
                      "wall_s": round(wall, 1), "trials_per_hour": round(3600 * args.trials / wall),
                      "median_split_s": split}))


if __name__ == "__main__":
    main()
