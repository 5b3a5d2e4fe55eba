"""Recipe files: YAML -> a validated `Recipe` (models, a DAG of steps, output options). No tensor is read here.

A recipe::

    arch: sdxl                       # optional; checked against the inputs
    convention: supermerger-2023     # MBW block convention for every step (default: supermerger)
    models:
      beta7: models/kxl-beta7.safetensors          # path, relative to the recipe file
      anxl3: {path: models/anxl3.safetensors, sha256: 0123...}  # optional pinned hash (the engine checks it)
    steps:
      rev2: "beta7 + 1.0 * (anxl3 - anxl2) + 0.25 * (base8 - beta7)"   # a formula (see formula.py)
      final: {method: weighted_sum, a: rev2, b: anxl3, alpha: [0, 0.1, ...]}
    output: {path: out.safetensors, dtype: fp16}

Steps name their inputs (models or other steps); the step named `output`, else the last one, is written.
Method parameters declared as floats take a number, an MBW vector (list, string, preset or named blocks, read by
`mergekit_sdxl.arch.mbw.parse_mbw` under the step's convention) or `{value: ..., overrides: [{match: REGEX,
value: N}]}` (regex searched in the key; later entries win). In a step with an MBW vector, keys the convention
keeps from A (`block_of` is None) are taken unchanged from the step's first input unless an override matches.
Every error is a one-line RecipeError naming the file, the step and the field.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mergekit_sdxl.arch.blocks import CONVENTIONS, DEFAULT_CONVENTION
from mergekit_sdxl.arch.lbw import check_adapter_blocks
from mergekit_sdxl.arch.mbw import parse_mbw
from mergekit_sdxl.arch.tables import ARCHS
from mergekit_sdxl.errors import MergekitError, RecipeError, UsageError
from mergekit_sdxl.recipe.formula import NAME_PATTERN, Formula, Kind, parse_formula, tokenize

MAX_RECIPE_BYTES = 1 << 20
MAX_MODELS = 64
MAX_STEPS = 256
MAX_LIST = 64  # values in an MBW vector, models of a variadic step
MAX_RULES = 256  # overrides per parameter, drop patterns
MAX_PATTERN = 500
MAX_YAML_DEPTH = 32
MAX_YAML_NODES = 50_000  # far above any real recipe; bounds the time a hostile 1 MB recipe can take
MAX_METADATA = 256
MAX_METADATA_VALUE = 65_536

OUTPUT_DTYPES: dict[str, str] = {
    "fp16": "F16", "bf16": "BF16", "fp32": "F32", "fp8_e4m3fn": "F8_E4M3", "fp8_e5m2": "F8_E5M2",
}
COMPUTE_DTYPES: dict[str, str] = {"fp32": "F32", "fp64": "F64"}
MISSING_POLICIES = ("error", "take_first")
SEED_PARAM = "seed"  # filled per key by the planner; a step may set it to change that step's base seed

_TOP_FIELDS = ("version", "name", "description", "arch", "convention", "models", "steps", "output")
_MODEL_FIELDS = ("path", "sha256")
_OUTPUT_FIELDS = ("path", "dtype", "fp8_scaled", "vae", "prune_ema", "drop", "missing_keys", "compute_dtype",
                  "seed", "metadata")
_NAME = re.compile(rf"^{NAME_PATTERN}$")
_SHA256 = re.compile(r"^[0-9a-fA-F]{64}$")


@dataclass(frozen=True)
class ModelRef:
    """An input model: its alias, path (resolved) and optional pinned sha256 (lowercase hex)."""

    alias: str
    path: str
    sha256: str | None = None


@dataclass(frozen=True)
class Param:
    """One method parameter: a constant, or an MBW vector (raw, parsed per architecture), plus regex overrides."""

    name: str
    where: str
    value: Any = None  # the constant (number, bool, string) when not block-weighted
    blocks: Any = None  # the raw MBW spec (list, string, preset, named mapping); None for a constant
    overrides: tuple[tuple[str, float], ...] = ()

    @property
    def block_weighted(self) -> bool:
        return self.blocks is not None


@dataclass(frozen=True)
class FormulaStep:
    """A step computed by a formula; `kind` is "weight" or "delta"."""

    name: str
    formula: Formula

    @property
    def kind(self) -> Kind:
        return self.formula.kind

    @property
    def inputs(self) -> tuple[str, ...]:
        return self.formula.names


@dataclass(frozen=True)
class MethodStep:
    """A step computed by a registered merge method on named inputs (fixed ones first, then variadic ones)."""

    name: str
    method: str
    inputs: tuple[str, ...]
    params: tuple[Param, ...]
    convention: str
    kind: Kind = "weight"

    @property
    def block_weighted(self) -> bool:
        return any(p.block_weighted for p in self.params)


@dataclass(frozen=True)
class AdapterRef:
    """One LoRA/LyCORIS file applied by a LoRA step: path (resolved), strengths and optional block weights."""

    path: str
    strength: float = 1.0
    te_strength: float | None = None
    blocks: Any = None  # raw MBW spec (validated against the architecture by the planner)


@dataclass(frozen=True)
class LoraStep:
    """A step adding adapters' deltas to a weight: `model` + sum of strength * ΔW (a weight)."""

    name: str
    model: str
    adapters: tuple[AdapterRef, ...]
    convention: str
    kind: Kind = "weight"

    @property
    def inputs(self) -> tuple[str, ...]:
        return (self.model,)


