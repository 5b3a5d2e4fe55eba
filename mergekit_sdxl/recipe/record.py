"""What a plan records about its recipe: the resolved recipe as JSON-able data (stored in the output's metadata)
and one human line per step (the `--dry-run` listing and the metadata summary)."""

from __future__ import annotations

import os
from typing import Any

from mergekit_sdxl.dtypes import name_of
from mergekit_sdxl.recipe.types import FormulaStep, LoraStep, Param, Recipe

# step name -> its parameters, each with its MBW block weights (None for a constant)
StepParams = dict[str, list[tuple[Param, "dict[str, float] | None"]]]


def resolved_recipe(recipe: Recipe, arch: str, aliases: list[str], params: StepParams) -> dict[str, Any]:
    """The resolved recipe as JSON-able data (file names, not paths: paths are private to the user)."""
    out = recipe.output
    steps: dict[str, Any] = {}
    for name, step in recipe.steps.items():
        if name in recipe.unused:
            continue
        if isinstance(step, FormulaStep):
            steps[name] = {"formula": step.formula.text, "kind": step.kind,
                           "coefficients": dict(step.formula.coeffs)}
        elif isinstance(step, LoraStep):
            steps[name] = {"model": step.model, "convention": step.convention, "lora": [
                {"file": os.path.basename(a.path), "strength": a.strength, "te_strength": a.te_strength,
                 "blocks": a.blocks} for a in step.adapters]}
        else:
            steps[name] = {"method": step.method, "inputs": list(step.inputs), "convention": step.convention,
                           "params": {p.name: _param_dict(p, w) for p, w in params[name]}}
    return {
        "format": "mergekit-sdxl recipe",
        "version": 1,
        "name": recipe.name,
        "arch": arch,
        "convention": recipe.convention,
        "models": {alias: {"file": os.path.basename(recipe.models[alias].path or ""),
                           "sha256": recipe.models[alias].sha256} for alias in aliases},
        "steps": steps,
        "output_step": recipe.output_step,
        "output": {"dtype": name_of(out.dtype), "fp8_scaled": out.fp8_scaled, "vae": out.vae,
                   "prune_ema": out.prune_ema, "drop": list(out.drop), "missing_keys": out.missing_keys,
                   "compute_dtype": name_of(out.compute_dtype), "seed": out.seed},
    }



def _param_dict(param: Param, weights: dict[str, float] | None) -> Any:
    base: Any = param.value if weights is None else {"blocks": weights}
    if param.overrides:
        return {"value": base, "overrides": [{"match": m, "value": v} for m, v in param.overrides]}
    return base


def describe_step(recipe: Recipe, name: str, params: StepParams) -> str:
    """One human line for step `name` (for `--dry-run` and the output's summary metadata)."""
    step = recipe.steps[name]
    mark = " (written)" if name == recipe.output_step else ""
    if isinstance(step, LoraStep):
        files = ", ".join(f"{os.path.basename(a.path)} x{a.strength:g}" for a in step.adapters)
        return f"step {name}{mark}: {step.model} + LoRA({files})"
    if isinstance(step, FormulaStep):
        terms = " ".join(f"{'-' if c < 0 else '+'} {abs(c):g}*{n}" for n, c in step.formula.coeffs)
        return f"step {name}{mark}: {step.formula.text}  =  {terms.removeprefix('+ ')}  ({step.kind})"
    text = ", ".join(f"{p.name}={_param_text(p, w)}" for p, w in params[name])
    return f"step {name}{mark}: {step.method}({', '.join(step.inputs)}{'; ' if text else ''}{text})" + (
        f" [convention {step.convention}]" if step.block_weighted else "")


def _param_text(param: Param, weights: dict[str, float] | None) -> str:
    text = f"{param.value!r}" if weights is None else "[" + ",".join(f"{w:g}" for w in weights.values()) + "]"
    return text + (f" with {len(param.overrides)} override(s)" if param.overrides else "")
