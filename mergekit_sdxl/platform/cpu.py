"""CPU features that decide defaults: native bf16 arithmetic.

Linux lists the CPU's flags in /proc/cpuinfo; other systems (Windows, macOS) have no /proc, so there the answer
comes from torch's own CPU probe (cpuinfo, the library torch uses to pick its kernels), which sees the same flags.
"""

from __future__ import annotations

from pathlib import Path

BF16_FLAGS = ("avx512_bf16", "amx_bf16")
CPUINFO = Path("/proc/cpuinfo")


def cpu_flags(cpuinfo: Path = CPUINFO) -> set[str] | None:
    """The `flags` of the first CPU in /proc/cpuinfo, or None where there is no such file (not Linux)."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            line = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return None
    return set(line.partition(":")[2].split())


def torch_cpu_flags() -> set[str]:
    """The features torch's CPU probe reports as present (empty if this torch does not expose its probe)."""
    try:
        import torch

        capability = torch._C._cpu._get_cpu_capability()
    except (ImportError, AttributeError, RuntimeError):
        return set()
    return {name for name, value in capability.items() if value is True}


def has_native_bf16(cpuinfo: Path = CPUINFO) -> bool:
    """Native bf16 on this CPU (AVX512-BF16 or AMX-BF16): /proc/cpuinfo where it exists, else torch's probe."""
    flags = cpu_flags(cpuinfo)
    if flags is None:
        flags = torch_cpu_flags()
    return any(flag in flags for flag in BF16_FLAGS)