Step = FormulaStep | MethodStep | LoraStep
_LORA_FIELDS = ("lora", "model", "strength", "te_strength", "blocks", "convention")
_ADAPTER_FIELDS = ("path", "strength", "te_strength", "blocks")


@dataclass(frozen=True)
class OutputSpec:
    """What to write and how: dtype codes are safetensors codes ("F16", "F8_E4M3", ...)."""

    path: str | None = None
    dtype: str = "F16"
    fp8_scaled: bool = False
    vae: str | None = None
    prune_ema: bool = False
    drop: tuple[str, ...] = ()
    missing_keys: str = "error"
    compute_dtype: str = "F32"
    seed: int = 0
    metadata: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Recipe:
    """A validated recipe. `steps` are in dependency order; `output_step` names the step that is written."""

    source: str
    models: dict[str, ModelRef]
    steps: dict[str, Step]
    output_step: str
    output: OutputSpec
    convention: str = DEFAULT_CONVENTION
    arch: str | None = None
    name: str | None = None
    description: str | None = None
    unused: tuple[str, ...] = field(default=())

    def kind_of(self, name: str) -> Kind:
        """"weight" for models and weight steps, "delta" for delta steps."""
        step = self.steps.get(name)
        return "weight" if step is None else step.kind


# ---------------------------------------------------------------------------------------------------- loading


