"""`make demo`: the main job on an embedded default, end to end, on tiny real-layout checkpoints.

1. writes four related tiny SDXL checkpoints named like the Kohaku-XL gamma inputs (base8, beta7, anxl2, anxl3);
2. runs the shipped `recipes/kohaku_xl_gamma_rev2.yaml` on them (formula step, then the MBW merge);
3. inspects and hashes the result;
4. renders a small A/B preview grid (A, B, the merge) and an XY grid over the recipe's parameters (a block range
   of the MBW merge x the formula's base8 coefficient, merged in memory) when the sampler extras are installed.
Tiny models have random weights: the images are noise-like, which is expected.
"""

from __future__ import annotations

import sys
from pathlib import Path

from mergekit_sdxl.cli.main import main as cli_main

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "kohaku_xl_gamma_rev2.yaml"


def _cli(*argv: str) -> None:
    print(f"$ mergekit-sdxl {' '.join(argv)}", flush=True)
    try:
        cli_main(list(argv))
    except SystemExit as exc:
        if exc.code:
            raise SystemExit(f"demo step failed: mergekit-sdxl {' '.join(argv)} (exit {exc.code})") from None


def _models(out: Path) -> dict[str, Path]:
    paths = {alias: out / f"{alias}.safetensors" for alias in ("base8", "beta7", "anxl2", "anxl3")}
    relations = {"beta7": ("base8", 7), "anxl2": ("base8", 2), "anxl3": ("anxl2", 3)}
    if not paths["base8"].exists():
        _cli("make-test-checkpoint", "--arch", "sdxl", "--size", "tiny", "--seed", "8", "-o", str(paths["base8"]))
    for alias, (like, seed) in relations.items():
        if not paths[alias].exists():
            _cli("make-test-checkpoint", "--like", str(paths[like]), "--delta", "noise:0.05", "--seed", str(seed),
                 "-o", str(paths[alias]))
    return paths


def run(out: Path) -> None:
    """Run the demo into folder `out`."""
    out.mkdir(parents=True, exist_ok=True)
    paths = _models(out)
    merged = out / "kohaku-xl-gamma-rev2-tiny.safetensors"
    models = [x for alias, p in paths.items() for x in ("-m", f"{alias}={p}")]
    _cli("merge", str(RECIPE), *models, "-o", str(merged), "--dry-run")
    _cli("merge", str(RECIPE), *models, "-o", str(merged), "--overwrite")
    _cli("inspect", str(merged), "--blocks")
    _cli("hash", str(merged))
    _grid(out, paths, merged)
    print(f"demo finished: outputs in {out}/")


def _grid(out: Path, paths: dict[str, Path], merged: Path) -> None:
    try:
        import diffusers  # noqa: F401
        import transformers  # noqa: F401

        from mergekit_sdxl.cli import grid_cmd  # noqa: F401
    except ImportError:
        print("(preview grid skipped: install the [sampler] extra)")
        return
    _cli("grid", "--models", str(paths["beta7"]), "--models", str(paths["anxl3"]), "--models", str(merged),
         "--prompt", "1girl, solo, masterpiece, best quality", "--seeds", "1,2", "--steps", "4",
         "--size", "64x64", "--device", "cpu", "-o", str(out / "grid"), "--overwrite")
    models = [x for alias, p in paths.items() for x in ("-m", f"{alias}={p}")]
    _cli("grid", "--recipe", str(RECIPE), *models, "--x", "output.alpha[IN04..IN08]=0,0.5,1",
         "--y", "rev2.coef[base8]=0.25,0.5", "--prompt", "1girl, solo, masterpiece, best quality", "--steps", "4",
         "--size", "64x64", "--device", "cpu", "-o", str(out / "xy"), "--overwrite")


if __name__ == "__main__":
    run(Path(sys.argv[1] if len(sys.argv) > 1 else "demo-out"))
