"""Enforces the one-way import direction of the layers (docs/architecture.md, "Who may import whom")."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "mergekit_sdxl"

# module -> project modules it may import
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "platform": {"errors"},
    "dtypes": {"errors"},
    "patterns": {"errors"},
    "arch": {"errors", "platform", "dtypes"},
    "io": {"errors", "platform", "dtypes", "arch"},
    "methods": {"errors", "platform", "dtypes"},
    "recipe": {"errors", "platform", "dtypes", "patterns", "arch", "methods"},
    "synth": {"errors", "platform", "dtypes", "arch", "io"},
    "engine": {"errors", "platform", "dtypes", "patterns", "io", "arch", "methods", "recipe"},
    "lora": {"errors", "platform", "dtypes", "io", "arch", "methods", "engine", "recipe"},
    "sampler": {"errors", "platform", "dtypes", "io", "arch", "engine", "recipe", "methods", "lora"},
    "export": {"errors", "platform", "dtypes", "arch", "io", "engine", "sampler"},
    "provenance": {"errors", "platform", "dtypes", "arch", "io", "methods", "recipe"},
    "index": {"errors", "platform", "dtypes", "arch", "io", "recipe", "provenance"},
    "analysis": {"errors", "platform", "dtypes", "arch", "io"},
    "search": {"errors", "platform", "dtypes", "arch", "io", "engine", "recipe", "methods", "lora", "sampler",
               "index"},
    # the typed API: on top of every layer but the UI (cli wraps it; nothing else imports it)
    "api": {"errors", "platform", "dtypes", "patterns", "arch", "io", "methods", "recipe", "synth", "engine", "lora",
            "sampler", "export", "provenance", "index", "analysis", "search"},
    "cli": {"*"},
    "demo": {"*"},
}
# third-party packages a layer must not import (anywhere in the file, function bodies included)
FORBIDDEN_THIRD_PARTY: dict[str, set[str]] = {
    "platform": {"numpy", "safetensors", "click", "rich", "diffusers", "transformers"},  # torch only lazily
    "dtypes": {"torch", "numpy", "safetensors", "click", "rich", "diffusers", "transformers"},
    "patterns": {"torch", "numpy", "safetensors", "click", "rich", "diffusers", "transformers"},
    "arch": {"torch", "numpy", "safetensors", "click", "rich", "diffusers", "transformers"},
    "methods": {"safetensors", "click", "rich", "diffusers", "transformers"},
    "recipe": {"torch", "click", "rich", "diffusers", "transformers"},
    "index": {"torch", "numpy", "click", "rich", "diffusers", "transformers"},
}
UI_ONLY = {"click", "rich"}


def _layer(path: Path) -> str:
    rel = path.relative_to(PKG)
    return rel.parts[0].removesuffix(".py")


def _imports(path: Path) -> list[tuple[str, int]]:
    """Dotted names of every absolute import; `from mergekit_sdxl import x` counts as `mergekit_sdxl.x` (a
    layer, or a name the package root re-exports, resolved to its source module by `_root_name`)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[tuple[str, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module == "mergekit_sdxl" and node.level == 0:
            found += [(_root_name(alias.name), node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, node.lineno))
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            pytest.fail(f"{path}: relative import at line {node.lineno}; use absolute imports")
    return found


def _root_name(name: str) -> str:
    """`mergekit_sdxl.<layer>` for a layer, the source module of a name the root `__init__` re-exports, and the
    bare package for what the root defines itself (`__version__`)."""
    if (PKG / name).is_dir() or (PKG / f"{name}.py").is_file():
        return f"mergekit_sdxl.{name}"
    return ROOT_EXPORTS.get(name, "mergekit_sdxl")


def _root_exports() -> dict[str, str]:
    """name -> module for each `from mergekit_sdxl.x import name` in the package's `__init__.py`."""
    tree = ast.parse((PKG / "__init__.py").read_text())
    return {alias.asname or alias.name: node.module for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 for alias in node.names}


ROOT_EXPORTS = _root_exports()
FILES = [p for p in sorted(PKG.rglob("*.py")) if p.name != "__init__.py" or p.parent != PKG]


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(PKG)))
def test_imports_point_down(path: Path) -> None:
    layer = _layer(path)
    if layer == "__init__":
        return
    assert layer in ALLOWED, f"{path}: layer {layer!r} is not in the layer table"
    for name, line in _imports(path):
        top = name.split(".")[0]
        if top == "mergekit_sdxl":
            parts = name.split(".")
            if len(parts) == 1:
                continue
            target = parts[1]
            if target == layer or target == "__init__" or "*" in ALLOWED[layer]:
                continue
            assert target in ALLOWED[layer], f"{path}:{line} {layer} may not import {target}"
        elif top in FORBIDDEN_THIRD_PARTY.get(layer, set()):
            pytest.fail(f"{path}:{line} {layer} may not import {top}")
        elif top in UI_ONLY and layer not in {"cli", "demo"}:
            pytest.fail(f"{path}:{line} only cli imports {top}")


def test_help_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = ("import sys\nfrom mergekit_sdxl.cli.main import cli\n"
            "try:\n    cli.main(['--help'], standalone_mode=False)\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("False"), out


def test_root_imports_name_their_layer(tmp_path: Path) -> None:
    """`from mergekit_sdxl import engine` is an import of the engine layer, not of the harmless package root."""
    source = tmp_path / "planted.py"
    source.write_text("from mergekit_sdxl import __version__, engine\nfrom mergekit_sdxl import errors as e\n")
    assert [name for name, _ in _imports(source)] == ["mergekit_sdxl", "mergekit_sdxl.engine", "mergekit_sdxl.errors"]


MAX_MODULE_LINES = 450  # a module past this holds more than one concern; data tables go to data files


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(PKG)))
def test_modules_stay_short(path: Path) -> None:
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_MODULE_LINES, f"{path}: {lines} lines (at most {MAX_MODULE_LINES}); split it by concern"


def _documented_layers() -> dict[str, set[str]]:
    """The "Who may import whom" table of docs/architecture.md as {layer: allowed} ("everything" is "*")."""
    text = (PKG.parent / "docs" / "architecture.md").read_text(encoding="utf-8")
    section = text.split("### Who may import whom", 1)[1].split("\n#", 1)[0]
    table: dict[str, set[str]] = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 2 and cells[0].startswith("`"):
            names = {name.strip() for name in cells[1].split(",")} - {"—"}
            table[cells[0].strip("`")] = {"*"} if names == {"everything"} else names
    return table


def test_architecture_doc_matches_layer_table() -> None:
    assert _documented_layers() == ALLOWED
