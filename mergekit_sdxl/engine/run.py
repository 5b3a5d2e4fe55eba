"""Runs a recipe end to end: open inputs, plan from headers, stream, record lineage, commit atomically.

Order of work (every check that needs no tensor data happens before the first tensor is read):
headers -> architecture check -> plan (missing keys, shapes, MBW) -> pinned hashes that are cached -> output
checks (not an input, overwrite) -> temp file with header -> stream keys -> input hashes (streamed) ->
pinned hashes -> final metadata -> fsync + rename. Any error or Ctrl-C removes the temp file.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack, closing
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from mergekit_sdxl.arch.detect import detect_arch
from mergekit_sdxl.arch.scaled_fp8 import MARKER_SHAPE, SCALE_DTYPE, SCALE_SHAPE
from mergekit_sdxl.engine.device import check_compute_dtype, resolve_device
from mergekit_sdxl.engine.evaluate import AdapterFn, KeyEvaluator
from mergekit_sdxl.engine.input_hashes import InputHashes
from mergekit_sdxl.engine.memory import tame_malloc
from mergekit_sdxl.engine.pipeline import DEFAULT_BUDGET, Progress, RunStats, run_pipeline
from mergekit_sdxl.errors import ArchError, CheckpointError, RecipeError
from mergekit_sdxl.io.commit import check_target
from mergekit_sdxl.io.dtypes import (
    SCALED_DTYPE,
    SCALED_MARKER,
    is_marker,
    is_scalable,
    scale_key,
    scaled_key_of,
    torch_dtype,
)
from mergekit_sdxl.io.hashes import FileHashes
from mergekit_sdxl.io.inputs import note_read
from mergekit_sdxl.io.metadata import InputRecord, merge_metadata
from mergekit_sdxl.io.reader import Checkpoint, open_checkpoint
from mergekit_sdxl.io.writer import SafetensorsWriter, TensorSpec
from mergekit_sdxl.platform.text import file_name
from mergekit_sdxl.recipe.nodes import Adapter, KeyPlan
from mergekit_sdxl.recipe.parse_output import output_target
from mergekit_sdxl.recipe.planner import InputHeader, Plan, build_plan, check_declared_arch
from mergekit_sdxl.recipe.types import LoraStep, Recipe

HEADER_SLACK = 16 << 10  # room for the final metadata, which is only known once the inputs are hashed


class AdapterProvider(Protocol):
    """What a LoRA step's adapters offer the engine (implemented by `mergekit_sdxl.lora.bake.AdapterSet`)."""

    def keys(self) -> list[str]: ...
    def needs_weight(self, key: str) -> bool: ...
    def delta(self, key: str, shape: Sequence[int] | None = None, weight: torch.Tensor | None = None,
              device: torch.device | str = "cpu") -> torch.Tensor | None: ...
    def close(self) -> None: ...


# (LoRA step, architecture, checkpoint key -> shape) -> the step's adapters, opened and mapped
AdapterFactory = Callable[[LoraStep, str, Mapping[str, tuple[int, ...]]], AdapterProvider]


@dataclass
class MergeOptions:
    """Command-line knobs that override or complement the recipe."""

    out: Path | None = None
    device: str = "auto"
    dtype: str | None = None  # safetensors code overriding the recipe's output dtype
    overwrite: bool = False
    threads: int | None = None
    hash_inputs: bool = True
    budget: int = DEFAULT_BUDGET


@dataclass
class MergeResult:
    """What `run_merge` did."""

    path: Path
    plan: Plan
    stats: RunStats
    input_hashes: dict[str, FileHashes]


def open_inputs(recipe: Recipe, stack: ExitStack) -> dict[str, Checkpoint]:
    """Open every model of the recipe (header only); errors name the alias and file. The recipe file and every
    model are noted as read by this run (io/inputs.py), so no output can replace them."""
    if Path(recipe.source).is_file():
        note_read(recipe.source)
    check_present(recipe)
    readers: dict[str, Checkpoint] = {}
    for alias, path in ((alias, ref.path) for alias, ref in recipe.models.items() if ref.path is not None):
        try:
            reader = open_checkpoint(path)
        except CheckpointError as exc:  # name the alias too: the path alone may not say which input it is
            raise type(exc)(f"model {alias!r}: {exc}") from exc
        readers[alias] = stack.enter_context(closing(reader))
    return readers


