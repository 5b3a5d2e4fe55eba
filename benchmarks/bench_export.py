"""Benchmark: `mergekit-sdxl export` of one checkpoint, wall time and peak RSS of the child process.

Also measures the I/O floor in the same run: `cat` of the input to /dev/null and a `cp` of it (read + write of
the same byte count, fsynced). Prints one JSON line per measurement.

    python benchmarks/bench_export.py --input bench-out/merge/full/base8.safetensors --format diffusers
    python benchmarks/bench_export.py --size tiny --format onnx        # makes a tiny SDXL first
    python benchmarks/bench_export.py --input CKPT --check-onnx-unet DIR   # DIR's ONNX UNet vs the PyTorch UNet
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


def check_onnx_unet(ckpt: Path, folder: Path, size: int = 16) -> None:
    """Run DIR's ONNX UNet (ONNX Runtime, CPU) and the PyTorch UNet (fp32) of CKPT on one random input; print the
    max difference relative to the output's max. The ONNX session is freed before the PyTorch UNet is built."""
    import gc
    import time

    import numpy as np
    import onnxruntime as ort
    import torch

    from mergekit_sdxl.export.source import ExportSource, build_modules, load_module

    with ExportSource(ckpt, "fp32") as src:
        config = src.configs["unet"]
    rng = np.random.default_rng(0)
    feeds = {"sample": rng.standard_normal((1, config["in_channels"], size, size)),
             "timestep": np.array(500.0),
             "encoder_hidden_states": rng.standard_normal((1, 77, config["cross_attention_dim"]))}
    sdxl = config.get("addition_embed_type") == "text_time"
    if sdxl:
        pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
        feeds["text_embeds"] = rng.standard_normal((1, pooled))
        feeds["time_ids"] = np.array([[8.0 * size, 8 * size, 0, 0, 8 * size, 8 * size]])
    start = time.perf_counter()
    session = ort.InferenceSession(str(folder / "unet" / "model.onnx"), providers=["CPUExecutionProvider"])
    loaded = time.perf_counter() - start
    types = {i.name: np.float16 if "float16" in i.type else np.float32 for i in session.get_inputs()}
    start = time.perf_counter()
    (got,) = session.run(None, {k: v.astype(types[k]) for k, v in feeds.items()})
    ran = time.perf_counter() - start
    del session
    gc.collect()
    with ExportSource(ckpt, "fp32") as src:
        unet = load_module(src, "unet", build_modules(src.configs)["unet"], torch.float32)
    f = {k: torch.from_numpy(v.astype(np.float32)) for k, v in feeds.items()}
    added = {"text_embeds": f["text_embeds"], "time_ids": f["time_ids"]} if sdxl else None
    with torch.no_grad():
        ref = unet(f["sample"], f["timestep"], f["encoder_hidden_states"], added_cond_kwargs=added,
                   return_dict=False)[0].numpy()
    rel = float(np.abs(got.astype(np.float32) - ref).max() / np.abs(ref).max())
    emit({"what": "onnx_unet_vs_pytorch", "folder": str(folder), "latent": size, "session_load_s": loaded,
          "run_s": ran, "max_rel_diff": rel, "finite": bool(np.isfinite(got).all())})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", type=Path, help="checkpoint to export (default: a synthetic one of --size)")
    parser.add_argument("--size", choices=("tiny", "full"), default="tiny")
    parser.add_argument("--format", choices=("diffusers", "onnx"), default="diffusers")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--work", type=Path, default=ROOT / "bench-out" / "export")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--no-floor", action="store_true", help="skip the cat/cp I/O floor")
    parser.add_argument("--check-onnx-unet", type=Path, metavar="DIR",
                        help="only compare DIR's ONNX UNet with --input's")
    args = parser.parse_args()
    if args.check_onnx_unet:
        check_onnx_unet(args.input, args.check_onnx_unet)
        return
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
