"""Property fuzzing of every parser that reads untrusted text or bytes.

Property: any input either parses or raises the module's MergekitError subclass (CheckpointError for safetensors
headers, RecipeError/UsageError for recipes, formulas and MBW vectors); never another exception, never a hang
(hypothesis deadline). The prompt parser raises only PromptError (a weight that is not a number, as A1111).

Bounded in the default suite (max_examples 200 per target); `make fuzz` runs the `fuzz_long` variant for
FUZZ_SECONDS per target (default 120). Findings are kept as explicit regression tests at the bottom.
"""

from __future__ import annotations

import importlib.util
import json
import os
import struct
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).parent))
from broken_corpus import record  # noqa: E402

from mergekit_sdxl.arch.mbw import PRESETS, parse_mbw  # noqa: E402
from mergekit_sdxl.errors import CheckpointError, MergekitError, RecipeError  # noqa: E402
from mergekit_sdxl.io.reader import parse_header  # noqa: E402
from mergekit_sdxl.recipe.formula import parse_formula  # noqa: E402
from mergekit_sdxl.recipe.load import load_yaml  # noqa: E402
from mergekit_sdxl.recipe.parser import parse_recipe  # noqa: E402

HAS_PROMPT = importlib.util.find_spec("mergekit_sdxl.sampler.prompt") is not None
CI = settings(max_examples=200, deadline=5000, suppress_health_check=list(HealthCheck), derandomize=True,
             database=None)
COUNTS: dict[str, int] = {}

# ------------------------------------------------------------------------------------------------ strategies

DTYPE_CODES = ["F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2", "I64", "I32", "U8", "BOOL", "C64", "F17", "",
               "f16"]
json_scalar = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                        st.text(max_size=8))
entry = st.fixed_dictionaries({}, optional={
    "dtype": st.one_of(st.sampled_from(DTYPE_CODES), json_scalar),
    "shape": st.one_of(st.lists(st.integers(-3, 2**40), max_size=4), json_scalar),
    "data_offsets": st.one_of(st.lists(st.integers(-5, 200), min_size=0, max_size=3), json_scalar),
})
header_obj = st.dictionaries(st.one_of(st.just("__metadata__"), st.text(max_size=6)),
                             st.one_of(entry, json_scalar, st.dictionaries(st.text(max_size=4), json_scalar)),
                             max_size=5)
header_bytes = st.one_of(
    st.binary(max_size=300),
    header_obj.map(lambda h: json.dumps(h, allow_nan=True).encode()),
    header_obj.map(lambda h: json.dumps(h).encode()[: len(json.dumps(h)) // 2]),
)
data_len = st.integers(0, 200)

NAMES = ["a", "b", "c", "d", "delta"]
formula_text = st.one_of(
    st.text(max_size=60),
    st.lists(st.sampled_from([*NAMES, "+", "-", "*", "(", ")", "0.5", "1", "2", "1e308", "1e309", " ", ".5", "e",
                              "__import__", "'", "x"]), max_size=40).map("".join),
)

mbw_item = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-10, 10), st.text(max_size=5),
                     st.none(), st.booleans())
block_names = st.sampled_from(["BASE", "IN00", "IN08", "IN11", "M00", "MID", "OUT00", "OUT02", "OUT11", "VAE",
                               "default", "IN04..IN06", "OUT00..OUT02", "IN99", "X"])
mbw_value = st.one_of(
    st.lists(mbw_item, max_size=30),
    st.lists(st.floats(0, 1), min_size=19, max_size=27),
    st.text(max_size=80),
    st.sampled_from(list(PRESETS) + ["grad_v", "NOPE"]),
    st.dictionaries(block_names, mbw_item, max_size=6),
    mbw_item,
)

