"""Recipe runs with their LoRA steps wired in: the one place the engine is handed its adapter factory.

The engine (`engine/run.py`) sits below `lora`, so it cannot open adapters itself; it takes an `AdapterFactory`.
Every caller that runs a recipe (the API, `grid`'s recipe variants, `optimize`'s trials) goes through these two
functions, so a LoRA step works wherever a recipe does.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import ExitStack
from typing import TYPE_CHECKING

from mergekit_sdxl.engine.run import (
    AdapterProvider,
    MergeOptions,
    MergeResult,
    execute_in_memory,
    headers_of,
    open_adapters,
    open_inputs,
    plan_recipe,
    run_merge,
)
from mergekit_sdxl.lora.bake import step_adapters

if TYPE_CHECKING:
    import torch

    from mergekit_sdxl.engine.pipeline import Progress
    from mergekit_sdxl.io.reader import Checkpoint
    from mergekit_sdxl.recipe.planner import InputHeader, Plan
    from mergekit_sdxl.recipe.types import Recipe


def merge_recipe(recipe: Recipe, options: MergeOptions,
                 progress: Callable[[Progress], None] | None = None) -> MergeResult:
    """Run `recipe` into its output file (atomically), LoRA steps included."""
    return run_merge(recipe, options, progress, step_adapters)


def merge_recipe_in_memory(recipe: Recipe, device: str = "cpu", dtype: str | None = None,
                           readers: Mapping[str, Checkpoint] | None = None,
                           headers: Mapping[str, InputHeader] | None = None) -> tuple[Plan, dict[str, torch.Tensor]]:
    """Run `recipe` into a dict of tensors (no file), LoRA steps included; returns the plan too.

    `readers`/`headers` let a caller that merges many variants of one recipe keep its inputs open; without them
    the inputs are opened for this call and closed after it. `dtype` overrides the output dtype (a safetensors code).
    """
    with ExitStack() as stack:
        if readers is None:
            readers = open_inputs(recipe, stack)
        if headers is None:
            headers = headers_of(recipe, readers)
        plan, adapters = plan_with_adapters(recipe, headers, stack, dtype)
        return plan, execute_in_memory(plan, readers, device=device, adapters=adapters)


def plan_with_adapters(recipe: Recipe, headers: Mapping[str, InputHeader], stack: ExitStack,
                       dtype: str | None = None) -> tuple[Plan, dict[str, AdapterProvider]]:
    """The plan of `recipe`, and its LoRA steps' adapters (opened on `stack`, headers only)."""
    adapters = open_adapters(recipe, headers, step_adapters, stack)
    return plan_recipe(recipe, headers, dtype, adapters), adapters