def load_recipe(path: str | Path, model_paths: Mapping[str, str] | None = None) -> Recipe:
    """Read and validate a recipe file.

    Args:
        path: the YAML file; relative model paths in it are resolved against its folder.
        model_paths: alias -> path overrides from the command line (`-m beta7=/models/b7.safetensors`),
            used as given (relative to the current directory).

    Returns:
        The validated Recipe.

    Raises:
        RecipeError: one line naming the file, step and field, for any problem.
    """
    file = Path(path)
    if file.exists() and not file.is_file():  # a FIFO would block the read forever; a folder is no recipe
        raise RecipeError(f"{file}: is not a regular file; give the recipe's YAML file")
    try:
        with file.open("rb") as handle:
            raw = handle.read(MAX_RECIPE_BYTES + 1)
    except OSError as exc:
        raise RecipeError(f"{file}: cannot read recipe: {exc.strerror or exc}") from exc
    if len(raw) > MAX_RECIPE_BYTES:
        raise RecipeError(f"{file}: recipe is larger than {MAX_RECIPE_BYTES} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeError(f"{file}: recipe is not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    data = load_yaml(text, str(file))
    return parse_recipe(data, source=str(file), base_dir=file.parent, model_paths=model_paths)


def parse_model_overrides(items: Iterable[str]) -> dict[str, str]:
    """`["beta7=/models/b7.safetensors", ...]` -> {alias: path}; UsageError for a malformed or repeated item."""
    out: dict[str, str] = {}
    for item in items:
        alias, sep, path = item.partition("=")
        alias = alias.strip()
        if not sep or not alias or not path.strip():
            raise UsageError(f"-m {item!r}: expected ALIAS=PATH, e.g. -m beta7=/models/kxl-beta7.safetensors")
        if alias in out:
            raise UsageError(f"-m {alias}: given twice")
        out[alias] = path.strip()
    return out


class _Loader(yaml.SafeLoader):
    """SafeLoader that refuses anchors and aliases (no billion laughs) and duplicate mapping keys."""

    source = "<recipe>"
    depth = 0
    nodes = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        line = event.start_mark.line + 1
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
            raise RecipeError(f"{self.source}:{line}: YAML anchors and aliases (&{event.anchor} / *{event.anchor}) "
                              "are not allowed in recipes; write the value out")
        if self.depth >= MAX_YAML_DEPTH:
            raise RecipeError(f"{self.source}:{line}: YAML nests deeper than {MAX_YAML_DEPTH} levels")
        self.nodes += 1
        if self.nodes > MAX_YAML_NODES:
            raise RecipeError(f"{self.source}:{line}: more than {MAX_YAML_NODES} YAML values; not a recipe")
        self.depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (list, dict)):
                raise RecipeError(f"{self.source}:{key_node.start_mark.line + 1}: mapping keys must be plain values")
            if key in seen:
                raise RecipeError(f"{self.source}:{key_node.start_mark.line + 1}: duplicate key {key!r}")
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_yaml(text: str, source: str = "<recipe>") -> Any:
    """Parse YAML text safely: no Python objects, no anchors/aliases, no duplicate keys; RecipeError otherwise."""
    try:  # the constructor already scans the text: a control character fails here
        loader = _Loader(text)
    except yaml.YAMLError as exc:
        raise RecipeError(f"{source}: invalid YAML: {str(exc).splitlines()[0]}") from None
    loader.source = source
    try:
        return loader.get_single_data()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = f":{mark.line + 1}" if mark else ""
        raise RecipeError(f"{source}{line}: invalid YAML: {exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:
        raise RecipeError(f"{source}: invalid YAML: {exc}") from None
    finally:
        loader.dispose()


# ---------------------------------------------------------------------------------------------------- parsing


def parse_recipe(data: Any, *, source: str = "<recipe>", base_dir: str | Path = ".",
                 model_paths: Mapping[str, str] | None = None) -> Recipe:
    """Validate recipe data (as loaded from YAML) into a Recipe; see `load_recipe`."""
    return _Parser(source, Path(base_dir)).recipe(data, dict(model_paths or {}))


def _fail(where: str, message: str) -> RecipeError:
    return RecipeError(f"{where}: {message}")


def _type_name(value: Any) -> str:
    return {bool: "true/false", int: "a number", float: "a number", str: "a string", list: "a list",
            dict: "a mapping", type(None): "empty"}.get(type(value), type(value).__name__)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _suggest(word: str, choices: Iterable[str]) -> str:
    """"; did you mean 'x'?" for the closest choice (ignoring case), or ""."""
    lowered = {choice.lower(): choice for choice in choices}
    close = difflib.get_close_matches(str(word).lower(), list(lowered), n=1, cutoff=0.6)
    return f"; did you mean {lowered[close[0]]!r}?" if close else ""


class _Parser:
    def __init__(self, source: str, base_dir: Path) -> None:
        self.source = source
        self.base_dir = base_dir

    def where(self, *parts: str) -> str:
        return ": ".join((self.source, ".".join(parts))) if parts else self.source

    def mapping(self, value: Any, where: str, allowed: Iterable[str]) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise _fail(where, f"expected a mapping, got {_type_name(value)}")
        allowed = tuple(allowed)
        for key in value:
            if not isinstance(key, str):
                raise _fail(where, f"field names must be strings, got {key!r}")
            if key not in allowed:
                raise _fail(where, f"unknown field {key!r}{_suggest(key, allowed)} (allowed: {', '.join(allowed)})")
        return value

    def recipe(self, data: Any, model_paths: dict[str, str]) -> Recipe:
        if data is None:
            raise _fail(self.source, "recipe is empty")
        top = self.mapping(data, self.source, _TOP_FIELDS)
        for required in ("models", "steps"):
            if required not in top:
                raise _fail(self.source, f"missing field {required!r}")
        version = top.get("version", 1)
        if version != 1:
            raise _fail(self.where("version"), f"unsupported recipe version {version!r}; this tool reads version 1")
        arch = self.choice(top.get("arch"), self.where("arch"), ARCHS, optional=True)
        convention = self.choice(top.get("convention", DEFAULT_CONVENTION), self.where("convention"), CONVENTIONS)
        models = self.models(top["models"], model_paths)
        steps = self.steps(top["steps"], models, convention, arch)
        output_step = "output" if "output" in steps else next(reversed(top["steps"]))
        if steps[output_step].kind == "delta":
            raise _fail(self.where("steps", output_step), "the output step is a delta (a difference of models), "
                                                          "not a model; add it to one, e.g. `base + "
                                                          f"{output_step}` in a last step")
        output = self.output(top.get("output", {}), models)
        used = _used_names(steps, output_step)
        if output.vae:
            used.add(output.vae)
        unused = tuple(name for name in (*models, *steps) if name not in used)
        name, description = self.text(top.get("name"), "name"), self.text(top.get("description"), "description")
        return Recipe(self.source, models, steps, output_step, output, convention, arch, name, description, unused)

    def text(self, value: Any, name: str) -> str | None:
        if value is not None and not isinstance(value, str):
            raise _fail(self.where(name), f"expected a string, got {_type_name(value)}")
        return value

    def choice(self, value: Any, where: str, choices: Iterable[str], optional: bool = False) -> Any:
        choices = tuple(choices)
        if value is None and optional:
            return None
        if not isinstance(value, str) or value not in choices:
            raise _fail(where, f"{value!r} is not one of {', '.join(choices)}{_suggest(str(value), choices)}")
        return value

    def name(self, name: Any, where: str) -> str:
        if not isinstance(name, str) or not _NAME.match(name):
            raise _fail(where, f"{name!r} is not a valid name (letters, digits and _, not starting with a digit; "
                               "names are used in formulas, where `-` means minus)")
        return name

    # models ------------------------------------------------------------------------------------------------
    def models(self, value: Any, model_paths: dict[str, str]) -> dict[str, ModelRef]:
        where = self.where("models")
        if not isinstance(value, dict) or not value:
            raise _fail(where, f"expected a mapping alias -> path, got {_type_name(value)}")
        if len(value) > MAX_MODELS:
            raise _fail(where, f"{len(value)} models; the limit is {MAX_MODELS}")
        models = {self.name(alias, where): self.model(alias, entry, model_paths.get(alias))
                  for alias, entry in value.items()}
        unknown = [alias for alias in model_paths if alias not in models]
        if unknown:
            raise _fail(self.source, f"-m {unknown[0]}: the recipe has no model {unknown[0]!r}"
                                     f"{_suggest(unknown[0], models)} (models: {', '.join(models)})")
        return models

    def model(self, alias: str, entry: Any, override: str | None) -> ModelRef:
        where = self.where("models", alias)
        if isinstance(entry, str) or entry is None:
            entry = {"path": entry}
        fields = self.mapping(entry, where, _MODEL_FIELDS)
        path, sha = fields.get("path"), fields.get("sha256")
        if path is not None and (not isinstance(path, str) or not path.strip()):
            raise _fail(self.where("models", alias, "path"), f"expected a file path, got {_type_name(path)}")
        if sha is not None and (not isinstance(sha, str) or not _SHA256.match(sha)):
            raise _fail(self.where("models", alias, "sha256"),
                        f"{sha!r} is not a sha256 (64 hex digits, as `sha256sum` prints)")
        if override is not None:
            resolved = str(Path(override).expanduser())
        elif path is None:
            raise _fail(where, f"no path; give one in the recipe or on the command line with -m {alias}=PATH")
        else:
            given = Path(path).expanduser()
            resolved = str(given if given.is_absolute() else self.base_dir / given)
        return ModelRef(alias, resolved, sha.lower() if sha else None)

    # steps -------------------------------------------------------------------------------------------------
    def steps(self, value: Any, models: dict[str, ModelRef], convention: str,
              arch: str | None) -> dict[str, Step]:
        where = self.where("steps")
        if not isinstance(value, dict) or not value:
            raise _fail(where, f"expected a mapping step name -> formula or method call, got {_type_name(value)}")
        if len(value) > MAX_STEPS:
            raise _fail(where, f"{len(value)} steps; the limit is {MAX_STEPS}")
        for name in value:
            self.name(name, where)
            if name in models:
                raise _fail(self.where("steps", name), f"the name {name!r} is both a model and a step; rename one")
        deps = {name: self.dependencies(name, entry, models, value) for name, entry in value.items()}
        order = _order(deps, set(models), where)
        kinds: dict[str, Kind] = dict.fromkeys(models, "weight")
        steps: dict[str, Step] = {}
        for name in order:
            step = self.step(name, value[name], kinds, convention, arch)
            kinds[name] = step.kind
            steps[name] = step
        return steps

    def dependencies(self, name: str, entry: Any, models: dict[str, ModelRef], steps: dict[str, Any]) -> list[str]:
        """Names a step refers to, each checked to exist; a step naming itself is an error."""
        if isinstance(entry, str):
            entry = {"formula": entry}
        if not isinstance(entry, dict):
            raise _fail(self.where("steps", name), f"expected a formula string or a mapping, got {_type_name(entry)}")
        refs: list[tuple[str, Any]] = []
        if "formula" in entry:
            formula = entry["formula"]
            if not isinstance(formula, str):
                raise _fail(self.where("steps", name, "formula"), f"expected a string, got {_type_name(formula)}")
            try:
                refs = [("formula", t.text) for t in tokenize(formula) if t.kind == "name"]
            except RecipeError as exc:
                raise _fail(self.where("steps", name, "formula"), str(exc)) from None
        elif "lora" in entry:
            refs = [("model", entry.get("model"))]
            if entry.get("model") is None:
                raise _fail(self.where("steps", name), "a LoRA step needs `model`: the model or step to apply it to")
        elif "method" in entry:
            spec = self.method_spec(name, entry["method"])
            for field_name in (*spec.inputs, *(["models"] if spec.variadic else [])):
                ref = entry.get(field_name)
                refs += [(field_name, r) for r in ref] if isinstance(ref, list) else [(field_name, ref)]
        else:
            raise _fail(self.where("steps", name), "expected a `formula`, `method` or `lora` field")
        for field_name, ref in refs:
            if ref == name:
                raise _fail(self.where("steps", name, field_name), f"step {name!r} refers to itself")
            if isinstance(ref, str) and ref not in models and ref not in steps:
                raise _fail(self.where("steps", name, field_name),
                            f"unknown model or step {ref!r}{_suggest(ref, [*models, *steps])} "
                            f"(models: {', '.join(models)}; steps: {', '.join(steps)})")
        return [ref for _, ref in refs if isinstance(ref, str)]

    def method_spec(self, step: str, method: Any) -> Any:
        methods = method_registry()
        if not isinstance(method, str) or method not in methods:
            raise _fail(self.where("steps", step, "method"), f"unknown method {method!r}"
                        f"{_suggest(str(method), methods)} (known: {', '.join(sorted(methods))})")
        return methods[method]

    def step(self, name: str, entry: Any, kinds: dict[str, Kind], convention: str,
             arch: str | None) -> Step:
        where = self.where("steps", name)
        if isinstance(entry, str):
            entry = {"formula": entry}
        if "formula" in entry:
            self.mapping(entry, where, ("formula",))
            try:
                return FormulaStep(name, parse_formula(entry["formula"], kinds))
            except RecipeError as exc:
                raise _fail(self.where("steps", name, "formula"), str(exc)) from None
        if "lora" in entry:
            return self.lora_step(name, entry, kinds, convention)
        return self.method_step(name, entry, kinds, convention, arch)

    def lora_step(self, name: str, entry: dict[str, Any], kinds: dict[str, Kind], convention: str) -> LoraStep:
        """`{lora: FILE | [FILE | {path, strength, te_strength, blocks}], model: NAME, strength, te_strength, blocks}`;
        step-level strength/te_strength/blocks are defaults for every adapter of the step."""
        fields = self.mapping(entry, self.where("steps", name), _LORA_FIELDS)
        convention = self.choice(fields.get("convention", convention), self.where("steps", name, "convention"),
                                 CONVENTIONS)
        model = self.input_name(name, "model", fields.get("model"), kinds)
        items = fields["lora"] if isinstance(fields["lora"], list) else [fields["lora"]]
        if not items or len(items) > MAX_LIST:
            raise _fail(self.where("steps", name, "lora"), f"expected 1 to {MAX_LIST} adapter files")
        defaults = {k: fields[k] for k in ("strength", "te_strength", "blocks") if k in fields}
        adapters = tuple(self.adapter(name, i, item, defaults, convention) for i, item in enumerate(items))
        return LoraStep(name, model, adapters, convention)

    def adapter(self, step: str, index: int, item: Any, defaults: dict[str, Any], convention: str) -> AdapterRef:
        where = self.where("steps", step, f"lora[{index}]")
        entry = {"path": item} if isinstance(item, str) else self.mapping(item, where, _ADAPTER_FIELDS)
        merged = {**defaults, **entry}
        path = merged.get("path")
        if not isinstance(path, str) or not path.strip():
            raise _fail(where, f"expected an adapter file path, got {_type_name(path)}")
        for key in ("strength", "te_strength"):
            value = merged.get(key)
            if value is not None and (not _is_number(value) or not math.isfinite(value)):
                raise _fail(f"{where}.{key}", f"expected a finite number, got {value!r}")
        if merged.get("blocks") is not None:
            check_adapter_blocks(merged["blocks"], convention, where=f"{where}.blocks")
        given = Path(path).expanduser()
        resolved = str(given if given.is_absolute() else self.base_dir / given)
        te = merged.get("te_strength")
        return AdapterRef(resolved, float(merged.get("strength", 1.0)), None if te is None else float(te),
                          merged.get("blocks"))

    def method_step(self, name: str, entry: dict[str, Any], kinds: dict[str, Kind], convention: str,
                    arch: str | None) -> MethodStep:
        spec = self.method_spec(name, entry["method"])
        variadic = ("models",) if spec.variadic else ()
        fields = self.mapping(entry, self.where("steps", name),
                              ("method", "convention", *spec.inputs, *variadic, *spec.params))
        convention = self.choice(fields.get("convention", convention), self.where("steps", name, "convention"),
                                 CONVENTIONS)
        inputs = [self.input_name(name, field_name, fields.get(field_name), kinds) for field_name in spec.inputs]
        if spec.variadic:
            inputs += self.variadic_inputs(name, fields.get("models"), getattr(spec, "min_variadic", 1), kinds)
        params = tuple(self.param(name, param, fields, spec, convention, arch) for param in spec.params
                       if param in fields or (spec.params[param] is None and param != SEED_PARAM))
        return MethodStep(name, spec.name, tuple(inputs), params, convention)

    def input_name(self, step: str, field_name: str, value: Any, kinds: dict[str, Kind]) -> str:
        where = self.where("steps", step, field_name)
        if value is None:
            raise _fail(self.where("steps", step), f"missing input {field_name!r} (a model or step name)")
        if not isinstance(value, str):
            raise _fail(where, f"expected a model or step name, got {_type_name(value)}")
        if kinds[value] == "delta":
            raise _fail(where, f"{value!r} is a delta step (a difference of models); methods take models. "
                               f"Use it in a formula instead, e.g. `model + {value}`")
        return value

    def variadic_inputs(self, step: str, value: Any, least: int, kinds: dict[str, Kind]) -> list[str]:
        where = self.where("steps", step, "models")
        if not isinstance(value, list) or not value:
            raise _fail(where if value is not None else self.where("steps", step),
                        f"expected a list of at least {least} model or step names in `models`")
        if len(value) < least or len(value) > MAX_LIST:
            raise _fail(where, f"{len(value)} models; this method takes {least} to {MAX_LIST}")
        return [self.input_name(step, f"models[{i}]", item, kinds) for i, item in enumerate(value)]

    def param(self, step: str, name: str, fields: dict[str, Any], spec: Any, convention: str,
              arch: str | None) -> Param:
        where = self.where("steps", step, name)
        if name not in fields:
            raise _fail(self.where("steps", step), f"method {spec.name!r} needs parameter {name!r}")
        value = fields[name]
        want = spec.param_types.get(name, float)
        if want is not float:
            if not _matches_type(value, want):
                raise _fail(where, f"expected {_WANT.get(want, want.__name__)}, got {value!r}")
            return Param(name, where, value=value)
        return self.float_param(name, where, value, convention, arch)

    def float_param(self, name: str, where: str, value: Any, convention: str,
                    arch: str | None) -> Param:
        overrides: tuple[tuple[str, float], ...] = ()
        if isinstance(value, dict) and ("value" in value or "overrides" in value):
            self.mapping(value, where, ("value", "overrides"))
            if "value" not in value:
                raise _fail(where, "missing field 'value' (the weight for keys no override matches)")
            overrides = self.overrides(value.get("overrides", []), f"{where}.overrides")
            value = value["value"]
        if _is_number(value):
            if not math.isfinite(value):
                raise _fail(where, f"{value!r} is not a finite number")
            return Param(name, where, value=float(value), overrides=overrides)
        if isinstance(value, (list, str, dict)):
            if isinstance(value, list) and len(value) > MAX_LIST:
                raise _fail(where, f"an MBW vector of {len(value)} values; at most {MAX_LIST}")
            self.check_blocks(value, where, convention, arch)
            return Param(name, where, blocks=tuple(value) if isinstance(value, list) else value, overrides=overrides)
        raise _fail(where, f"expected a number, an MBW vector or {{value, overrides}}, got {_type_name(value)}")

    def check_blocks(self, value: Any, where: str, convention: str, arch: str | None) -> None:
        """Parse the vector now (for the declared arch, else for any arch) so errors come before planning."""
        errors = []
        for candidate in (arch,) if arch else ARCHS:
            try:
                parse_mbw(value, candidate, convention, where=where)
                return
            except MergekitError as exc:
                errors.append(exc)
        raise RecipeError(str(errors[0])) from None

    def overrides(self, value: Any, where: str) -> tuple[tuple[str, float], ...]:
        if not isinstance(value, list):
            raise _fail(where, f"expected a list of {{match: REGEX, value: NUMBER}}, got {_type_name(value)}")
        if len(value) > MAX_RULES:
            raise _fail(where, f"{len(value)} overrides; the limit is {MAX_RULES}")
        rules = []
        for i, rule in enumerate(value):
            here = f"{where}[{i}]"
            self.mapping(rule, here, ("match", "value"))
            pattern, number = rule.get("match"), rule.get("value")
            _compile(pattern, f"{here}.match")
            if not _is_number(number) or not math.isfinite(number):
                raise _fail(f"{here}.value", f"expected a finite number, got {number!r}")
            rules.append((pattern, float(number)))
        return tuple(rules)

    # output ------------------------------------------------------------------------------------------------
    def output(self, value: Any, models: dict[str, ModelRef]) -> OutputSpec:
        fields = self.mapping(value if value is not None else {}, self.where("output"), _OUTPUT_FIELDS)

        def at(field_name: str) -> str:
            return self.where("output", field_name)

        path = self.text(fields.get("path"), "output.path")
        if path is not None and ".." in Path(path).parts:  # a shared recipe must not write outside the folder
            raise _fail(at("path"), f"{path!r} climbs out of the folder with '..'; give the output with --out")
        dtype = OUTPUT_DTYPES[self.choice(fields.get("dtype", "fp16"), at("dtype"), OUTPUT_DTYPES)]
        fp8_scaled = self.flag(fields, "fp8_scaled")
        if fp8_scaled and not dtype.startswith("F8"):
            raise _fail(at("fp8_scaled"), "applies only to fp8 output dtypes (fp8_e4m3fn, fp8_e5m2)")
        vae = fields.get("vae")
        if vae is not None and vae not in models:
            raise _fail(at("vae"), f"{vae!r} is not a model alias{_suggest(str(vae), models)} "
                                   f"(models: {', '.join(models)})")
        drop = fields.get("drop", [])
        if isinstance(drop, str):
            drop = [drop]
        if not isinstance(drop, list) or len(drop) > MAX_RULES:
            raise _fail(at("drop"), f"expected a list of at most {MAX_RULES} regular expressions")
        for i, pattern in enumerate(drop):
            _compile(pattern, f"{at('drop')}[{i}]")
        seed = fields.get("seed", 0)
        if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**64:
            raise _fail(at("seed"), f"expected a whole number from 0 to 2**64-1, got {seed!r}")
        return OutputSpec(
            path=path,
            dtype=dtype,
            fp8_scaled=fp8_scaled,
            vae=vae,
            prune_ema=self.flag(fields, "prune_ema"),
            drop=tuple(drop),
            missing_keys=self.choice(fields.get("missing_keys", "error"), at("missing_keys"), MISSING_POLICIES),
            compute_dtype=COMPUTE_DTYPES[self.choice(fields.get("compute_dtype", "fp32"), at("compute_dtype"),
                                                     COMPUTE_DTYPES)],
            seed=seed,
            metadata=self.metadata(fields.get("metadata", {}), at("metadata")),
        )

    def flag(self, fields: dict[str, Any], name: str) -> bool:
        value = fields.get(name, False)
        if not isinstance(value, bool):
            raise _fail(self.where("output", name), f"expected true or false, got {value!r}")
        return value

    def metadata(self, value: Any, where: str) -> tuple[tuple[str, str], ...]:
        if not isinstance(value, dict):
            raise _fail(where, f"expected a mapping of names to strings, got {_type_name(value)}")
        if len(value) > MAX_METADATA:
            raise _fail(where, f"{len(value)} entries; the limit is {MAX_METADATA}")
        out = []
        for key, item in value.items():
            if isinstance(item, (list, dict)) or item is None:
                raise _fail(f"{where}.{key}", f"expected a string, got {_type_name(item)}")
            text = item if isinstance(item, str) else str(item).lower() if isinstance(item, bool) else str(item)
            if len(text) > MAX_METADATA_VALUE:
                raise _fail(f"{where}.{key}", f"value is longer than {MAX_METADATA_VALUE} characters")
            out.append((str(key), text))
        return tuple(out)


_WANT = {int: "a whole number", bool: "true or false", str: "a string"}


def _matches_type(value: Any, want: type) -> bool:
    if want is bool:
        return isinstance(value, bool)
    if want is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, want)