yaml_text = st.one_of(
    st.text(max_size=200),
    st.lists(st.sampled_from(["models:", "steps:", "output:", "  a: x.safetensors", "  b: y.safetensors",
                              "  output: a + 0.5 * (b - a)", "  s: {method: weighted_sum, a: a, b: b, alpha: 0.5}",
                              "  s: {method: ties, models: [a, b]}", "  path: ../o.safetensors", "&x [1]", "*x",
                              "!!python/object:os.system", "  alpha: [0, 1, 2]", "arch: sdxl", "convention: x",
                              "- 1", "  dtype: fp8", "version: 2", "  - [", "]", "{", "}", ":", "'", "\t"]),
             max_size=14).map("\n".join),
)
recipe_value = st.recursive(json_scalar, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(
        ["models", "steps", "output", "a", "b", "method", "alpha", "path", "formula", "models", "value",
         "overrides", "match", "dtype", "weighted_sum", "ties", "slerp", "convention"]), inner, max_size=4)),
    max_leaves=20)
structured_recipe = st.fixed_dictionaries({
    "models": st.one_of(st.just({"a": "a.safetensors", "b": "b.safetensors"}), recipe_value),
    "steps": st.one_of(
        st.dictionaries(st.sampled_from(["s1", "s2", "output"]), st.one_of(formula_text, recipe_value), max_size=3),
        st.fixed_dictionaries({"output": st.fixed_dictionaries(
            {"method": st.sampled_from(["weighted_sum", "add_difference", "slerp", "ties", "dare", "nope"]),
             "a": st.sampled_from(["a", "b", "output", "zz"]), "b": st.sampled_from(["a", "b"])},
            optional={"alpha": mbw_value, "c": st.sampled_from(["a", "b"]), "models": recipe_value})}),
    ),
}, optional={"output": recipe_value, "arch": st.sampled_from(["sdxl", "sd15", "sd3", 1]),
             "convention": st.sampled_from(["supermerger", "sd-mecha", "x"])})

prompt_text = st.one_of(
    st.text(max_size=120),
    st.lists(st.sampled_from(["(", ")", "[", "]", ":", "1.2", ":1.2)", "\\", "\\(", "BREAK", " ", ",", "word",
                              ":-1)", ":1.2.3)", ":.)", "AND"]), max_size=40).map("".join),
)

# ------------------------------------------------------------------------------------------------ properties


def _count(target: str) -> None:
    COUNTS[target] = COUNTS.get(target, 0) + 1


def check_header(raw: bytes, n: int) -> None:
    _count("safetensors-header")
    try:
        infos, metadata = parse_header(raw, n, "fuzz.safetensors")
    except CheckpointError as exc:
        assert "fuzz.safetensors" in str(exc)
        return
    assert all(0 <= i.start <= i.end <= n for i in infos.values())
    assert sum(i.nbytes for i in infos.values()) == n
    assert all(isinstance(v, str) for v in metadata.values())


def check_recipe_text(text: str) -> None:
    _count("recipe")
    try:
        data = load_yaml(text, "fuzz.yaml")
        parse_recipe(data, source="fuzz.yaml")
    except MergekitError as exc:
        assert isinstance(exc, (RecipeError,)) or exc.exit_code in (2, 3), repr(exc)


def check_recipe_data(data: object) -> None:
    _count("recipe")
    try:
        parse_recipe(data, source="fuzz.yaml")
    except MergekitError as exc:
        assert exc.exit_code in (2, 3), repr(exc)


def check_formula(text: str) -> None:
    _count("formula")
    kinds = {"a": "weight", "b": "weight", "c": "weight", "d": "weight", "delta": "delta"}
    try:
        formula = parse_formula(text, kinds)  # type: ignore[arg-type]
    except RecipeError:
        return
    assert formula.kind in ("weight", "delta") and formula.coeffs


def check_mbw(value: object, arch: str, convention: str) -> None:
    _count("mbw")
    try:
        weights = parse_mbw(value, arch, convention, where="fuzz")
    except RecipeError:
        return
    assert weights and all(isinstance(w, float) and w == w and abs(w) != float("inf") for w in weights.values())


