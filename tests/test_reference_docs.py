"""The generated references: `mergekit-sdxl methods` / `presets` print what the registries hold, and
docs/methods.md / docs/presets.md are exactly that text (regenerate with `python scripts/gen_docs.py`)."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from mergekit_sdxl.arch import lbw, mbw
from mergekit_sdxl.arch.preset_reference import preset_reference, presets_markdown, presets_text
from mergekit_sdxl.cli.main import cli
from mergekit_sdxl.methods.reference import method_reference, methods_markdown, methods_text
from mergekit_sdxl.methods.registry import METHODS

ROOT = Path(__file__).resolve().parents[1]


def _invoke(*args: str) -> str:
    result = CliRunner().invoke(cli, list(args))
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize("page, render", [("methods.md", methods_markdown), ("presets.md", presets_markdown)])
def test_docs_pages_are_the_generated_text(page, render):
    text = (ROOT / "docs" / page).read_text(encoding="utf-8")
    assert text == render(), f"docs/{page} is stale: run python scripts/gen_docs.py"


def test_gen_docs_check_agrees():
    spec = importlib.util.spec_from_file_location("gen_docs", ROOT / "scripts" / "gen_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--check"]) == 0


@pytest.mark.parametrize("command, markdown, text", [("methods", methods_markdown, methods_text),
                                                     ("presets", presets_markdown, presets_text)])
def test_commands_print_the_references(command, markdown, text):
    assert _invoke(command, "--markdown") == markdown()
    assert _invoke(command) == text()


def test_every_method_and_parameter_is_in_the_reference():
    page = methods_markdown()
    rows = {row["name"]: row for row in json.loads(_invoke("methods", "--json"))}
    assert list(rows) == list(METHODS)
    for name, spec in METHODS.items():
        row = rows[name]
        assert row["formula"] == spec.formula and f"## {name}\n" in page
        assert row["peers"], f"{name}: no peer names"
        for tool_name in row["peers"].values():
            assert tool_name in page
        for p, shown in zip(spec.params, row["params"]):
            default = "required" if p.default is None else str(p.default).lower() if isinstance(p.default, bool) \
                else f"{p.default:g}"
            if p.name == "seed":
                default = "derived per key"
            assert shown == {"name": p.name, "type": p.type.__name__, "doc": p.doc, "default": default,
                             "range": "true/false" if p.type is bool else p.range_text()}
            assert f"| `{p.name}` | {p.type.__name__} | {shown['range']} | {default} |" in page


@pytest.mark.parametrize("name", list(METHODS))
def test_every_formula_names_its_inputs_and_parameters(name):
    spec = METHODS[name]
    formula = spec.formula
    assert formula and "\n" not in formula
    for word in spec.param_names:
        assert re.search(rf"\b{re.escape(word)}\b", formula), f"{name}: formula does not use {word!r}"
    for word in spec.inputs:
        assert re.search(rf"\b{re.escape(word)}\b", formula, re.IGNORECASE), f"{name}: formula lacks input {word!r}"
    if spec.variadic:
        assert "M_i" in formula


def test_reference_defaults_follow_the_spec():
    dare = next(row for row in method_reference() if row["name"] == "dare")
    assert {p["name"]: p["default"] for p in dare["params"]} == {"seed": "derived per key", "p": "0.9",
                                                                  "alpha": "1", "ties_sign": "false"}
    assert dare["params"][1]["range"] == "[0, 1]"
    assert dare["inputs"] == ["base", "models..."]


def test_presets_json_holds_every_preset_as_the_parser_reads_it():
    ref = json.loads(_invoke("presets", "--json"))
    assert ref == json.loads(json.dumps(preset_reference()))
    assert list(ref["mbw"]["presets"]) == list(mbw.PRESETS)
    for name, values in mbw.PRESETS.items():
        assert ref["mbw"]["presets"][name]["sd15"] == list(values)  # 26 values, as stored
    grad_v = ref["mbw"]["presets"]["GRAD_V"]["sdxl"]
    assert len(grad_v) == 20 and grad_v == [mbw.PRESETS["GRAD_V"][i] for i in (*range(10), *range(13, 23))]
    assert ref["lbw"]["presets"] == {name: list(values) for name, values in lbw.PRESETS.items()}
    assert ref["lbw"]["layout"][:3] == ["BASE", "IN01", "IN02"]
    page = presets_markdown()
    assert all(f"| `{name}` |" in page for name in (*mbw.PRESETS, *lbw.PRESETS))


@pytest.mark.parametrize("command", ["methods", "presets"])
def test_reference_commands_do_not_import_torch(command):
    code = ("import sys\nfrom mergekit_sdxl.cli.main import main\n"
            f"try:\n    main([{command!r}, '--json'])\nexcept SystemExit as exc:\n    assert exc.code == 0, exc.code\n"
            "print('torch' in sys.modules, file=sys.stderr)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert done.stderr.strip().splitlines()[-1] == "False"
    assert json.loads(done.stdout)


def test_markdown_and_json_exclude_each_other():
    result = CliRunner().invoke(cli, ["methods", "--markdown", "--json"])
    assert result.exit_code == 2 and "exclude each other" in result.output


def test_sampler_page_tables_come_from_the_catalog():
    from mergekit_sdxl.sampler.catalog import SAMPLER_NAMES, SCHEDULE_NAMES

    text = (ROOT / "docs" / "sampler.md").read_text(encoding="utf-8")
    region = text.split("<!-- BEGIN generated: sampler catalog", 1)[1].split("<!-- END generated -->", 1)[0]
    for row in (*SAMPLER_NAMES.values(), *SCHEDULE_NAMES.values()):
        assert f"| `{row.name}`" in region and f"`{row.comfyui}`" in region and row.source in region
