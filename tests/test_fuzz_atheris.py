"""Coverage-guided fuzzing with atheris (libFuzzer), only under `make fuzz` (marker fuzz_long): the safetensors
header parser, the recipe loader and the formula parser, FUZZ_SECONDS per target (split), each in a child process
(atheris exits the process when done). Property as in test_fuzz_parsers: parse or raise the MergekitError subclass.
Skipped when atheris is not installed (`pip install atheris`)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from broken_corpus import record  # noqa: E402

HARNESS = r"""
import sys, atheris
with atheris.instrument_imports():
    from mergekit_sdxl.errors import CheckpointError, RecipeError, UsageError
    from mergekit_sdxl.io.reader import parse_header
    from mergekit_sdxl.recipe.formula import parse_formula
    from mergekit_sdxl.recipe.load import load_yaml
    from mergekit_sdxl.recipe.parser import parse_recipe

TARGET = sys.argv[1]
KINDS = {"a": "weight", "b": "weight", "c": "weight", "d": "delta"}

def one(data: bytes) -> None:
    if TARGET == "safetensors-header":
        try:
            parse_header(data[1:], data[0] if data else 0, "fuzz")
        except CheckpointError:
            pass
    elif TARGET == "recipe":
        try:
            parse_recipe(load_yaml(data.decode("utf-8", "replace"), "fuzz"), source="fuzz")
        except (RecipeError, UsageError):
            pass
    else:
        try:
            parse_formula(data.decode("utf-8", "replace"), KINDS)
        except RecipeError:
            pass

atheris.Setup([sys.argv[0], *sys.argv[2:]], one)
atheris.Fuzz()
"""

TARGETS = ["safetensors-header", "recipe", "formula"]


@pytest.mark.fuzz_long
@pytest.mark.parametrize("target", TARGETS)
def test_atheris(target, tmp_path):
    if importlib.util.find_spec("atheris") is None:
        pytest.skip("atheris is not installed (pip install atheris)")
    seconds = max(10, int(float(os.environ.get("FUZZ_SECONDS", "120")) / len(TARGETS)))
    done = subprocess.run([sys.executable, "-c", HARNESS, target, f"-max_total_time={seconds}", "-timeout=10",
                           "-rss_limit_mb=4096", f"-artifact_prefix={tmp_path}/"], capture_output=True, text=True,
                          timeout=seconds + 120, cwd=Path(__file__).resolve().parents[1])
    runs = [line for line in done.stderr.splitlines() if line.startswith("Done ")]
    assert done.returncode == 0, done.stderr[-3000:]
    record("fuzz", f"{target} (atheris)", True, target=f"{target} (atheris)",
           examples=int(runs[-1].split()[1]) if runs else 0)
