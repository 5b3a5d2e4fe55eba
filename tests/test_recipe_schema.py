"""Recipe loading and validation (recipe/load.py, parser.py): every error is one line naming file, step, field."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from mergekit_sdxl.errors import RecipeError, UsageError
from mergekit_sdxl.recipe.fields import MAX_LIST
from mergekit_sdxl.recipe.load import load_recipe, load_yaml, parse_model_overrides
from mergekit_sdxl.recipe.parser import parse_recipe
from mergekit_sdxl.recipe.types import FormulaStep, MethodStep

RECIPES = Path(__file__).resolve().parents[1] / "recipes"

BASE = """\
arch: sdxl
models:
  a: models/a.safetensors
  b: models/b.safetensors
  c: models/c.safetensors
steps:
"""


def write(tmp_path: Path, text: str, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def steps(tmp_path: Path, body: str, **kwargs):
    return load_recipe(write(tmp_path, BASE + textwrap.indent(textwrap.dedent(body), "  ")), **kwargs)


def error(tmp_path: Path, body: str, whole: bool = False) -> str:
    with pytest.raises(RecipeError) as info:
        if whole:
            load_recipe(write(tmp_path, body))
        else:
            steps(tmp_path, body)
    message = str(info.value)
    assert "\n" not in message, message
    assert "r.yaml" in message, message
    return message


# ---------------------------------------------------------------------------------------------- valid recipes
def test_formula_and_method_steps(tmp_path):
    recipe = steps(tmp_path, """\
        mix: "a + 0.5 * (b - c)"
        diff: b - c
        final: {method: weighted_sum, a: mix, b: b, alpha: 0.25}
    """)
    assert recipe.output_step == "final"
    assert isinstance(recipe.steps["mix"], FormulaStep) and recipe.steps["mix"].kind == "weight"
    assert recipe.steps["diff"].kind == "delta"
    final = recipe.steps["final"]
    assert isinstance(final, MethodStep) and final.inputs == ("mix", "b") and final.convention == "supermerger"
    assert final.params[0].value == 0.25 and not final.block_weighted
    assert recipe.unused == ("diff",)


def test_step_named_output_is_written_and_order_follows_dependencies(tmp_path):
    recipe = steps(tmp_path, """\
        output: "x + 0.5 * (b - c)"
        x: {method: weighted_sum, a: a, b: b, alpha: 0.5}
        later: a
    """)
    assert recipe.output_step == "output"
    assert list(recipe.steps) == ["x", "output", "later"]


def test_delta_step_is_usable_in_later_formula(tmp_path):
    recipe = steps(tmp_path, """\
        learned: b - c
        final: a + 0.8 * learned
    """)
    assert recipe.steps["final"].formula.coeffs == (("a", 1.0), ("learned", 0.8))


def test_paths_resolve_against_recipe_folder_and_cli_overrides(tmp_path):
    (tmp_path / "sub").mkdir()
    path = write(tmp_path, BASE + "  m: a\n", "sub/r.yaml")
    recipe = load_recipe(path, {"b": "/models/kxl-beta7.safetensors"})
    assert recipe.models["a"].path == str(tmp_path / "sub" / "models" / "a.safetensors")
    assert recipe.models["b"].path == "/models/kxl-beta7.safetensors"
    with pytest.raises(RecipeError, match=r"-m zz: the recipe has no model 'zz'"):
        load_recipe(path, {"zz": "/x.safetensors"})


def test_model_without_path_needs_cli_override_or_a_hash(tmp_path):
    text = "models:\n  a: {sha256: " + "AB" * 32 + "}\n  b: null\nsteps:\n  s: 0.5 * a + 0.5 * b\n"
    with pytest.raises(RecipeError, match=r"models\.b: no path; .* -m b=PATH, or name the model by hash"):
        load_recipe(write(tmp_path, text))
    recipe = load_recipe(write(tmp_path, text), {"b": "y.safetensors"})
    assert recipe.models["a"].path is None and recipe.models["a"].sha256 == "ab" * 32  # found by hash later
    recipe = load_recipe(write(tmp_path, text), {"a": "x.safetensors", "b": "y.safetensors"})
    assert recipe.models["a"].sha256 == "ab" * 32 and recipe.models["a"].path == "x.safetensors"


@pytest.mark.parametrize(("entry", "message"), [
    ("{autov2: 86BEA8223D}", None),
    ("{autov3: 3c94e8d1b2a0, autov2: '0123456789'}", None),
    ("{autov2: 1234567890}", "YAML read 1234567890 as a number: quote the hash"),
    ("{autov2: abc}", "'abc' is not an AutoV2 hash"),
    ("{autov3: xyz12345}", "'xyz12345' is not an AutoV3 hash"),
    ("{sha256: 86bea8223d}", "is not a sha256"),
    ("{md5: 86bea8223d}", "unknown field 'md5'"),
])
def test_models_by_hash(tmp_path, entry, message):
    text = f"models:\n  a: {entry}\n  b: y.safetensors\nsteps:\n  s: 0.5 * a + 0.5 * b\n"
    if message:
        with pytest.raises(RecipeError, match=message):
            load_recipe(write(tmp_path, text))
        return
    ref = load_recipe(write(tmp_path, text)).models["a"]
    assert ref.path is None and ref.hashes and all(v == v.lower() for v in ref.hashes.values())


def test_parse_model_overrides():
    assert parse_model_overrides(["beta7=/m/b7.safetensors", " a = x.safetensors"]) == {
        "beta7": "/m/b7.safetensors", "a": "x.safetensors"}
    for bad in (["beta7"], ["=x"], ["a="], ["a=x", "a=y"]):
        with pytest.raises(UsageError):
            parse_model_overrides(bad)


def test_block_weights_overrides_and_conventions(tmp_path):
    recipe = steps(tmp_path, """\
        s:
          method: weighted_sum
          a: a
          b: b
          convention: sd-mecha
          alpha:
            value: {default: 0.5, IN04: 0.3}
            overrides: [{match: 'attn2', value: 0.1}, {match: 'to_k', value: 0.2}]
    """)
    param = recipe.steps["s"].params[0]
    assert recipe.steps["s"].convention == "sd-mecha" and param.block_weighted
    assert param.overrides == (("attn2", 0.1), ("to_k", 0.2))


def test_variadic_methods_and_optional_params(tmp_path):
    recipe = steps(tmp_path, """\
        t: {method: ties, base: a, models: [b, c], density: 0.5}
        d: {method: dare, base: a, models: [b, c], seed: 7}
        out: {method: weighted_sum, a: t, b: d, alpha: 0.5}
    """)
    assert recipe.steps["t"].inputs == ("a", "b", "c")
    assert [p.name for p in recipe.steps["t"].params] == ["density"]
    assert [(p.name, p.value) for p in recipe.steps["d"].params] == [("seed", 7)]


def test_output_options(tmp_path):
    recipe = load_recipe(write(tmp_path, BASE + """\
  m: a
