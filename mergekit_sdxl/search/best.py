"""The best trial as a recipe YAML that `merge` runs: the user's recipe with the searched parameters written in.

Only the parameters the search touched change; everything else stays as the user wrote it (comments aside:
YAML is re-emitted). Relative paths (models, LoRA files, the output) are made absolute, since the file is written
elsewhere than the original recipe.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from mergekit_sdxl.recipe.load import load_yaml
from mergekit_sdxl.recipe.types import FormulaStep, LoraStep, Param, Recipe
from mergekit_sdxl.search.space import Dimension


def best_recipe_text(recipe_path: str | Path, variant: Recipe, dims: Sequence[Dimension], header: str) -> str:
    """YAML text of `variant` in the form of the recipe at `recipe_path` (see the module docstring)."""
    source = Path(recipe_path)
    data = load_yaml(source.read_text(encoding="utf-8"), str(source))
    _absolute_paths(data, variant, source.parent)
    touched: dict[str, set[str]] = {}
    for dim in dims:
        for target in dim.targets:
            touched.setdefault(target.step, set()).add(target.param)
    for step_name, params in touched.items():
        _patch_step(data["steps"], step_name, variant.steps[step_name], params)
    body = yaml.dump(data, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=120)
    comments = "".join(f"# {line}\n" if line else "#\n" for line in header.splitlines())
    return comments + body


class _Dumper(yaml.SafeDumper):
    """Lists of numbers on one line (MBW vectors read as users write them)."""


def _represent_list(dumper: yaml.SafeDumper, data: list[Any]) -> Any:
    flow = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_Dumper.add_representer(list, _represent_list)


def _patch_step(steps: dict[str, Any], name: str, step: Any, params: set[str]) -> None:
    entry = steps[name]
    if isinstance(step, FormulaStep):
        if isinstance(entry, str):
            steps[name] = step.formula.text
        else:
            entry["formula"] = step.formula.text
        return
    if isinstance(step, LoraStep):
        first = step.adapters[0]
        for param in params:
            value = getattr(first, param)
            entry[param] = list(value) if isinstance(value, tuple) else value
            items = entry["lora"] if isinstance(entry["lora"], list) else [entry["lora"]]
            for item in items:
                if isinstance(item, dict):
                    item.pop(param, None)
        return
    for param in step.params:
        if param.name in params:
            entry[param.name] = _param_yaml(param)


def _param_yaml(param: Param) -> Any:
    base = param.value
    if param.block_weighted:
        base = list(param.blocks) if isinstance(param.blocks, tuple) else param.blocks
    if param.overrides:
        return {"value": base, "overrides": [{"match": m, "value": v} for m, v in param.overrides]}
    return base


def _absolute_paths(data: dict[str, Any], recipe: Recipe, base: Path) -> None:
    models = data.get("models") or {}
    for alias, entry in models.items():
        model_path = recipe.models[alias].path
        if model_path is None:  # named by hash only: the entry keeps locating it that way
            continue
        path = os.path.abspath(model_path)
        if isinstance(entry, dict):
            entry["path"] = path
        else:
            models[alias] = path
    for name, entry in (data.get("steps") or {}).items():
        step = recipe.steps.get(name)
        if isinstance(step, LoraStep) and isinstance(entry, dict):
            items = entry["lora"] if isinstance(entry["lora"], list) else [entry["lora"]]
            fixed = [_with_path(item, adapter.path) for item, adapter in zip(items, step.adapters)]
            entry["lora"] = fixed if isinstance(entry["lora"], list) else fixed[0]
    output = data.get("output")
    if isinstance(output, dict) and isinstance(output.get("path"), str):
        given = Path(output["path"]).expanduser()
        output["path"] = str(given if given.is_absolute() else (base / given).resolve())


def _with_path(item: Any, path: str) -> Any:
    if isinstance(item, dict):
        return {**item, "path": os.path.abspath(path)}
    return os.path.abspath(path)


def values_header(study_name: str, number: int, value: float, values: Mapping[str, Any],
                  scores: Mapping[str, float]) -> str:
    """The comment block at the top of best.yaml."""
    lines = [f"best trial {number} of study {study_name!r}: value {value:.6g}",
             "scores: " + ", ".join(f"{k} {v:.6g}" for k, v in scores.items()),
             "searched values:"]
    lines += [f"  {k} = {v}" for k, v in values.items()]
    lines.append("run it with: mergekit-sdxl merge best.yaml")
    return "\n".join(lines)
