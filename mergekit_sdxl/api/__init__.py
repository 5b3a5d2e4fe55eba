"""The typed Python API: every command of `mergekit-sdxl` as a function returning a frozen result.

    from mergekit_sdxl import api

    result = api.merge("recipe.yaml", models={"b": "b.safetensors"}, out="merged.safetensors")
    print(result.path, result.input_hashes, result.seconds)
    weights = api.merge_to_state_dict("recipe.yaml").tensors     # in memory, the same bits as the file
    api.convert("merged.safetensors", "merged-fp8.safetensors", "fp8_e4m3fn")

Nothing is printed: results carry paths, hashes, timings and decisions; long calls report `ProgressEvent`s to an
optional `progress=` callback. Errors are `mergekit_sdxl.errors` exceptions (one line naming the file, step or
key; each with the `exit_code` the CLI returns). Importing this module imports neither torch nor click: both
load on the first call that needs them. The CLI is a thin layer over these functions.
"""

from typing import Any

from mergekit_sdxl.api.adapters import bake, extract_lora
from mergekit_sdxl.api.files import convert, hash_file, inspect
from mergekit_sdxl.api.grids import GridOptions, grid, plan_grid, render
from mergekit_sdxl.api.merging import RecipeSource, load, merge, merge_to_state_dict, plan_merge
from mergekit_sdxl.api.progress import ProgressEvent, ProgressFn
from mergekit_sdxl.api.results import (
    BakeResult,
    ConvertResult,
    ExtractResult,
    GridResult,
    HashResult,
    InspectResult,
    MergePlanResult,
    MergeResult,
    StateDictResult,
)

__all__ = [
    "AdapterSpec",
    "BakeResult",
    "ConvertResult",
    "ExtractResult",
    "GridOptions",
    "GridResult",
    "HashResult",
    "InspectResult",
    "MergePlanResult",
    "MergeResult",
    "ProgressEvent",
    "ProgressFn",
    "RecipeSource",
    "StateDictResult",
    "bake",
    "convert",
    "extract_lora",
    "grid",
    "hash_file",
    "inspect",
    "load",
    "merge",
    "merge_to_state_dict",
    "plan_grid",
    "plan_merge",
    "render",
]


def __getattr__(name: str) -> Any:
    """`AdapterSpec` (an adapter with its strengths, for `bake`) loads torch, so it is imported on first use."""
    if name == "AdapterSpec":
        from mergekit_sdxl.lora.bake import AdapterSpec

        return AdapterSpec
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
