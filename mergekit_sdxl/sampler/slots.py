"""The compute dtypes a preview renders in, from the user's `--device` / `--dtype` words (grid, optimize)."""

from __future__ import annotations

import torch

from mergekit_sdxl.dtypes import WEIGHTS, parse_dtype
from mergekit_sdxl.engine.device import resolve_device
from mergekit_sdxl.io.dtypes import torch_dtype
from mergekit_sdxl.sampler.models import ModelSlot


def make_slot(device: str = "auto", dtype: str = "auto") -> ModelSlot:
    """A ModelSlot on `device` (auto, cpu, cuda, cuda:N, mps) computing in `dtype` (auto: fp16 on CUDA; on the CPU bf16
    where it has native bf16 instructions, else fp32); the VAE runs in bf16 on CUDA, else fp32."""
    dev = resolve_device(device, allow_mps=True)
    cuda = dev.type == "cuda"
    gpu = cuda or dev.type == "mps"  # the same rules on Apple's GPUs: fp16 by default
    auto = torch.float16 if gpu else (torch.bfloat16 if cpu_has_bf16() else torch.float32)
    compute = torch_dtype(parse_dtype(dtype, WEIGHTS, "--dtype")) if dtype != "auto" else auto
    # the VAE in bf16 only on CUDA: bf16 on MPS needs macOS 14, and fp16 overflows in the SDXL VAE
    vae = torch.bfloat16 if cuda and compute != torch.float32 else torch.float32
    return ModelSlot(dev, compute, vae)


def cpu_has_bf16() -> bool:
    """Native bf16 on this CPU (AVX512-BF16 or AMX): there bf16 matmuls measured 2.6x and 3x3 convs 1.8x faster than
    fp32 on the development machine; without it bf16 is emulated and slower, so auto stays fp32."""
    from mergekit_sdxl.platform.cpu import has_native_bf16

    return has_native_bf16()  # /proc/cpuinfo on Linux, torch's CPU probe elsewhere