def _compile(pattern: Any, where: str) -> re.Pattern[str]:
    if not isinstance(pattern, str) or not pattern:
        raise _fail(where, f"expected a regular expression, got {_type_name(pattern)}")
    if len(pattern) > MAX_PATTERN:
        raise _fail(where, f"regular expression longer than {MAX_PATTERN} characters")
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise _fail(where, f"invalid regular expression {pattern!r}: {exc}") from None


def method_registry() -> Mapping[str, Any]:
    """The method registry (imported on first use: it pulls in torch, which plain recipe parsing avoids)."""
    from mergekit_sdxl.methods.registry import METHODS

    return METHODS


def _order(deps: dict[str, list[str]], models: set[str], where: str) -> list[str]:
    """Steps in dependency order; RecipeError naming a cycle (`a -> b -> a`)."""
    order: list[str] = []
    state: dict[str, int] = {}  # 1 visiting, 2 done
    for root in deps:
        if state.get(root) == 2:
            continue
        stack: list[tuple[str, int]] = [(root, 0)]
        path: list[str] = []
        while stack:
            node, index = stack.pop()
            if index == 0:
                state[node] = 1
                path.append(node)
            children = [d for d in deps[node] if d not in models]
            if index < len(children):
                stack.append((node, index + 1))
                child = children[index]
                if state.get(child) == 1:
                    cycle = [*path[path.index(child):], child]
                    raise _fail(where, f"steps form a cycle: {' -> '.join(cycle)}")
                if state.get(child) != 2:
                    stack.append((child, 0))
                continue
            state[node] = 2
            path.pop()
            order.append(node)
    return order


def _used_names(steps: dict[str, Step], output_step: str) -> set[str]:
    used: set[str] = set()
    stack = [output_step]
    while stack:
        name = stack.pop()
        if name in used:
            continue
        used.add(name)
        if name in steps:
            stack.extend(steps[name].inputs)
    return used
