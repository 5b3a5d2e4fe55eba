"""Recipe files: YAML -> a validated `Recipe` (models, a DAG of steps, output options). No tensor is read here.

A recipe::

    arch: sdxl                       # optional; checked against the inputs
    convention: supermerger-2023     # MBW block convention for every step (default: supermerger)
    models:
      beta7: models/kxl-beta7.safetensors          # path, relative to the recipe file
      anxl3: {path: models/anxl3.safetensors, sha256: 0123...}  # optional pinned hash (the engine checks it)
      anxl2: {autov2: 86bea8223d}                  # by hash: found through the model index (cli/api resolve it)
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

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mergekit_sdxl.arch.blocks import CONVENTIONS, DEFAULT_CONVENTION
from mergekit_sdxl.arch.lbw import check_adapter_blocks
from mergekit_sdxl.arch.mbw import parse_mbw
from mergekit_sdxl.arch.tables import ARCHS
from mergekit_sdxl.errors import MergekitError, RecipeError
from mergekit_sdxl.methods.registry import METHODS
from mergekit_sdxl.methods.spec import MethodSpec, ParamSpec
from mergekit_sdxl.platform.text import to_os
from mergekit_sdxl.recipe.fields import (
    MAX_LIST,
    MAX_RULES,
    WANT,
    Fields,
    compile_pattern,
    fail,
    is_number,
    matches_type,
    suggest,
    type_name,
)
from mergekit_sdxl.recipe.formula import Kind, parse_formula, tokenize
from mergekit_sdxl.recipe.parse_output import parse_output
from mergekit_sdxl.recipe.types import (
    SEED_PARAM,
    AdapterRef,
    FormulaStep,
    LoraStep,
    MethodStep,
    ModelRef,
    Param,
    Recipe,
    Step,
)

MAX_MODELS = 64
MAX_STEPS = 256
_TOP_FIELDS = ("version", "name", "description", "arch", "convention", "models", "steps", "output")
_MODEL_FIELDS = ("path", "sha256", "autov2", "autov3")
_LORA_FIELDS = ("lora", "model", "strength", "te_strength", "blocks", "convention")
_ADAPTER_FIELDS = ("path", "strength", "te_strength", "blocks")
_SHA256 = re.compile(r"^[0-9a-fA-F]{64}$")
_HEX_PREFIX = re.compile(r"^[0-9a-fA-F]{8,64}$")  # AutoV2 / AutoV3 (at least 8 hex digits)


def parse_recipe(data: Any, *, source: str = "<recipe>", base_dir: str | Path = ".",
                 model_paths: Mapping[str, str] | None = None) -> Recipe:
    """Validate recipe data (as loaded from YAML) into a Recipe; see `load.load_recipe`."""
    return _Parser(source, Path(base_dir)).recipe(data, dict(model_paths or {}))


class _Parser(Fields):
    def recipe(self, data: Any, model_paths: dict[str, str]) -> Recipe:
        if data is None:
            raise fail(self.source, "recipe is empty")
        top = self.mapping(data, self.source, _TOP_FIELDS)
        for required in ("models", "steps"):
            if required not in top:
                raise fail(self.source, f"missing field {required!r}")
        version = top.get("version", 1)
        if version != 1:
            raise fail(self.where("version"), f"unsupported recipe version {version!r}; this tool reads version 1")
        arch = self.choice(top.get("arch"), self.where("arch"), ARCHS, optional=True)
        convention = self.choice(top.get("convention", DEFAULT_CONVENTION), self.where("convention"), CONVENTIONS)
        models = self.models(top["models"], model_paths)
        steps = self.steps(top["steps"], models, convention, arch)
        output_step = "output" if "output" in steps else next(reversed(top["steps"]))
        if steps[output_step].kind == "delta":
            raise fail(self.where("steps", output_step), "the output step is a delta (a difference of models), "
                                                         "not a model; add it to one, e.g. `base + "
                                                          f"{output_step}` in a last step")
        output = parse_output(self, top.get("output", {}), models)
        used = _used_names(steps, output_step)
        if output.vae:
            used.add(output.vae)
        unused = tuple(name for name in (*models, *steps) if name not in used)
        name, description = self.text(top.get("name"), "name"), self.text(top.get("description"), "description")
        return Recipe(self.source, models, steps, output_step, output, convention, arch, name, description, unused)

    # models ------------------------------------------------------------------------------------------------

    def models(self, value: Any, model_paths: dict[str, str]) -> dict[str, ModelRef]:
        where = self.where("models")
        if not isinstance(value, dict) or not value:
            raise fail(where, f"expected a mapping alias -> path, got {type_name(value)}")
        if len(value) > MAX_MODELS:
            raise fail(where, f"{len(value)} models; the limit is {MAX_MODELS}")
        models = {self.name(alias, where): self.model(alias, entry, model_paths.get(alias))
                  for alias, entry in value.items()}
        unknown = [alias for alias in model_paths if alias not in models]
        if unknown:
            raise fail(self.source, f"-m {unknown[0]}: the recipe has no model {unknown[0]!r}"
                                    f"{suggest(unknown[0], models)} (models: {', '.join(models)})")
        return models

    def model(self, alias: str, entry: Any, override: str | None) -> ModelRef:
        """A path, or `{path, sha256, autov2, autov3}`: a model named by hash needs no path (it is found in the
        model index before planning); with both, the path is used when the file exists."""
        where = self.where("models", alias)
        if isinstance(entry, str) or entry is None:
            entry = {"path": entry}
        fields = self.mapping(entry, where, _MODEL_FIELDS)
        path = fields.get("path")
        if path is not None and (not isinstance(path, str) or not path.strip()):
            raise fail(self.where("models", alias, "path"), f"expected a file path, got {type_name(path)}")
        sha = self.hash_field(alias, "sha256", fields.get("sha256"), _SHA256, "a sha256 (64 hex digits, as "
                                                                              "`sha256sum` prints)")
        autov2 = self.hash_field(alias, "autov2", fields.get("autov2"), _HEX_PREFIX, "an AutoV2 hash (10 hex "
                                                                                    "digits; at least 8)")
        autov3 = self.hash_field(alias, "autov3", fields.get("autov3"), _HEX_PREFIX, "an AutoV3 hash (12 hex "
                                                                                    "digits; at least 8)")
        if override is not None:
            resolved: str | None = str(Path(override).expanduser())
        elif path is None:
            if not (sha or autov2 or autov3):
                raise fail(where, f"no path; give one in the recipe or on the command line with -m {alias}=PATH, "
                                  "or name the model by hash ({sha256: ...}, {autov2: ...} or {autov3: ...})")
            resolved = None
        else:
            given = Path(to_os(path)).expanduser()
            resolved = str(given if given.is_absolute() else self.base_dir / given)
        return ModelRef(alias, resolved, sha, autov2, autov3)

    def hash_field(self, alias: str, name: str, value: Any, pattern: re.Pattern[str], what: str) -> str | None:
        """A hash given in a model entry, lower-cased; YAML may have read an unquoted one as a number."""
        if value is None:
            return None
        where = self.where("models", alias, name)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            raise fail(where, f"YAML read {value!r} as a number: quote the hash ({name}: '...')")
        if not isinstance(value, str) or not pattern.match(value.strip()):
            raise fail(where, f"{value!r} is not {what}")
        return value.strip().lower()

    # steps -------------------------------------------------------------------------------------------------

    def steps(self, value: Any, models: dict[str, ModelRef], convention: str,
              arch: str | None) -> dict[str, Step]:
        where = self.where("steps")
        if not isinstance(value, dict) or not value:
            raise fail(where, f"expected a mapping step name -> formula or method call, got {type_name(value)}")
        if len(value) > MAX_STEPS:
            raise fail(where, f"{len(value)} steps; the limit is {MAX_STEPS}")
        for name in value:
            self.name(name, where)
            if name in models:
                raise fail(self.where("steps", name), f"the name {name!r} is both a model and a step; rename one")
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
            raise fail(self.where("steps", name), f"expected a formula string or a mapping, got {type_name(entry)}")
        refs: list[tuple[str, Any]] = []
        if "formula" in entry:
            formula = entry["formula"]
            if not isinstance(formula, str):
                raise fail(self.where("steps", name, "formula"), f"expected a string, got {type_name(formula)}")
            try:
                refs = [("formula", t.text) for t in tokenize(formula) if t.kind == "name"]
            except RecipeError as exc:
                raise fail(self.where("steps", name, "formula"), str(exc)) from exc
        elif "lora" in entry:
            refs = [("model", entry.get("model"))]
            if entry.get("model") is None:
                raise fail(self.where("steps", name), "a LoRA step needs `model`: the model or step to apply it to")
        elif "method" in entry:
            spec = self.method_spec(name, entry["method"])
            for field_name in (*spec.inputs, *(["models"] if spec.variadic else [])):
                ref = entry.get(field_name)
                refs += [(field_name, r) for r in ref] if isinstance(ref, list) else [(field_name, ref)]
        else:
            raise fail(self.where("steps", name), "expected a `formula`, `method` or `lora` field")
        for field_name, ref in refs:
            if ref == name:
                raise fail(self.where("steps", name, field_name), f"step {name!r} refers to itself")
            if isinstance(ref, str) and ref not in models and ref not in steps:
                raise fail(self.where("steps", name, field_name),
                           f"unknown model or step {ref!r}{suggest(ref, [*models, *steps])} "
                            f"(models: {', '.join(models)}; steps: {', '.join(steps)})")
        return [ref for _, ref in refs if isinstance(ref, str)]

    def method_spec(self, step: str, method: Any) -> MethodSpec:
        if not isinstance(method, str) or method not in METHODS:
            raise fail(self.where("steps", step, "method"), f"unknown method {method!r}"
                       f"{suggest(str(method), METHODS)} (known: {', '.join(sorted(METHODS))})")
        return METHODS[method]

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
                raise fail(self.where("steps", name, "formula"), str(exc)) from exc
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
            raise fail(self.where("steps", name, "lora"), f"expected 1 to {MAX_LIST} adapter files")
        defaults: dict[str, Any] = {k: fields[k] for k in ("strength", "te_strength", "blocks") if k in fields}
        adapters = tuple(self.adapter(name, i, item, defaults, convention) for i, item in enumerate(items))
        return LoraStep(name, model, adapters, convention)

    def adapter(self, step: str, index: int, item: Any, defaults: dict[str, Any], convention: str) -> AdapterRef:
        where = self.where("steps", step, f"lora[{index}]")
        entry = {"path": item} if isinstance(item, str) else self.mapping(item, where, _ADAPTER_FIELDS)
        merged = {**defaults, **entry}
        path = merged.get("path")
        if not isinstance(path, str) or not path.strip():
            raise fail(where, f"expected an adapter file path, got {type_name(path)}")
        for key in ("strength", "te_strength"):
            value = merged.get(key)
            if value is not None and (not is_number(value) or not math.isfinite(value)):
                raise fail(f"{where}.{key}", f"expected a finite number, got {value!r}")
        if merged.get("blocks") is not None:
            check_adapter_blocks(merged["blocks"], convention, where=f"{where}.blocks")
        given = Path(to_os(path)).expanduser()
        resolved = str(given if given.is_absolute() else self.base_dir / given)
        te = merged.get("te_strength")
        return AdapterRef(resolved, float(merged.get("strength", 1.0)), None if te is None else float(te),
                          merged.get("blocks"))

    def method_step(self, name: str, entry: dict[str, Any], kinds: dict[str, Kind], convention: str,
                    arch: str | None) -> MethodStep:
        spec = self.method_spec(name, entry["method"])
        variadic = ("models",) if spec.variadic else ()
        fields = self.mapping(entry, self.where("steps", name),
                              ("method", "convention", *spec.inputs, *variadic, *spec.param_names))
        convention = self.choice(fields.get("convention", convention), self.where("steps", name, "convention"),
                                 CONVENTIONS)
        inputs = [self.input_name(name, field_name, fields.get(field_name), kinds) for field_name in spec.inputs]
        if spec.variadic:
            inputs += self.variadic_inputs(name, fields.get("models"), getattr(spec, "min_variadic", 1), kinds)
        params = tuple(self.param(name, param, fields, spec, convention, arch) for param in spec.params
                       if param.name in fields or (param.required and param.name != SEED_PARAM))
        return MethodStep(name, spec.name, tuple(inputs), params, convention)

    def input_name(self, step: str, field_name: str, value: Any, kinds: dict[str, Kind]) -> str:
        where = self.where("steps", step, field_name)
        if value is None:
            raise fail(self.where("steps", step), f"missing input {field_name!r} (a model or step name)")
        if not isinstance(value, str):
            raise fail(where, f"expected a model or step name, got {type_name(value)}")
        if kinds[value] == "delta":
            raise fail(where, f"{value!r} is a delta step (a difference of models); methods take models. "
                              f"Use it in a formula instead, e.g. `model + {value}`")
        return value

    def variadic_inputs(self, step: str, value: Any, least: int, kinds: dict[str, Kind]) -> list[str]:
        where = self.where("steps", step, "models")
        if not isinstance(value, list) or not value:
            raise fail(where if value is not None else self.where("steps", step),
                       f"expected a list of at least {least} model or step names in `models`")
        if len(value) < least or len(value) > MAX_LIST:
            raise fail(where, f"{len(value)} models; this method takes {least} to {MAX_LIST}")
        return [self.input_name(step, f"models[{i}]", item, kinds) for i, item in enumerate(value)]

    def param(self, step: str, spec_param: ParamSpec, fields: dict[str, Any], spec: MethodSpec, convention: str,
              arch: str | None) -> Param:
        name = spec_param.name
        where = self.where("steps", step, name)
        if name not in fields:
            raise fail(self.where("steps", step), f"method {spec.name!r} needs parameter {name!r}")
        value = fields[name]
        want = spec_param.type
        if want is not float:
            if not matches_type(value, want):
                raise fail(where, f"expected {WANT.get(want, want.__name__)}, got {value!r}")
            return Param(name, where, value=value)
        param = self.float_param(name, where, value, convention, arch)
        for number in (param.value, *(v for _, v in param.overrides)):
            check_range(spec_param, number, where)
        return param

    def float_param(self, name: str, where: str, value: Any, convention: str,
                    arch: str | None) -> Param:
        overrides: tuple[tuple[str, float], ...] = ()
        if isinstance(value, dict) and ("value" in value or "overrides" in value):
            self.mapping(value, where, ("value", "overrides"))
            if "value" not in value:
                raise fail(where, "missing field 'value' (the weight for keys no override matches)")
            overrides = self.overrides(value.get("overrides", []), f"{where}.overrides")
            value = value["value"]
        if is_number(value):
            if not math.isfinite(value):
                raise fail(where, f"{value!r} is not a finite number")
            return Param(name, where, value=float(value), overrides=overrides)
        if isinstance(value, (list, str, dict)):
            if isinstance(value, list) and len(value) > MAX_LIST:
                raise fail(where, f"an MBW vector of {len(value)} values; at most {MAX_LIST}")
            self.check_blocks(value, where, convention, arch)
            return Param(name, where, blocks=tuple(value) if isinstance(value, list) else value, overrides=overrides)
        raise fail(where, f"expected a number, an MBW vector or {{value, overrides}}, got {type_name(value)}")

    def check_blocks(self, value: Any, where: str, convention: str, arch: str | None) -> None:
        """Parse the vector now (for the declared arch, else for any arch) so errors come before planning."""
        errors = []
        for candidate in (arch,) if arch else ARCHS:
            try:
                parse_mbw(value, candidate, convention, where=where)
                return
            except MergekitError as exc:
                errors.append(exc)
        raise RecipeError(str(errors[0])) from errors[0]

    def overrides(self, value: Any, where: str) -> tuple[tuple[str, float], ...]:
        if not isinstance(value, list):
            raise fail(where, f"expected a list of {{match: REGEX, value: NUMBER}}, got {type_name(value)}")
        if len(value) > MAX_RULES:
            raise fail(where, f"{len(value)} overrides; the limit is {MAX_RULES}")
        rules = []
        for i, rule in enumerate(value):
            here = f"{where}[{i}]"
            self.mapping(rule, here, ("match", "value"))
            pattern, number = rule.get("match"), rule.get("value")
            compile_pattern(pattern, f"{here}.match")
            if not is_number(number) or not math.isfinite(number):
                raise fail(f"{here}.value", f"expected a finite number, got {number!r}")
            rules.append((pattern, float(number)))
        return tuple(rules)


def check_range(spec: ParamSpec, value: float | None, where: str) -> None:
    """RecipeError naming `where` when a number lies outside the parameter's range (None: not a number)."""
    if value is None:
        return
    if (spec.low is not None and value < spec.low) or (spec.high is not None and value > spec.high):
        raise fail(where, f"{value:g} is outside {spec.range_text()}, the range of {spec.name!r}")


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
                    raise fail(where, f"steps form a cycle: {' -> '.join(cycle)}")
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
