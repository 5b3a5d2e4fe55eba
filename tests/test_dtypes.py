"""The torch-free dtype table (mergekit_sdxl/dtypes.py): roles, names, and every command's --dtype reading them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import click
import pytest

from mergekit_sdxl import dtypes
from mergekit_sdxl.dtypes import CHECKPOINT, COMPUTE, WEIGHTS, choices, name_of, parse_dtype
from mergekit_sdxl.errors import RecipeError, UsageError
from mergekit_sdxl.recipe.parser import parse_recipe


def test_roles_are_exactly_the_promised_lists():
    assert choices(CHECKPOINT) == ("fp8_e5m2", "fp8_e4m3fn", "fp16", "bf16", "fp32")
    assert choices(WEIGHTS) == ("fp16", "bf16", "fp32")
    assert choices(COMPUTE) == ("fp16", "bf16", "fp32", "fp64")  # fp16/bf16: per-operation rounding (reproduce)


@pytest.mark.parametrize("role", dtypes.ROLES)
def test_every_choice_round_trips(role):
    for name in choices(role):
        code = parse_dtype(name, role)
        assert name_of(code) == name
        assert dtypes.is_float(code)


@pytest.mark.parametrize("name,role", [("int8", CHECKPOINT), ("fp64", CHECKPOINT), ("fp8_e4m3fn", WEIGHTS),
                                       ("fp8_e5m2", COMPUTE), ("fp99", None)])
def test_outside_the_role_is_a_usage_error_naming_the_option(name, role):
    with pytest.raises(UsageError, match=rf"^--dtype: .*{name}.*use one of"):
        parse_dtype(name, role, "--dtype")


def test_spellings_and_float_names():
    assert parse_dtype("torch.float16") == parse_dtype("half") == parse_dtype("F16") == "F16"
    assert dtypes.is_float_dtype("float32") and dtypes.is_float_dtype("F8_E4M3") and dtypes.is_float_dtype("BF16")
    assert not dtypes.is_float_dtype("int64") and not dtypes.is_float_dtype("F7")
    assert dtypes.itemsize("BF16") == 2 and dtypes.itemsize("F8_E5M2") == 1


def test_table_is_torch_free():
    code = "import sys, mergekit_sdxl.dtypes, mergekit_sdxl.io.dtypes; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def _dtype_options() -> list[tuple[str, click.Option]]:
    from mergekit_sdxl.cli.main import cli

    found = []
    for name in cli.list_commands(click.Context(cli)):
        command = cli.get_command(click.Context(cli), name)
        found += [(name, p) for p in command.params if isinstance(p, click.Option) and "dtype" in p.name]
    return found


def test_every_command_takes_its_dtypes_from_the_table():
    roles = {choices(role) for role in dtypes.ROLES}
    options = _dtype_options()
    assert {name for name, _ in options} >= {"merge", "convert", "bake", "export", "extract-lora", "grid"}
    for command, option in options:
        assert isinstance(option.type, click.Choice), f"{command} {option.opts}: not a choice"
        offered = tuple(c for c in option.type.choices if c != "auto")
        assert offered in roles, f"{command} {option.opts}: {offered} is not one of the table's role lists"


RECIPE = {"models": {"a": "a.safetensors", "b": "b.safetensors"}, "steps": {"out": "0.5 * a + 0.5 * b"}}


@pytest.mark.parametrize("field,value", [("dtype", "int8"), ("dtype", "fp64"), ("compute_dtype", "fp8_e4m3fn")])
def test_recipe_rejects_dtypes_outside_the_role(field, value):
    with pytest.raises(RecipeError, match=rf"output\.{field}: '{value}' is not one of"):
        parse_recipe({**RECIPE, "output": {field: value}})


@pytest.mark.parametrize("value", ["int8", "fp64"])
def test_merge_dtype_outside_the_list_is_a_usage_error(tmp_path: Path, value, capsys):
    from mergekit_sdxl.cli.main import main

    recipe = tmp_path / "r.yaml"
    recipe.write_text("models: {a: a.safetensors, b: b.safetensors}\nsteps: {out: '0.5 * a + 0.5 * b'}\n")
    with pytest.raises(SystemExit) as info:
        main(["merge", str(recipe), "-o", str(tmp_path / "o.safetensors"), "--dtype", value])
    err = capsys.readouterr().err
    assert info.value.code == 2 and value in err and "fp16" in err
    assert "Traceback" not in err and "KeyError" not in err
    assert not (tmp_path / "o.safetensors").exists()
