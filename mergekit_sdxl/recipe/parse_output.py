"""The recipe's `output:` section: path, dtypes, fp8 scaling, VAE, pruning, dropped keys, seed, metadata."""

from __future__ import annotations

import os
from pathlib import Path, PureWindowsPath
from typing import Any

from mergekit_sdxl.arch.scaled_fp8 import SCALED_DTYPE
from mergekit_sdxl.dtypes import CHECKPOINT, COMPUTE, choices, name_of, parse_dtype
from mergekit_sdxl.errors import RecipeError, UsageError
from mergekit_sdxl.platform.names import output_name_problem
from mergekit_sdxl.platform.text import to_os
from mergekit_sdxl.recipe.fields import (
    MAX_RULES,
    Fields,
    compile_pattern,
    fail,
    suggest,
    type_name,
)
from mergekit_sdxl.recipe.types import MISSING_POLICIES, ModelRef, OutputSpec

MAX_METADATA = 256
SCALED_NAME = name_of(SCALED_DTYPE)
MAX_METADATA_VALUE = 65_536
_OUTPUT_FIELDS = ("path", "dtype", "fp8_scaled", "vae", "prune_ema", "drop", "missing_keys", "compute_dtype",
                  "seed", "metadata")


def parse_output(p: Fields, value: Any, models: dict[str, ModelRef]) -> OutputSpec:
    """The `output:` mapping (all fields optional) as an OutputSpec."""
    fields = p.mapping(value if value is not None else {}, p.where("output"), _OUTPUT_FIELDS)

    def at(field_name: str) -> str:
        return p.where("output", field_name)

    path = p.text(fields.get("path"), "output.path")
    # a shared recipe must not write outside the folder (either separator: it may be run on Windows)
    if path is not None and ".." in PureWindowsPath(path).parts:
        raise fail(at("path"), f"{path!r} climbs out of the folder with '..'; give the output with --out")
    problem = output_name_problem(path) if path is not None else None
    if problem is not None:
        raise fail(at("path"), f"{problem}; choose another name (refused on every OS: Windows could not write it)")
    dtype = parse_dtype(p.choice(fields.get("dtype", "fp16"), at("dtype"), choices(CHECKPOINT)))
    fp8_scaled = _flag(p, fields, "fp8_scaled")
    if fp8_scaled and dtype != SCALED_DTYPE:
        raise fail(at("fp8_scaled"), f"applies only to {SCALED_NAME} (ComfyUI reads every scaled weight as e4m3fn)")
    vae = fields.get("vae")
    if vae is not None and vae not in models:
        raise fail(at("vae"), f"{vae!r} is not a model alias{suggest(str(vae), models)} "
                              f"(models: {', '.join(models)})")
    drop = fields.get("drop", [])
    if isinstance(drop, str):
        drop = [drop]
    if not isinstance(drop, list) or len(drop) > MAX_RULES:
        raise fail(at("drop"), f"expected a list of at most {MAX_RULES} regular expressions")
    for i, pattern in enumerate(drop):
        compile_pattern(pattern, f"{at('drop')}[{i}]")
    seed = fields.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**64:
        raise fail(at("seed"), f"expected a whole number from 0 to 2**64-1, got {seed!r}")
    return OutputSpec(
        path=to_os(path) if path is not None else None,
        dtype=dtype,
        fp8_scaled=fp8_scaled,
        vae=vae,
        prune_ema=_flag(p, fields, "prune_ema"),
        drop=tuple(drop),
        missing_keys=p.choice(fields.get("missing_keys", "error"), at("missing_keys"), MISSING_POLICIES),
        compute_dtype=parse_dtype(p.choice(fields.get("compute_dtype", "fp32"), at("compute_dtype"),
                                           choices(COMPUTE))),
        seed=seed,
        metadata=_metadata(fields.get("metadata", {}), at("metadata")),
        base_dir=str(p.base_dir),
    )


def output_target(output: OutputSpec, source: str) -> Path:
    """Where the recipe's `output.path` writes: relative to the recipe's folder (like its model paths), and only
    inside that folder (a shared recipe must not write elsewhere: absolute paths and symlinks leading out are
    refused; the command line's --out is the user's own choice and bypasses this).

    Raises:
        UsageError: no path. RecipeError: an absolute one, or one whose folder resolves outside the recipe's folder.
    """
    where = f"{source}: output.path"
    if not output.path:
        raise UsageError(f"{source}: no output path: give --out or set output.path in the recipe")
    text = output.path
    if Path(text).is_absolute() or PureWindowsPath(text).drive or text.startswith(("/", "\\", "~")):
        raise RecipeError(f"{where}: {text!r} is absolute; a recipe may only write inside its own folder "
                          "(give the output with -o/--out)")
    base = Path(output.base_dir)
    target = base / text
    real_base = os.path.realpath(base)
    real_parent = os.path.realpath(target.parent)
    if real_parent != real_base and not real_parent.startswith(real_base.rstrip(os.sep) + os.sep):
        raise RecipeError(f"{where}: {text!r} leads out of the recipe's folder through a symbolic link "
                          f"(to {real_parent}); give the output with -o/--out")
    return target

def _flag(p: Fields, fields: dict[str, Any], name: str) -> bool:
    value = fields.get(name, False)
    if not isinstance(value, bool):
        raise fail(p.where("output", name), f"expected true or false, got {value!r}")
    return value

def _metadata(value: Any, where: str) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, dict):
        raise fail(where, f"expected a mapping of names to strings, got {type_name(value)}")
    if len(value) > MAX_METADATA:
        raise fail(where, f"{len(value)} entries; the limit is {MAX_METADATA}")
    out = []
    for key, item in value.items():
        if isinstance(item, (list, dict)) or item is None:
            raise fail(f"{where}.{key}", f"expected a string, got {type_name(item)}")
        text = item if isinstance(item, str) else str(item).lower() if isinstance(item, bool) else str(item)
        if len(text) > MAX_METADATA_VALUE:
            raise fail(f"{where}.{key}", f"value is longer than {MAX_METADATA_VALUE} characters")
        out.append((str(key), text))
    return tuple(out)