def check_present(recipe: Recipe) -> None:
    """Refuse, in one line naming every one, the models without a file: paths that do not exist and models named by
    hash that the index did not find (a user fixing one at a time would re-run once per model).

    Raises:
        CheckpointError: some path does not exist (hash-only models, if any, are listed with them).
        RecipeError: only models named by hash are missing.
    """
    absent = [(alias, ref.path) for alias, ref in recipe.models.items()
              if ref.path is not None and not Path(ref.path).exists()]
    by_hash = [(alias, ", ".join(f"{kind} {value}" for kind, value in ref.hashes.items()))
               for alias, ref in recipe.models.items() if ref.path is None]
    if not absent and not by_hash:
        return
    listed = [f"model {alias!r} -> {path}" for alias, path in absent]
    listed += [f"model {alias!r} -> named by hash only ({named}), not in the model index" for alias, named in by_hash]
    first = (absent or by_hash)[0][0]
    hint = f"give each with -m ALIAS=PATH (e.g. -m {first}=/path/to/{first}.safetensors)"
    if by_hash:
        hint += " or index their folder with --models-dir DIR"
    what = f"{len(listed)} model file(s) not found" + (" (no such file)" if absent else "")
    error = CheckpointError if absent else RecipeError
    raise error(f"{recipe.source}: {what}: {'; '.join(listed)}; {hint}")


def headers_of(recipe: Recipe, readers: Mapping[str, Checkpoint]) -> dict[str, InputHeader]:
    """Plain-data headers for the planner; a bare VAE file (output.vae) may have no detectable architecture."""
    headers = {}
    for alias, reader in readers.items():
        keys = {k: (reader.info(k).dtype, tuple(reader.info(k).shape)) for k in reader.keys()}
        scaled = next((k for k in keys if is_marker(k) or scaled_key_of(k) in keys), None)
        if scaled is not None:  # merging fp8 codes and scales as numbers would give nonsense
            raise CheckpointError(f"model {alias!r} ({reader.path}) is a scaled-fp8 file (key {scaled!r}); convert it "
                                  "first: mergekit-sdxl convert IN OUT --dtype fp16")
        try:
            arch: str | None = detect_arch(keys, f"model {alias!r} ({reader.path})")
        except ArchError:
            if alias != recipe.output.vae:
                raise
            arch = None
        headers[alias] = InputHeader(path=str(reader.path), arch=arch, keys=keys)
    return headers


def plan_recipe(recipe: Recipe, headers: Mapping[str, InputHeader], dtype: str | None = None,
                adapters: Mapping[str, AdapterProvider] | None = None) -> Plan:
    """Build the plan, applying a command-line dtype override; the arch is the first input's."""
    if dtype is not None:
        recipe = dataclasses.replace(recipe, output=dataclasses.replace(recipe.output, dtype=dtype))
    adapter_keys = {name: provider.keys() for name, provider in (adapters or {}).items()}
    return build_plan(recipe, headers, arch=job_arch(recipe, headers), adapter_keys=adapter_keys)


def job_arch(recipe: Recipe, headers: Mapping[str, InputHeader]) -> str:
    """The recipe's declared architecture (every input must have it), else the first input's."""
    archs = [h.arch for h in headers.values() if h.arch]
    if not archs:
        raise ArchError("no input has a recognisable SDXL or SD1.5 layout")
    check_declared_arch(recipe, headers)
    return recipe.arch or archs[0]


def open_adapters(recipe: Recipe, headers: Mapping[str, InputHeader], factory: AdapterFactory | None,
                  stack: ExitStack) -> dict[str, AdapterProvider]:
    """Open the adapters of every LoRA step the output uses (headers only), mapped onto the checkpoint's keys."""
    steps = [s for name, s in recipe.steps.items() if isinstance(s, LoraStep) and name not in recipe.unused]
    if not steps:
        return {}
    if factory is None:
        # the engine sits below `lora`: mergekit_sdxl.lora.steps (used by the API, merge, grid, optimize) wires it
        raise RecipeError(f"{recipe.source}: LoRA steps ({', '.join(s.name for s in steps)}) need an adapter "
                          "factory; run the recipe through mergekit_sdxl.api.merge (or lora.steps.merge_recipe)")
    arch = job_arch(recipe, headers)
    shapes = next({k: tuple(shape) for k, (_, shape) in h.keys.items()} for h in headers.values() if h.arch == arch)
    providers: dict[str, AdapterProvider] = {}
    for step in steps:
        providers[step.name] = factory(step, arch, shapes)
        stack.callback(providers[step.name].close)
    return providers


