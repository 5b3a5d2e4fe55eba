"""Recipe + input headers -> Plan: one frozen node tree per output key. Only key names, dtypes and shapes are
looked at; no tensor is read, so every error here comes before the first byte of weights.

Per key:
- formula steps become `Linear` over the input nodes (nested formulas are flattened, like terms collected,
  zero coefficients dropped; a single term with coefficient 1 is the node itself);
- method steps become `Call(method, inputs, params)` with every scalar parameter resolved for the key (MBW block
  weight under the step's convention, then regex overrides, later ones winning). At a method's identity points
  (its `MethodSpec.identities`: `weighted_sum` with alpha 0 or 1, `copy`, ...) the node is that input itself:
  the method would return a bit-exact copy of it;
- in a block-weighted step, keys the convention keeps from A are the step's first input;
- non-float keys (int64 `position_ids`) and marker keys (`v_pred`, `ztsnr`, ...) are taken unchanged from the
  first model that has them, in the order: the output's first input (followed down the steps), then the others;
- `output.vae` takes every `first_stage_model.*` key from that model (a bare VAE file's keys get the prefix).
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from mergekit_sdxl import patterns
from mergekit_sdxl.arch.blocks import block_of
from mergekit_sdxl.arch.detect import MARKERS
from mergekit_sdxl.arch.mbw import parse_mbw
from mergekit_sdxl.arch.scaled_fp8 import SCALED_DTYPE, storage_dtype
from mergekit_sdxl.arch.tables import ARCH_NAMES, check_arch
from mergekit_sdxl.dtypes import is_float_dtype, name_of
from mergekit_sdxl.errors import ArchError, RecipeError
from mergekit_sdxl.methods.registry import METHODS
from mergekit_sdxl.recipe.formula import ZERO_COEFF
from mergekit_sdxl.recipe.nodes import Adapter, Call, KeyPlan, Linear, Load, Node, Scalar, loads_of
from mergekit_sdxl.recipe.parser import check_range
from mergekit_sdxl.recipe.record import describe_step, resolved_recipe
from mergekit_sdxl.recipe.types import (
    SEED_PARAM,
    FormulaStep,
    LoraStep,
    MethodStep,
    OutputSpec,
    Param,
    Recipe,
)

VAE_PREFIX = "first_stage_model."
EMA_PREFIX = "model_ema."
_BARE_VAE = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
_EXAMPLES = 3


@dataclass(frozen=True)
class InputHeader:
    """What the planner knows of one input file: its path, detected arch (None for a bare VAE file), and
    key -> (safetensors dtype code, shape) in storage order. The engine fills it from the file header."""

    path: str
    arch: str | None
    keys: Mapping[str, tuple[str, tuple[int, ...]]]


@dataclass
class Plan:
    """Everything the engine needs to write the output, and nothing it has to read to know it.

    Attributes:
        arch: an architecture id (arch/registry.py).
        keys: one KeyPlan per output tensor, in output order (the first input's storage order, then extra keys).
        inputs: alias -> path of every model the plan reads.
        output: the recipe's output options (dtype codes, VAE, pruning, seed, metadata ...).
        recipe_dict: the resolved recipe (JSON-able) to record in the output's metadata.
        warnings: one line each, for the user.
        sha256: alias -> pinned sha256 for the inputs the recipe pins (the engine verifies them).
        steps: one human line per step (for `--dry-run`).
    """

    arch: str
    keys: list[KeyPlan]
    inputs: dict[str, str]
    output: OutputSpec
    recipe_dict: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    sha256: dict[str, str] = field(default_factory=dict)
    steps: list[str] = field(default_factory=list)


def build_plan(recipe: Recipe, inputs: Mapping[str, InputHeader], *, arch: str,
               adapter_keys: Mapping[str, Collection[str]] | None = None) -> Plan:
    """Plan every output key of `recipe` from the inputs' headers.

    Args:
        recipe: a validated recipe.
        inputs: alias -> header, for at least every model the output uses.
        arch: the architecture id of the job (arch/registry.py); every input must have it.
        adapter_keys: LoRA step name -> the checkpoint keys its adapters change (read from the adapter files'
            headers by the caller); those keys get an `Adapter` term, the others pass through.

    Returns:
        The Plan.

    Raises:
        ArchError: inputs of different architectures, or not the recipe's declared arch.
        RecipeError: keys missing from some inputs (all listed at once, per model), shape mismatches (all at once),
            MBW vectors that do not fit the architecture, a VAE file without VAE keys, `fp8_scaled` with a dtype
            (e.g. from --dtype) other than fp8_e4m3fn.
    """
    if recipe.output.fp8_scaled and recipe.output.dtype != SCALED_DTYPE:
        raise RecipeError(f"{recipe.source}: output.fp8_scaled needs dtype fp8_e4m3fn (ComfyUI reads every scaled "
                          f"weight as e4m3fn), not {name_of(recipe.output.dtype)}")
    return _Planner(recipe, inputs, arch, adapter_keys or {}).plan()


def derive_seed(seed: int, step: str, key: str) -> int:
    """A 63-bit seed from (recipe seed, step, key): independent of key order, device and thread count."""
    digest = hashlib.sha256(f"{seed}\x00{step}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def check_declared_arch(recipe: Recipe, headers: Mapping[str, InputHeader]) -> None:
    """Refuse inputs whose detected architecture is not the one the recipe declares (`arch:`), naming each such
    file and what it is; inputs without a detectable architecture (a bare VAE file) are not judged here.

    Raises:
        ArchError: the recipe's `arch:` against the files that are something else.
    """
    if not recipe.arch:
        return
    wrong = [(alias, header) for alias, header in headers.items() if header.arch and header.arch != recipe.arch]
    if wrong:
        files = ", ".join(f"model {alias!r} ({header.path}) is {ARCH_NAMES.get(str(header.arch), header.arch)}"
                          for alias, header in wrong)
        raise ArchError(f"{recipe.source}: the recipe declares `arch: {recipe.arch}` ({ARCH_NAMES[recipe.arch]}) "
                        f"but {files}; correct `arch:` or the model paths")


class _Planner:
    def __init__(self, recipe: Recipe, headers: Mapping[str, InputHeader], arch: str,
                 adapter_keys: Mapping[str, Collection[str]]) -> None:
        self.recipe, self.arch = recipe, check_arch(arch)
        self.adapter_keys = {name: frozenset(keys) for name, keys in adapter_keys.items()}
        self.used = [name for name in recipe.models if name not in recipe.unused and name != self.vae_only()]
        self.headers = self.check_headers(headers)
        self.primary = self.first_model(recipe.output_step)
        self.order = [self.primary, *(alias for alias in self.used if alias != self.primary)]
        self.params = {name: self.resolve_params(step) for name, step in recipe.steps.items()
                       if isinstance(step, MethodStep) and name not in recipe.unused}
        self.specs = {name: METHODS[step.method] for name, step in recipe.steps.items() if name in self.params
                      and isinstance(step, MethodStep)}
        self.warnings: list[str] = [f"{'model' if name in recipe.models else 'step'} {name!r} is not used by the "
                                    f"output step {recipe.output_step!r}" for name in recipe.unused]

    def vae_only(self) -> str | None:
        """The VAE alias when it serves only as the VAE source (not as an input of any step)."""
        vae = self.recipe.output.vae
        used_in_steps = any(vae in step.inputs for step in self.recipe.steps.values())
        return vae if vae and not used_in_steps else None

    def check_headers(self, headers: Mapping[str, InputHeader]) -> dict[str, InputHeader]:
        needed = list(dict.fromkeys([*self.used, *([self.recipe.output.vae] if self.recipe.output.vae else [])]))
        absent = [alias for alias in needed if alias not in headers]
        if absent:
            raise RecipeError(f"{self.recipe.source}: no input file for model(s) {', '.join(absent)}")
        check_declared_arch(self.recipe, {alias: headers[alias] for alias in needed})
        if self.recipe.arch and self.recipe.arch != self.arch:
            raise ArchError(f"{self.recipe.source}: the recipe is for {ARCH_NAMES[self.recipe.arch]} but the "
                            f"inputs are {ARCH_NAMES[self.arch]}")
        wrong = [alias for alias in needed if headers[alias].arch != self.arch
                 and not (alias == self.vae_only() and headers[alias].arch is None)]
        if wrong:
            found = ", ".join(f"{alias} is {ARCH_NAMES.get(str(headers[alias].arch), 'of unknown architecture')} "
                              f"({headers[alias].path})" for alias in needed)
            raise ArchError(f"{self.recipe.source}: inputs mix architectures: {found}; a merge needs all "
                            f"inputs of one architecture ({ARCH_NAMES[self.arch]})")
        return {alias: headers[alias] for alias in needed}

    def first_model(self, name: str) -> str:
        """The model a step's value starts from: its first input (of kind weight), followed down the steps."""
        while name in self.recipe.steps:
            step = self.recipe.steps[name]
            name = next(n for n in step.inputs if self.recipe.kind_of(n) == "weight")
        return name

    def resolve_params(self, step: MethodStep) -> list[tuple[Param, dict[str, float] | None]]:
        resolved = []
        for param in step.params:
            weights = parse_mbw(param.blocks, self.arch, step.convention, where=param.where) \
                if param.block_weighted else None
            for value in (weights or {}).values():
                check_range(METHODS[step.method].param(param.name), value, param.where)
            resolved.append((param, weights))
        return resolved

    # -------------------------------------------------------------------------------------------------- keys
    def plan(self) -> Plan:
        missing: dict[str, list[str]] = {alias: [] for alias in self.used}
        mismatched: list[str] = []
        taken_first = 0
        plans = []
        for key, source in self.output_keys():
            node, lacking = self.key_node(key, source)
            for alias in lacking:
                missing[alias].append(key)
            taken_first += bool(lacking)
            shapes = {load: self.headers[load.alias].keys[load.key] for load in loads_of(node)}
            if len({shape for _, shape in shapes.values()}) > 1:
                mismatched.append(f"{key} ({', '.join(f'{ld.alias} {list(s)}' for ld, (_, s) in shapes.items())})")
            dtype, shape = next(iter(shapes.values()))
            out_dtype = self.out_dtype(key, dtype, tuple(shape))
            plans.append(KeyPlan(key, node, out_dtype, tuple(shape)))
        self.report(missing, mismatched, taken_first)
        return Plan(
            arch=self.arch,
            keys=plans,
            inputs={alias: self.recipe.models[alias].path or self.headers[alias].path for alias in self.headers},
            output=self.recipe.output,
            recipe_dict=resolved_recipe(self.recipe, self.arch, list(self.headers), self.params),
            warnings=self.warnings,
            sha256={alias: sha for alias in self.headers if (sha := self.recipe.models[alias].sha256)},
            steps=[describe_step(self.recipe, name, self.params) for name in self.recipe.steps
                   if name not in self.recipe.unused],
        )

    def output_keys(self) -> list[tuple[str, str | None]]:
        """(output key, VAE source key or None) in output order, after pruning, dropping and the VAE bake."""
        seen: dict[str, None] = {}
        for alias in self.order:
            seen.update(dict.fromkeys(self.headers[alias].keys))
        out = self.recipe.output
        drop = list(out.drop)  # validated at parse time; matched in linear time (patterns.py)
        vae_keys = self.vae_keys() if out.vae else {}
        keys: list[tuple[str, str | None]] = []
        for key in seen:
            if out.vae and key.startswith(VAE_PREFIX):
                if vae_keys:
                    keys += list(vae_keys.items())
                    vae_keys = {}
                continue
            keys.append((key, None))
        keys += list(vae_keys.items())
        return [(key, src) for key, src in keys if not (out.prune_ema and key.startswith(EMA_PREFIX))
                and not any(patterns.search(pattern, key) for pattern in drop)]

    def vae_keys(self) -> dict[str, str]:
        """Output VAE key -> key in the VAE model's file."""
        alias = str(self.recipe.output.vae)
        names = list(self.headers[alias].keys)
        keys = {key: key for key in names if key.startswith(VAE_PREFIX)}
        if not keys:
            keys = {VAE_PREFIX + key: key for key in names if key.startswith(_BARE_VAE)}
        if not keys:
            raise RecipeError(f"{self.recipe.source}: output.vae: model {alias!r} ({self.headers[alias].path}) "
                              f"has no VAE keys ({VAE_PREFIX}* or encoder.*/decoder.*)")
        return keys

    def out_dtype(self, key: str, dtype: str, shape: tuple[int, ...]) -> str:
        """The output dtype; scaled fp8 stores only the UNet's Linear weights in fp8 (arch/scaled_fp8.py)."""
        if not self.is_mergeable(key, dtype):
            return dtype
        return storage_dtype(key, shape) if self.recipe.output.fp8_scaled else self.recipe.output.dtype

    def is_mergeable(self, key: str, dtype: str) -> bool:
        return is_float_dtype(dtype) and key not in MARKERS

    def key_node(self, key: str, vae_source: str | None) -> tuple[Node, list[str]]:
        """The node for `key` and the models (of the steps) that lack it."""
        if vae_source is not None:
            return Load(str(self.recipe.output.vae), vae_source), []
        having = [alias for alias in self.order if key in self.headers[alias].keys]
        first = Load(having[0], key)
        if not self.is_mergeable(key, self.headers[having[0]].keys[key][0]):
            return first, []
        lacking = [alias for alias in self.used if alias not in having]
        node = self.evaluate(self.recipe.output_step, key, {})
        return (node if node is not None else first), lacking

    def evaluate(self, name: str, key: str, memo: dict[str, Node | None]) -> Node | None:
        """The node of model or step `name` for `key`; None when no input of it has the key."""
        if name not in memo:
            memo[name] = self.compute(name, key, memo)
        return memo[name]

    def compute(self, name: str, key: str, memo: dict[str, Node | None]) -> Node | None:
        if name in self.recipe.models:
            return Load(name, key) if key in self.headers[name].keys else None
        step = self.recipe.steps[name]
        evaluated = [self.evaluate(input_name, key, memo) for input_name in step.inputs]
        nodes = [node for node in evaluated if node is not None]
        if len(nodes) < len(evaluated):  # take the first input (of kind weight) that has the key
            kinds = [self.recipe.kind_of(n) for n in step.inputs]
            present = [node for node, kind in zip(evaluated, kinds) if node is not None and kind == "weight"]
            return present[0] if present else None
        if isinstance(step, FormulaStep):
            return _linear([(node, c) for node, (_, c) in zip(nodes, step.formula.coeffs)])
        if isinstance(step, LoraStep):  # the weight plus the adapters' delta; the weight stays one term (DoRA)
            base = nodes[0]
            if key not in self.adapter_keys.get(step.name, ()):
                return base
            return Linear(((base, 1.0), (Adapter(step.name, key, 1.0), 1.0)))
        return self.call(step, nodes, key)

    def call(self, step: MethodStep, nodes: list[Node], key: str) -> Node:
        params = self.key_params(step, key)
        if params is None:
            return nodes[0]
        spec = self.specs[step.name]
        index = spec.identity_input(params)  # the method would return a bit-exact copy of that input
        if index is not None:
            return nodes[index]
        params = {**spec.defaults, **params}
        if spec.seeded:
            base = params.get(SEED_PARAM, self.recipe.output.seed)
            params[SEED_PARAM] = derive_seed(int(base), step.name, key)
        return Call(step.method, tuple(nodes), tuple(sorted(params.items())))

    def key_params(self, step: MethodStep, key: str) -> dict[str, Scalar] | None:
        """Parameter values for `key`, or None when the step keeps A for it."""
        block = block_of(key, self.arch, step.convention) if step.block_weighted else None
        values: dict[str, Scalar] = {}
        for param, weights in self.params[step.name]:
            value = _override(param, key)
            if value is None and weights is not None:
                if block is None:
                    return None
                value = weights[block]
            values[param.name] = param.value if value is None else value
        return values

    # ---------------------------------------------------------------------------------------------- reporting
    def report(self, missing: dict[str, list[str]], mismatched: list[str], taken_first: int) -> None:
        source = self.recipe.source
        lacking = {alias: keys for alias, keys in missing.items() if keys}
        if mismatched:
            raise RecipeError(f"{source}: shape mismatch in {len(mismatched)} key(s): "
                              f"{'; '.join(mismatched[:_EXAMPLES])}{'; ...' if len(mismatched) > _EXAMPLES else ''}"
                              "; are these models of the same kind (e.g. not an inpainting model)?")
        if not lacking:
            return
        summary = "; ".join(f"{alias} ({self.headers[alias].path}) lacks {len(keys)} key(s), e.g. "
                            f"{', '.join(keys[:_EXAMPLES])}" for alias, keys in lacking.items())
        if self.recipe.output.missing_keys == "error":
            raise RecipeError(f"{source}: missing keys: {summary}. Set `output: {{missing_keys: take_first}}` to "
                              "take them from the first model that has them, or drop them with `output.drop`")
        self.warnings.append(f"{taken_first} key(s) taken from the first model that has them: {summary}")



def _linear(terms: list[tuple[Node, float]]) -> Node:
    """sum c*node with nested Linear nodes flattened, like terms collected and zero coefficients dropped."""
    collected: dict[Node, float] = {}
    for node, coeff in terms:
        inner = node.terms if isinstance(node, Linear) else ((node, 1.0),)
        for term, c in inner:
            collected[term] = collected.get(term, 0.0) + coeff * c
    kept = tuple((node, c) for node, c in collected.items() if abs(c) > ZERO_COEFF)
    if len(kept) == 1 and kept[0][1] == 1.0:
        return kept[0][0]
    return Linear(kept)


def _override(param: Param, key: str) -> float | None:
    value = None
    for pattern, number in param.overrides:
        if patterns.search(pattern, key):
            value = number
    return value