def check_prompt(text: str) -> None:
    _count("prompt")
    from mergekit_sdxl.errors import PromptError
    from mergekit_sdxl.sampler.prompt import parse_prompt_attention

    try:
        pieces = parse_prompt_attention(text)
    except PromptError as exc:  # a weight that is not a number, as A1111 rejects it: one line naming the spot
        assert "at character" in str(exc) and "\n" not in str(exc).replace(repr(text), "")
        return
    assert pieces and all(isinstance(p, str) and isinstance(w, float) for p, w in pieces)


TARGETS: dict[str, tuple[Callable[..., None], tuple]] = {
    "safetensors-header": (check_header, (header_bytes, data_len)),
    "recipe": (check_recipe_text, (yaml_text,)),
    "recipe-structured": (check_recipe_data, (structured_recipe,)),
    "formula": (check_formula, (formula_text,)),
    "mbw": (check_mbw, (mbw_value, st.sampled_from(["sdxl", "sd15"]),
                        st.sampled_from(["supermerger", "supermerger-2023", "sd-mecha"]))),
    "prompt": (check_prompt, (prompt_text,)),
}


def fresh(fn: Callable[..., None]) -> Callable[..., None]:
    """A new function object with fn's code: hypothesis marks what it decorates, and a target runs many times."""
    return types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


def _skip_missing(target: str) -> None:
    if target == "prompt" and not HAS_PROMPT:
        pytest.skip("mergekit_sdxl.sampler.prompt (parse_prompt_attention) is not present")


@pytest.mark.parametrize("target", list(TARGETS))
def test_fuzz_bounded(target):
    _skip_missing(target)
    fn, strategies = TARGETS[target]
    start = COUNTS.get(fn.__name__, 0)
    counted = target if target != "recipe-structured" else "recipe"
    before = COUNTS.get(counted, 0)
    given(*strategies)(CI(fresh(fn)))()
    record("fuzz", target, True, target=target, examples=COUNTS.get(counted, 0) - before)
    del start


@pytest.mark.fuzz_long
@pytest.mark.parametrize("target", list(TARGETS))
def test_fuzz_long(target):
    _skip_missing(target)
    fn, strategies = TARGETS[target]
    seconds = float(os.environ.get("FUZZ_SECONDS", "120"))
    counted = target if target != "recipe-structured" else "recipe"
    before = COUNTS.get(counted, 0)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        long = settings(max_examples=2000, deadline=5000, suppress_health_check=list(HealthCheck), database=None)
        given(*strategies)(long(fresh(fn)))()
    record("fuzz", f"{target} (long)", True, target=f"{target} (long)", examples=COUNTS.get(counted, 0) - before)


# ------------------------------------------------------------------------------------------------ regressions


def test_header_huge_shape_is_refused_without_allocating():
    raw = json.dumps({"w": {"dtype": "F32", "shape": [10**12], "data_offsets": [0, 8]}}).encode()
    with pytest.raises(CheckpointError, match="needs 4000000000000"):
        parse_header(raw, 8, "x")


def test_header_nan_and_big_ints_are_refused():
    for raw in (b'{"w": {"dtype": "F32", "shape": [NaN], "data_offsets": [0, 4]}}',
                b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 1e400]}}',
                struct.pack("<Q", 5)[:0] + b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, '
                + str(2**80).encode() + b"]}}"):
        with pytest.raises(CheckpointError):
            parse_header(raw, 4, "x")


def test_formula_overflowing_number_is_refused():
    with pytest.raises(RecipeError, match="finite"):
        parse_formula("a + 1e309 * (b - a)", {"a": "weight", "b": "weight"})


def test_recipe_with_control_character_is_a_recipe_error():
    # found by fuzzing: yaml's Reader raised ReaderError from the loader's constructor (exit 1, "internal error")
    with pytest.raises(RecipeError, match="invalid YAML"):
        load_yaml("\x1f", "fuzz.yaml")


def test_mbw_nan_values_are_refused():
    with pytest.raises(RecipeError):
        parse_mbw([float("nan")] * 20, "sdxl")