def output_specs(plan: Plan) -> list[TensorSpec]:
    """Every tensor the output will hold, incl. scaled-fp8 scales and ComfyUI's `scaled_fp8` marker."""
    specs = [TensorSpec(kp.key, kp.dtype, tuple(kp.shape)) for kp in plan.keys]
    if plan.output.fp8_scaled:
        specs += [TensorSpec(scale_key(kp.key), SCALE_DTYPE, SCALE_SHAPE) for kp in plan.keys if is_scaled(plan, kp)]
        specs.append(TensorSpec(SCALED_MARKER, SCALED_DTYPE, MARKER_SHAPE))
    return specs


def is_scaled(plan: Plan, kp: KeyPlan) -> bool:
    """Scaled fp8 applies to the UNet's Linear weights the planner put in the fp8 dtype (arch/scaled_fp8.py)."""
    return plan.output.fp8_scaled and kp.dtype == SCALED_DTYPE and is_scalable(kp.key, tuple(kp.shape))


def resolve_output(recipe: Recipe, options: MergeOptions) -> Path:
    """The output path: --out (the user's choice, anywhere), else the recipe's output.path, relative to the recipe
    and confined to its folder (recipe/parse_output.py: output_target)."""
    if options.out is not None:
        return Path(options.out)
    return output_target(recipe.output, recipe.source)


def run_merge(recipe: Recipe, options: MergeOptions, progress: Callable[[Progress], None] | None = None,
              adapter_factory: AdapterFactory | None = None) -> MergeResult:
    """Execute `recipe` and write its output atomically; returns what happened."""
    out = resolve_output(recipe, options)
    device = resolve_device(options.device, allow_mps=True)
    tame_malloc()
    with ExitStack() as stack:
        readers = open_inputs(recipe, stack)
        headers = headers_of(recipe, readers)
        adapters = open_adapters(recipe, headers, adapter_factory, stack)
        # every input is open (and noted): refuse an unusable output before planning, not after
        check_target(out, overwrite=options.overwrite, inputs=[r.path for r in readers.values()])
        plan = plan_recipe(recipe, headers, options.dtype, adapters)
        check_compute_dtype(device, _compute_dtype(plan))
        used = {alias: readers[alias] for alias in plan.inputs}
        hashes = InputHashes({a: Path(r.path) for a, r in used.items()}, _data_starts(used), options.hash_inputs)
        stack.callback(hashes.close)
        _verify_pins(plan, hashes.known)
        specs = output_specs(plan)
        records = _records(plan, used, hashes.known, placeholder=True)
        meta = _metadata(plan, records, out)
        writer = SafetensorsWriter(out, specs, meta, overwrite=options.overwrite,
                                   inputs=[r.path for r in readers.values()], header_slack=HEADER_SLACK)
        with writer:
            def make_evaluator() -> KeyEvaluator:
                return KeyEvaluator(_compute_dtype(plan), device, adapter_fn=_adapter_fn(adapters, device),
                                    scaled=lambda kp: is_scaled(plan, kp))

            stats = run_pipeline(plan.keys, used, _sink(writer, plan), make_evaluator, workers=_workers(options),
                                 budget=options.budget, progress=progress, on_read=_hash_hook(hashes, used),
                                 pin_memory=device.type == "cuda")
            known = hashes.finish()
            _verify_pins(plan, known)
            writer.update_metadata(_metadata(plan, _records(plan, used, known), out))
    return MergeResult(out, plan, stats, known)


def _adapter_fn(adapters: Mapping[str, AdapterProvider], device: torch.device) -> AdapterFn:
    def delta(node: Adapter, shape: tuple[int, ...], base: torch.Tensor | None) -> torch.Tensor | None:
        provider = adapters[node.alias]
        weight = base if provider.needs_weight(node.key) else None
        return provider.delta(node.key, shape, weight=weight, device=device)
    return delta


def _sink(writer: SafetensorsWriter, plan: Plan) -> Callable[[str, torch.Tensor], None]:
    marker_done = False

    def sink(name: str, tensor: torch.Tensor) -> None:
        nonlocal marker_done
        writer.write(name, tensor)
        if plan.output.fp8_scaled and not marker_done:
            writer.write(SCALED_MARKER, torch.empty(MARKER_SHAPE, dtype=torch_dtype(SCALED_DTYPE)))
            marker_done = True
    return sink


