"""mergekit_sdxl: streaming, reproducible SDXL / SD1.5 checkpoint merging.

The public surface is `mergekit_sdxl.api` (typed functions returning frozen results) and the exceptions of
`mergekit_sdxl.errors`. Nothing heavy is imported here so that `mergekit-sdxl --help` answers fast: `api` and
`errors` load on first use.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__version__ = "0.1.0"
__all__ = ["__version__", "api", "errors"]


def __getattr__(name: str) -> ModuleType:
    """`mergekit_sdxl.api` / `mergekit_sdxl.errors` without importing them (or torch) at package import."""
    if name in ("api", "errors"):
        return importlib.import_module(f"mergekit_sdxl.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
