"""Recipes from Python: `merge` (to a file), `merge_to_state_dict` (in memory), `plan_merge` (dry run).

A recipe is a YAML file, the data such a file holds (a dict), or a `Recipe`. Models named by hash are found
through the model index (`index.resolve.resolve_recipe`), LoRA steps run (`lora.steps`), inputs are never touched.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

from mergekit_sdxl.api.progress import ProgressEvent, ProgressFn, byte_counter
from mergekit_sdxl.api.results import MergePlanResult, MergeResult, StateDictResult
from mergekit_sdxl.errors import UsageError

if TYPE_CHECKING:  # the recipe package loads on the first call: importing the API stays cheap (`grid --help`)
    from contextlib import AbstractContextManager

    from mergekit_sdxl.engine.pipeline import Progress
    from mergekit_sdxl.engine.run import MergeOptions
    from mergekit_sdxl.index.scan import ScanPlan
    from mergekit_sdxl.provenance.verify import VerifyReport
    from mergekit_sdxl.recipe.types import Recipe

PathLike = Union[str, "os.PathLike[str]"]
RecipeSource = Union[PathLike, Mapping[str, Any], "Recipe"]
WarnFn = Callable[[str], None]


def load(recipe: RecipeSource, models: Mapping[str, PathLike] | None = None, *,
         models_dirs: Sequence[PathLike] = (), db: PathLike | None = None, progress: ProgressFn | None = None,
         warn: WarnFn | None = None) -> Recipe:
    """The validated recipe with `models` overriding its model paths and models named by hash resolved.

    Args:
        recipe: a YAML file, its data as a dict (relative paths resolve against the current folder), or a Recipe.
        models: alias -> path overrides (as `-m ALIAS=PATH`); not accepted with a Recipe (load it with them).
        models_dirs: folders to index (incrementally) before resolving models named by hash.
        db: the model index (default: the one `mergekit-sdxl index` uses).
        warn: receives one line per file that could not be indexed (default: `warnings.warn`).

    Raises:
        RecipeError: an invalid recipe, or a hash that finds no file / several different files.
        UsageError: `models` given with a Recipe.
    """
    from mergekit_sdxl.index.resolve import resolve_recipe
    from mergekit_sdxl.recipe.load import load_recipe
    from mergekit_sdxl.recipe.parser import parse_recipe
    from mergekit_sdxl.recipe.types import Recipe

    overrides = {alias: os.fspath(path) for alias, path in (models or {}).items()}
    if isinstance(recipe, Recipe):
        if overrides:
            raise UsageError("models= overrides apply when a recipe is loaded: pass the file or its data, not a Recipe")
        loaded = recipe
    elif isinstance(recipe, Mapping):
        loaded = parse_recipe(dict(recipe), source="<recipe>", base_dir=".", model_paths=overrides)
    else:
        loaded = load_recipe(os.fspath(recipe), overrides)
    return resolve_recipe(loaded, list(models_dirs), db, progress=_index_progress(progress),
                          warn=warn or _warn)


def merge(recipe: RecipeSource, *, models: Mapping[str, PathLike] | None = None, out: PathLike | None = None,
          device: str = "auto", dtype: str | None = None, threads: int | None = None, overwrite: bool = False,
          hash_inputs: bool = True, models_dirs: Sequence[PathLike] = (), db: PathLike | None = None,
          verify_against: PathLike | None = None, tolerance_ulps: float = 1.0, progress: ProgressFn | None = None,
          warn: WarnFn | None = None) -> MergeResult:
    """Run `recipe` and write the merged checkpoint atomically (LoRA steps included).

    Args:
        out: the output file (default: the recipe's output.path, relative to the recipe, inside its folder).
        device: "auto", "cpu", "cuda", "cuda:N" or "mps".
        dtype: output dtype name (fp16, bf16, fp32, fp8_e4m3fn, ...), overriding the recipe's.
        threads: compute threads (default: one per core, at most 4).
        overwrite: replace an existing output (never an input).
        hash_inputs: hash the inputs for the lineage metadata.
        verify_against: afterwards compare the output with this file (`result.verified`; the file is kept
            whatever the verdict: check `result.verified.passed`).
        tolerance_ulps: the largest accepted difference of `verify_against`, in units in the last place.
        progress: receives "merging" key events (and index / verify byte events).
        models, models_dirs, db, warn: as `load`.

    Raises:
        RecipeError, CheckpointError, ArchError, DeviceError, OutputError: one line naming the file, step or key;
        nothing is left behind.
    """
    from mergekit_sdxl.lora.steps import merge_recipe

    loaded = load(recipe, models, models_dirs=models_dirs, db=db, progress=progress, warn=warn)
    done = merge_recipe(loaded, _options(out, device, dtype, threads, overwrite, hash_inputs), _key_events(progress))
    verified = _verify(done.path, verify_against, tolerance_ulps, progress) if verify_against is not None else None
    stats, plan = done.stats, done.plan
    return MergeResult(
        path=Path(done.path), arch=plan.arch, dtype=plan.output.dtype, inputs=dict(plan.inputs),
        input_hashes={alias: h.as_dict() for alias, h in done.input_hashes.items()}, keys=stats.keys,
        bytes_read=stats.bytes_read, bytes_written=stats.bytes_written, seconds=stats.seconds,
        clamped=stats.clamped, warnings=tuple(plan.warnings), plan=plan, verified=verified)


def merge_to_state_dict(recipe: RecipeSource, *, models: Mapping[str, PathLike] | None = None,
                        device: str = "auto", dtype: str | None = None, models_dirs: Sequence[PathLike] = (),
                        db: PathLike | None = None, progress: ProgressFn | None = None,
                        warn: WarnFn | None = None) -> StateDictResult:
    """Run `recipe` into a dict of tensors, no file written: for notebooks, previews and the sampler.

    The tensors are bit for bit what `merge` with the same arguments writes (same keys, dtypes and values; no
    scaled-fp8 scales). Arguments as `merge`.
    """
    from mergekit_sdxl.lora.steps import merge_recipe_in_memory

    loaded = load(recipe, models, models_dirs=models_dirs, db=db, progress=progress, warn=warn)
    start = time.perf_counter()
    plan, computed = merge_recipe_in_memory(loaded, device, _dtype_code(dtype))
    tensors = {kp.key: computed[kp.key] for kp in plan.keys}  # the output's order, not the workers' finishing order
    return StateDictResult(tensors=tensors, arch=plan.arch, dtype=plan.output.dtype, inputs=dict(plan.inputs),
                           warnings=tuple(plan.warnings), seconds=time.perf_counter() - start, plan=plan)


def plan_merge(recipe: RecipeSource, *, models: Mapping[str, PathLike] | None = None, out: PathLike | None = None,
               dtype: str | None = None, threads: int | None = None, models_dirs: Sequence[PathLike] = (),
               db: PathLike | None = None, progress: ProgressFn | None = None,
               warn: WarnFn | None = None) -> MergePlanResult:
    """What `merge` would do, from the headers alone (`merge --dry-run`): no tensor data is read."""
    from contextlib import ExitStack

    from mergekit_sdxl.engine.run import estimate_memory, headers_of, open_inputs, resolve_output
    from mergekit_sdxl.io.hashes import cached_hashes
    from mergekit_sdxl.lora.steps import plan_with_adapters
    from mergekit_sdxl.recipe.describe import describe_plan

    loaded = load(recipe, models, models_dirs=models_dirs, db=db, progress=progress, warn=warn)
    options = _options(out, "auto", dtype, threads, False, True)
    with ExitStack() as stack:
        readers = open_inputs(loaded, stack)
        plan, _ = plan_with_adapters(loaded, headers_of(loaded, readers), stack, options.dtype)
        memory = estimate_memory(plan, readers, options)
    known = {alias: cached_hashes(path) for alias, path in plan.inputs.items()}
    output = resolve_output(loaded, options) if out is not None or loaded.output.path else None
    return MergePlanResult(plan=plan, lines=tuple(describe_plan(plan, output)), output=output, peak_memory=memory,
                           cached_hashes={a: h.as_dict() if h else None for a, h in known.items()})


def _options(out: PathLike | None, device: str, dtype: str | None, threads: int | None, overwrite: bool,
             hash_inputs: bool) -> MergeOptions:
    from mergekit_sdxl.engine.run import MergeOptions

    if threads is not None and not 1 <= threads <= 256:
        raise UsageError(f"threads={threads}: give 1 to 256")
    return MergeOptions(out=Path(out) if out is not None else None, device=device, dtype=_dtype_code(dtype),
                        overwrite=overwrite, threads=threads, hash_inputs=hash_inputs)


def _dtype_code(dtype: str | None) -> str | None:
    from mergekit_sdxl.dtypes import CHECKPOINT, parse_dtype

    return parse_dtype(dtype, CHECKPOINT, "--dtype") if dtype else None


def _key_events(progress: ProgressFn | None) -> Callable[[Progress], None] | None:
    if progress is None:
        return None

    def on(event: Progress) -> None:
        progress(ProgressEvent("merging", event.keys_done, event.keys_total, "keys",
                               event.bytes_read + event.bytes_written))
    return on


def _index_progress(progress: ProgressFn | None) -> Callable[[ScanPlan], AbstractContextManager[
        Callable[[int], None]]] | None:
    """An on-the-fly index scan's bytes as "indexing N new or changed file(s)" events."""
    if progress is None:
        return None
    from contextlib import nullcontext

    def scan(plan: ScanPlan) -> AbstractContextManager[Callable[[int], None]]:
        return nullcontext(byte_counter(progress, f"indexing {len(plan.todo)} new or changed file(s)",
                                        plan.bytes_to_hash))
    return scan


def _verify(path: Path, published: PathLike, tolerance: float, progress: ProgressFn | None) -> VerifyReport:
    from mergekit_sdxl.provenance.verify import verify

    advance = byte_counter(progress, f"verifying against {Path(published).name}", os.path.getsize(path))
    return verify(path, Path(published), tolerance, advance)


def _warn(message: str) -> None:
    warnings.warn(message, stacklevel=3)