def _compute_dtype(plan: Plan) -> torch.dtype:
    return torch_dtype(plan.output.compute_dtype)


def _data_starts(readers: Mapping[str, Checkpoint]) -> dict[str, int]:
    """Where tensor data begins, for safetensors inputs (others are hashed by a separate pass)."""
    starts = {}
    for alias, reader in readers.items():
        start = getattr(reader, "data_start", None)
        if isinstance(start, int):
            starts[alias] = start
    return starts


def _hash_hook(hashes: InputHashes, readers: Mapping[str, Checkpoint]) -> Callable[[str, str, torch.Tensor], None]:
    def hook(alias: str, key: str, tensor: torch.Tensor) -> None:
        hashes.on_read(alias, readers[alias].info(key).start, tensor)
    return hook


def _verify_pins(plan: Plan, known: Mapping[str, FileHashes]) -> None:
    for alias, pinned in plan.sha256.items():
        got = known.get(alias)
        if got is not None and got.sha256.lower() != pinned.lower():
            raise RecipeError(f"model {alias!r}: sha256 {got.sha256[:12]}... does not match the pinned "
                              f"{pinned[:12]}... in the recipe ({plan.inputs[alias]})")


def _records(plan: Plan, readers: Mapping[str, Checkpoint], known: Mapping[str, FileHashes],
             placeholder: bool = False) -> list[InputRecord]:
    """Per-input metadata records; before hashing, fixed-width placeholders stand in for unknown hashes."""
    records = []
    for i, (alias, reader) in enumerate(readers.items()):
        h = known.get(alias)
        sha: str | None
        v3: str | None
        legacy: str | None
        if h is None and placeholder:
            sha, v3, legacy = f"{i:064x}", f"{i:064x}", f"{i:08x}"
        else:
            sha, v3, legacy = (h.sha256, h.autov3, h.legacy) if h else (None, None, None)
        records.append(InputRecord(alias, file_name(reader.path), sha, v3, legacy, dict(reader.metadata)))
    return records


def _metadata(plan: Plan, records: list[InputRecord], out: Path) -> dict[str, str]:
    extra = dict(plan.output.metadata)
    vae = next((r.name for r in records if r.alias == plan.output.vae), None) if plan.output.vae else None
    return merge_metadata(arch=plan.arch, recipe=plan.recipe_dict, records=records, summary="; ".join(plan.steps),
                          output_name=file_name(out), dtype=plan.output.dtype, extra=extra, vae=vae)


def execute_in_memory(plan: Plan, readers: Mapping[str, Checkpoint], device: str = "cpu",
                      keys: set[str] | None = None,
                      adapters: Mapping[str, AdapterProvider] | None = None) -> dict[str, torch.Tensor]:
    """Run a plan into a dict of tensors (for in-memory previews/sweeps); `keys` restricts what is computed."""
    selected = [kp for kp in plan.keys if keys is None or kp.key in keys]
    out: dict[str, torch.Tensor] = {}
    dev = resolve_device(device, allow_mps=True)
    check_compute_dtype(dev, _compute_dtype(plan))
    fn = _adapter_fn(adapters or {}, dev)
    run_pipeline(selected, readers, out.__setitem__, lambda: KeyEvaluator(_compute_dtype(plan), dev, adapter_fn=fn),
                 workers=min(2, os.cpu_count() or 1))
    return out


def estimate_memory(plan: Plan, readers: Mapping[str, Checkpoint], options: MergeOptions) -> int:
    """Rough peak bytes of a run: the prefetch budget, plus the largest key being computed (its inputs, output and
    the fp32 temporaries of methods that are not computed chunk by chunk), plus ~400 MB for the runtime."""
    from mergekit_sdxl.engine.evaluate import lower
    from mergekit_sdxl.recipe.nodes import Linear, Load, loads_of

    largest = 0
    for kp in plan.keys:
        leaves = loads_of(kp.node)
        inputs = sum(readers[leaf.alias].info(leaf.key).nbytes for leaf in leaves)
        numel = math.prod(kp.shape)
        node = lower(kp.node)
        temporaries = 0 if isinstance(node, (Linear, Load)) else 4 * numel * (len(leaves) + 2)
        largest = max(largest, inputs + numel * 4 + temporaries)
    return options.budget + largest + (400 << 20)


def _workers(options: MergeOptions) -> int:
    """Compute threads: --threads, else one per core (at most 4: beyond that the disk is the limit)."""
    return options.threads or min(4, os.cpu_count() or 1)