output:
  path: out.safetensors
  dtype: fp8_e4m3fn
  fp8_scaled: true
  vae: c
  prune_ema: true
  drop: ['^model_ema\\.', 'alphas_cumprod']
  missing_keys: take_first
  compute_dtype: fp64
  seed: 42
  metadata: {title: x, n: 3, flag: true}
"""))
    out = recipe.output
    assert (out.path, out.dtype, out.fp8_scaled) == ("out.safetensors", "F8_E4M3", True)
    assert (out.vae, out.prune_ema) == ("c", True)
    assert (out.missing_keys, out.compute_dtype, out.seed) == ("take_first", "F64", 42)
    assert out.metadata == (("title", "x"), ("n", "3"), ("flag", "true"))
    defaults = steps(tmp_path, "m: a\n").output
    assert (defaults.dtype, defaults.compute_dtype, defaults.missing_keys, defaults.seed) == ("F16", "F32", "error", 0)


# ---------------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(("body", "expected"), [
    ("s: {method: weighted_sum, a: a, b: b, alpah: 0.5}", r"steps\.s: unknown field 'alpah'; did you mean 'alpha'\?"),
    ("s: {method: weighted_sum, a: a, b: b}", r"steps\.s: method 'weighted_sum' needs parameter 'alpha'"),
    ("s: {method: weighted_sum, a: a, alpha: 0.5}", r"steps\.s: missing input 'b'"),
    ("s: {method: weighted_sum, a: a, b: zz, alpha: 0.5}", r"steps\.s\.b: unknown model or step 'zz'"),
    ("s: {method: weighted_sum, a: a, b: 3, alpha: 0.5}", r"steps\.s\.b: expected a model or step name, got a number"),
    ("s: {method: weighted_sum, a: a, b: b, alpha: true}", r"steps\.s\.alpha: expected a number, an MBW vector"),
    ("s: {method: weighted_sum, a: a, b: b, alpha: .nan}", r"steps\.s\.alpha: nan is not a finite number"),
    ("s: {method: weighted_sum, a: a, b: b, alpha: [0, 1]}", r"steps\.s\.alpha: expected 20 values"),
    ("s: {method: weighted_sum, a: a, b: b, alpha: NOPE}", r"steps\.s\.alpha"),
    ("s: {method: weighted_sum, a: a, b: b, alpha: 0.5, convention: supermerger2023}",
     r"steps\.s\.convention: 'supermerger2023' is not one of .*did you mean 'supermerger-2023'"),
    ("s: {method: weighted_sun, a: a, b: b, alpha: 0.5}", r"steps\.s\.method: unknown method 'weighted_sun'; did you "
                                                          r"mean 'weighted_sum'\?"),
    ("s: {method: ties, base: a, models: b}", r"steps\.s\.models: expected a list"),
    ("s: {method: ties, base: a}", r"steps\.s: expected a list of at least 1 model"),
    ("s: {method: model_stock, base: a, models: [b]}", r"steps\.s\.models: 1 models; this method takes 2"),
    ("s: {method: dare, base: a, models: [b], ties_sign: 1}", r"steps\.s\.ties_sign: expected true or false"),
    ("s: {method: dare, base: a, models: [b], seed: 1.5}", r"steps\.s\.seed: expected a whole number"),
    ("s: {formula: 'a + b'}", r"steps\.s\.formula: formula 'a \+ b': `a \+ b` adds models"),
    ("s: {formula: 'a + b', extra: 1}", r"steps\.s: unknown field 'extra'"),
    ("s: a * 2", r"steps\.s\.formula: .*`a \* 2` scales a model"),
    ("s: a + os.system", r"steps\.s\.formula: .*unexpected '\.'"),
    ("s: a + zz * (b - c)", r"steps\.s\.formula: unknown model or step 'zz'"),
    ("s: a + 0.5 * (s - b)", r"steps\.s\.formula: step 's' refers to itself"),
    ("s: {method: weighted_sum, a: s, b: b, alpha: 0.5}", r"steps\.s\.a: step 's' refers to itself"),
    ("a: b", r"steps\.a: the name 'a' is both a model and a step"),
    ("s: 42", r"steps\.s: expected a formula string or a mapping, got a number"),
    ("s: {alpha: 1}", r"steps\.s: expected a `formula`, `method` or `lora` field"),
    ("kxl-beta: a", r"steps: 'kxl-beta' is not a valid name"),
    ("x: b - c", r"steps\.x: the output step is a delta"),
    ("d: b - c\ns: {method: weighted_sum, a: a, b: d, alpha: 0.5}", r"steps\.s\.b: 'd' is a delta step"),
    ("s: {method: weighted_sum, a: a, b: b, alpha: {value: 0.5, overrides: [{match: '(', value: 1}]}}",
     r"steps\.s\.alpha\.overrides\[0\]\.match: invalid regular expression"),
    ("s: {method: weighted_sum, a: a, b: b, alpha: {value: 0.5, overrides: [{match: x, value: a}]}}",
     r"steps\.s\.alpha\.overrides\[0\]\.value: expected a finite number"),
    ("s: {method: weighted_sum, a: a, b: b, alpha: {overrides: []}}", r"steps\.s\.alpha: missing field 'value'"),
])
def test_step_errors(tmp_path, body, expected):
    import re

    message = error(tmp_path, body)
    assert re.search(expected, message), message


def test_cycle_is_named(tmp_path):
    message = error(tmp_path, """\
        x: {method: weighted_sum, a: y, b: a, alpha: 0.5}
        y: "z + 0.5 * (b - c)"
        z: {method: weighted_sum, a: x, b: a, alpha: 0.5}
    """)
    assert "steps form a cycle: x -> y -> z -> x" in message


def test_huge_vector_is_refused_before_parsing(tmp_path):
    values = ", ".join(["0.5"] * (MAX_LIST + 1))
    message = error(tmp_path, f"s: {{method: weighted_sum, a: a, b: b, alpha: [{values}]}}")
    assert f"at most {MAX_LIST}" in message


@pytest.mark.parametrize(("text", "expected"), [
    ("models: {a: x}\nsteps: {s: a}\noutptu: {}\n", r"r\.yaml: unknown field 'outptu'; did you mean 'output'\?"),
    ("steps: {s: a}\n", r"missing field 'models'"),
    ("models: {a: x}\nsteps: {s: a}\narch: SDXL\n", r"arch: 'SDXL' is not one of sdxl, sd15; did you mean 'sdxl'\?"),
    ("models: {a: x}\nsteps: {s: a}\nversion: 2\n", r"version: unsupported recipe version 2"),
    ("models: {a: {path: x, sha256: abc}}\nsteps: {s: a}\n", r"models\.a\.sha256: 'abc' is not a sha256"),
    ("models: {a: {path: x, hash: abc}}\nsteps: {s: a}\n", r"models\.a: unknown field 'hash'"),
    ("models: {a: 3}\nsteps: {s: a}\n", r"models\.a: expected a mapping, got a number"),
    ("models: []\nsteps: {s: a}\n", r"models: expected a mapping alias -> path"),
    ("models: {a: x}\nsteps: []\n", r"steps: expected a mapping step name"),
    ("models: {a: x}\nsteps: {s: a}\noutput: {dtype: fp8}\n", r"output\.dtype: 'fp8' is not one of"),
    ("models: {a: x}\nsteps: {s: a}\noutput: {fp8_scaled: true}\n", r"output\.fp8_scaled: applies only to fp8"),
    ("models: {a: x}\nsteps: {s: a}\noutput: {vae: v}\n", r"output\.vae: 'v' is not a model alias"),
    ("models: {a: x}\nsteps: {s: a}\noutput: {missing_keys: skip}\n", r"output\.missing_keys: 'skip' is not one of"),
    ("models: {a: x}\nsteps: {s: a}\noutput: {compute_dtype: fp8_e4m3fn}\n", r"output\.compute_dtype: 'fp8_e4m3fn'"),
    ("models: {a: x}\nsteps: {s: a}\noutput: {seed: -1}\n", r"output\.seed: expected a whole number"),
    ("models: {a: x}\nsteps: {s: a}\noutput: {drop: ['[']}\n", r"output\.drop\[0\]: invalid regular expression"),
    ("models: {a: x}\nsteps: {s: a}\noutput: {prune_ema: 1}\n", r"output\.prune_ema: expected true or false"),
    ("models: {a: x}\nsteps: {s: a}\noutput: {metadata: {k: [1]}}\n", r"output\.metadata\.k: expected a string"),
    ("", r"r\.yaml: recipe is empty"),
    ("- a\n- b\n", r"r\.yaml: expected a mapping, got a list"),
    ("models: {a: x}\nmodels: {b: y}\nsteps: {s: a}\n", r"r\.yaml:2: duplicate key 'models'"),
    ("models: {a: x}\nsteps:\n  s: a\n  s: a\n", r"r\.yaml:4: duplicate key 's'"),
    ("models: {a: x\n", r"r\.yaml:2: invalid YAML"),
    ("models: !!python/object/apply:os.system ['true']\nsteps: {}\n", r"r\.yaml:1: invalid YAML"),
])
def test_recipe_errors(tmp_path, text, expected):
    import re

    message = error(tmp_path, text, whole=True)
    assert re.search(expected, message), message


def test_yaml_anchors_and_aliases_are_refused(tmp_path):
    laughs = "a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\nc: [*b, *b, *b]\n"
    with pytest.raises(RecipeError, match=r"r\.yaml:1: YAML anchors and aliases \(&a / \*a\) are not allowed"):
        load_recipe(write(tmp_path, laughs))
    with pytest.raises(RecipeError, match="anchors and aliases"):
        load_yaml("x: 1\ny: *undefined\n")


def test_oversized_and_binary_files_are_refused(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_text("# " + "x" * (1 << 20) + "\n")
    with pytest.raises(RecipeError, match="larger than"):
        load_recipe(big)
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(RecipeError, match="not UTF-8"):
        load_recipe(binary)
    with pytest.raises(RecipeError, match="cannot read recipe"):
        load_recipe(tmp_path / "absent.yaml")


def test_deep_nesting_is_a_recipe_error():
    with pytest.raises(RecipeError, match="nests deeper than 32 levels"):
        load_yaml("[" * 10_000 + "]" * 10_000)


def test_parse_recipe_from_data_names_its_source():
    with pytest.raises(RecipeError, match=r"^sweep\.yaml: steps\.s\.formula"):
        parse_recipe({"models": {"a": "x", "b": "y"}, "steps": {"s": "a + b"}}, source="sweep.yaml")


def test_mbw_vectors_checked_against_declared_arch(tmp_path):
    sd1 = "0," * 25 + "0"
    text = f"arch: sdxl\nmodels: {{a: x, b: y}}\nsteps:\n  s: {{method: weighted_sum, a: a, b: b, alpha: '{sd1}'}}\n"
    load_recipe(write(tmp_path, text))  # SuperMerger's 26-value layout is accepted for SDXL
    text21 = text.replace(sd1, "0," * 20 + "0")
    with pytest.raises(RecipeError, match=r"steps\.s\.alpha: expected 20 values"):
        load_recipe(write(tmp_path, text21))
    # without a declared arch a vector valid for any architecture passes; planning checks it against the inputs
    load_recipe(write(tmp_path, text.replace("arch: sdxl\n", "")))


def test_shipped_recipes_load():
    names = sorted(p.name for p in RECIPES.glob("*.yaml"))
    assert {"kohaku_xl_gamma_rev1.yaml", "kohaku_xl_gamma_rev2.yaml", "anime_diffusion_merge.yaml",
            "ties_dare_example.yaml"} <= set(names)
    for name in names:
        recipe = load_recipe(RECIPES / name)
        assert recipe.models and recipe.steps and recipe.output.path
