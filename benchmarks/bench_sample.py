"""Sampler overhead and model-switch cost; prints one JSON line per measurement.

1. `step_overhead`: seconds per step of `Renderer.sample` (Euler a, CFG, batch of images) against a bare UNet
   forward on the same inputs (the CFG batch the sampler builds); overhead = sampler / bare - 1 (target <= 5 %).
2. `model_switch`: seconds to load a second checkpoint into an already loaded `ModelSlot` (weights swapped in
   place) against reading every tensor of the same file with the project's reader (target <= 1.5x).

Modes:
- cpu (default without CUDA): tiny real-layout SDXL checkpoints from `mergekit_sdxl.synth`, 64x64 px.
- gpu (default with CUDA): an SDXL-shaped UNet and text encoders with random weights, 1024x1024, 28 steps, fp16;
  the switch test writes two full-size synthetic SDXL files (2 x 6.9 GB) to --workdir (kept for later runs).
- `--switch-size full --switch-arch sd15 --switch-dtype fp16` measures a real-size switch on a CPU machine.

    .venv/bin/python benchmarks/bench_sample.py [--mode cpu|gpu] [--repeats 5] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from mergekit_sdxl.io.reader import open_checkpoint
from mergekit_sdxl.sampler.denoiser import sdxl_time_ids
from mergekit_sdxl.sampler.models import Model, ModelSlot, WeightSource, build_modules
from mergekit_sdxl.sampler.pipeline import GenParams, Renderer
from mergekit_sdxl.synth import write_test_checkpoint


def emit(**fields) -> None:
    print(json.dumps(fields), flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": len(values)}


def random_model(device: torch.device, dtype: torch.dtype, size: str = "full") -> Model:
    """An SDXL-shaped model with random weights (built directly on the device: fast on a GPU)."""
    from mergekit_sdxl.arch.modelconfig import derive_configs
    from mergekit_sdxl.arch.tables import key_table
    from mergekit_sdxl.arch.tiny import tiny_shape

    shape = (lambda k, i: i.shape) if size == "full" else (lambda k, i: tiny_shape("sdxl", k))
    configs = derive_configs("sdxl", {k: shape(k, i) for k, i in key_table("sdxl").items()})
    modules = build_modules(configs)
    with torch.no_grad():
        for name, module in modules.items():
            module.to_empty(device=device)
            for key, p in module.named_parameters():
                if p.dim() > 1:
                    p.normal_(0, 0.02)
                else:
                    p.fill_(1.0 if key.endswith("weight") else 0.0)  # norm scales 1, biases 0
            module.to(torch.float32 if name == "vae" else dtype)
            for sub in module.modules():
                if hasattr(sub, "position_ids"):
                    sub.register_buffer("position_ids", torch.arange(77, device=device)[None], persistent=False)
    return Model("sdxl", configs, modules, name="random-sdxl")


def step_overhead(model: Model, params: GenParams, batch: int, repeats: int, device: torch.device) -> None:
    renderer = Renderer(model)
    cond = renderer.encode(params.prompt)
    uncond = renderer.encode(params.negative, negative=True)
    seeds = list(range(batch))
    renderer.sample(dataclass_replace(params, steps=2), seeds)  # warm-up (kernels, allocator)
    unet, dtype = model.modules["unet"], renderer.denoiser.dtype
    h, w = params.height // 8, params.width // 8
    x = torch.randn(2 * batch, 4, h, w, device=device, dtype=dtype)
    t = torch.full((2 * batch,), 500.0, device=device)
    context = torch.cat([uncond.context.expand(batch, -1, -1), cond.context.expand(batch, -1, -1)]).to(dtype)
    added = None
    if cond.pooled is not None:
        pooled = torch.cat([uncond.pooled.expand(batch, -1), cond.pooled.expand(batch, -1)]).to(dtype)
        added = {"text_embeds": pooled, "time_ids": sdxl_time_ids(params.height, params.width).to(device, dtype)[None]
                 .expand(2 * batch, -1)}
    bare, ours = [], []
    with torch.inference_mode():
        for _ in range(repeats):
            sync(device)
            start = time.perf_counter()
            for _ in range(params.steps):
                unet(x, t, encoder_hidden_states=context, added_cond_kwargs=added, return_dict=False)
            sync(device)
            bare.append((time.perf_counter() - start) / params.steps)
            start = time.perf_counter()
            renderer.sample(params, seeds)
            sync(device)
            ours.append((time.perf_counter() - start) / params.steps)
    b, o = statistics.median(bare), statistics.median(ours)
    emit(measure="step_overhead", device=str(device), gpu=_gpu_name(device), size=f"{params.width}x{params.height}",
         steps=params.steps, batch=batch, sampler=params.sampler, dtype=str(dtype), bare_unet_s=summary(bare),
         sampler_step_s=summary(ours), overhead=o / b - 1, target="<= 0.05")


def vs_diffusers(model: Model, params: GenParams, repeats: int, device: torch.device) -> None:
    """Wall time per image (text encoding, sampling and VAE decode, batch 1) of `Renderer.render` against a bare
    diffusers `StableDiffusionXLPipeline` built from the same modules, same size, steps, CFG and Euler a."""
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionXLPipeline

    from mergekit_sdxl.sampler import tokens

    m = model.modules
    scheduler = EulerAncestralDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                                timestep_spacing="linspace")
    pipe = StableDiffusionXLPipeline(vae=m["vae"], text_encoder=m["text_encoder"], text_encoder_2=m["text_encoder_2"],
                                     tokenizer=tokens.clip_tokenizer(), tokenizer_2=tokens.clip_tokenizer_2(),
                                     unet=m["unet"], scheduler=scheduler, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)

    def ours() -> None:
        Renderer(model).render(params, [1])

    def theirs() -> None:
        pipe(params.prompt, negative_prompt=params.negative, num_inference_steps=params.steps,
             guidance_scale=params.cfg, height=params.height, width=params.width,
             generator=torch.Generator(device).manual_seed(1))

    results = {}
    for name, run in (("mergekit", ours), ("diffusers", theirs)):
        run()  # warm-up
        times = []
        for _ in range(repeats):
            sync(device)
            start = time.perf_counter()
            run()
            sync(device)
            times.append(time.perf_counter() - start)
        results[name] = summary(times)
    emit(measure="image_vs_diffusers", gpu=_gpu_name(device), size=f"{params.width}x{params.height}",
         steps=params.steps, sampler=params.sampler, mergekit=results["mergekit"], diffusers=results["diffusers"],
         ratio=results["mergekit"]["median"] / results["diffusers"]["median"])


def dataclass_replace(params: GenParams, **changes) -> GenParams:
    import dataclasses

    return dataclasses.replace(params, **changes)


def model_switch(first: Path, second: Path, repeats: int, device: torch.device, dtype: torch.dtype) -> None:
    slot = ModelSlot(device, dtype, torch.float32 if device.type == "cpu" else torch.bfloat16)
    slot.load(WeightSource.from_file(first))
    reads, switches = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        with open_checkpoint(second) as reader:
            total = sum(reader.read(k).numel() for k in reader.keys())
        reads.append(time.perf_counter() - start)
        start = time.perf_counter()
        slot.load(WeightSource.from_file(second))
        sync(device)
        switches.append(time.perf_counter() - start)
        slot.load(WeightSource.from_file(first))
    r, s = statistics.median(reads), statistics.median(switches)
    emit(measure="model_switch", device=str(device), gpu=_gpu_name(device), dtype=str(dtype),
         file_bytes=second.stat().st_size,
         elements=total, read_file_s=summary(reads), switch_s=summary(switches), ratio=s / r, target="<= 1.5",
         page_cache="warm (files read before)")


def _gpu_name(device: torch.device) -> str | None:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=("cpu", "gpu"), default="gpu" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--skip-switch", action="store_true")
    parser.add_argument("--switch-size", choices=("tiny", "full"), help="default: tiny on CPU, full on GPU")
    parser.add_argument("--switch-arch", choices=("sdxl", "sd15"), default="sdxl")
    parser.add_argument("--switch-dtype", choices=("fp32", "fp16", "bf16"),
                        help="model dtype for the switch test (default: fp16 on GPU, fp32 on CPU)")
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-sample-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.mode == "gpu":
        if not torch.cuda.is_available():
            sys.exit("--mode gpu needs CUDA")
        device, dtype = torch.device("cuda"), torch.float16
        model = random_model(device, dtype)
        params = GenParams("1girl, solo, masterpiece", "lowres", steps=28, cfg=6.0, sampler="euler_a",
                           width=1024, height=1024)
        step_overhead(model, params, batch=1, repeats=args.repeats, device=device)
        vs_diffusers(model, params, repeats=args.repeats, device=device)
        del model
        torch.cuda.empty_cache()
        size = "full"
    else:
        torch.set_num_threads(1)  # tiny models: one thread is fastest and least noisy
        device, dtype = torch.device("cpu"), torch.float32
        a = write_test_checkpoint(work / "a.safetensors", "sdxl", "tiny", seed=0, overwrite=True)
        slot = ModelSlot(device, dtype)
        model = slot.load(WeightSource.from_file(a))
        params = GenParams("1girl, solo, masterpiece", "lowres", steps=20, cfg=6.0, sampler="euler_a",
                           width=64, height=64)
        step_overhead(model, params, batch=2, repeats=args.repeats, device=device)
        size = "tiny"
    if not args.skip_switch:
        size, arch = args.switch_size or size, args.switch_arch
        if args.switch_dtype:
            dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.switch_dtype]
        files = []
        for name, seed in (("a", 0), ("b", 1)):
            path = work / f"switch-{name}-{arch}-{size}.safetensors"
            if not path.exists():
                write_test_checkpoint(path, arch, size, seed=seed)
            files.append(path)
        model_switch(files[0], files[1], max(2, args.repeats // 2), device, dtype)


if __name__ == "__main__":
    main()
