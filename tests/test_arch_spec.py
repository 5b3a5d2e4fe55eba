"""ArchSpec is the one home of per-architecture facts: no code outside arch/registry.py compares or keys by an id,
the specs agree with the key tables and shipped configs, and CLI choices come from the registry."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path
from types import MappingProxyType

import pytest

from mergekit_sdxl.arch import detect, registry
from mergekit_sdxl.arch.configs import load_config
from mergekit_sdxl.arch.detect import component_of
from mergekit_sdxl.arch.registry import ARCHS, DEFAULT_ARCH, SDXL, SPECS, arch_spec
from mergekit_sdxl.arch.tables import key_table
from mergekit_sdxl.errors import ArchError

PKG = Path(__file__).resolve().parents[1] / "mergekit_sdxl"
ARCH_IDS = frozenset(ARCHS)


def _is_id(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and node.value in ARCH_IDS


def _operands(node: ast.AST) -> list[ast.AST]:
    """The node itself, or the elements of a tuple/list/set literal (`arch in ("sdxl", "sd15")`)."""
    return list(node.elts) if isinstance(node, (ast.Tuple, ast.List, ast.Set)) else [node]


def arch_literals(source: str) -> list[tuple[int, str]]:
    """(line, what) for each architecture id used as a fact outside the registry: compared (`==`, `!=`, `in`),
    as a dict key (a per-architecture table), as a subscript (`TABLE["sdxl"]`), as a `match` case, or in a
    literal list of several ids (CLI choices)."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            operands = [op for side in (node.left, *node.comparators) for op in _operands(side)]
            found += [(node.lineno, "comparison") for op in operands if _is_id(op)]
        elif isinstance(node, ast.Dict):
            found += [(node.lineno, "dict key") for key in node.keys if key is not None and _is_id(key)]
        elif isinstance(node, ast.Subscript):
            found += [(node.lineno, "subscript") for op in _operands(node.slice) if _is_id(op)]
        elif isinstance(node, ast.MatchValue) and _is_id(node.value):
            found.append((node.value.lineno, "match case"))
        elif isinstance(node, (ast.Tuple, ast.List, ast.Set)) and sum(map(_is_id, node.elts)) > 1:
            found.append((node.lineno, "list of architectures"))
    return found


# Only the registry spells the ids as facts; arch/ modules ask the specs like everyone else.
OUTSIDE_REGISTRY = [p for p in sorted(PKG.rglob("*.py")) if p != PKG / "arch" / "registry.py"]


@pytest.mark.parametrize("path", OUTSIDE_REGISTRY, ids=lambda p: str(p.relative_to(PKG)))
def test_no_architecture_literal_outside_registry(path: Path) -> None:
    found = arch_literals(path.read_text(encoding="utf-8"))
    assert not found, f"{path}: architecture id as a {found[0][1]} at line {found[0][0]}; ask arch_spec(arch)"


@pytest.mark.parametrize("planted", [
    'if arch == "sdxl":\n    pass\n',
    'ok = "sd15" != arch\n',
    'ok = arch in ("sdxl", "sd15")\n',
    'NAMES = {"sdxl": "SDXL"}\n',
    'size = DEFAULT_SIZE["sd15"]\n',
    'x = 1 if model.arch == "sdxl" else 2\n',
    'match arch:\n    case "sdxl":\n        pass\n',
    'option = click.Choice(["sdxl", "sd15"])\n',
])
def test_scan_finds_planted_literals(planted: str) -> None:
    assert arch_literals(planted)


def test_scan_allows_ids_as_plain_values() -> None:
    source = '"""Docstring naming "sdxl"."""\nmake(arch="sdxl")\ncli("--arch", "sd15")\nif arch == other:\n    pass\n'
    assert arch_literals(source) == []


def test_registry_ids_and_lookup() -> None:
    assert ARCHS == tuple(SPECS) and DEFAULT_ARCH in ARCHS
    assert all(arch_spec(arch).id == arch for arch in ARCHS)
    with pytest.raises(ArchError, match="unknown architecture 'sd3'; known: sdxl, sd15"):
        arch_spec("sd3")


@pytest.mark.parametrize("arch", ARCHS)
def test_spec_prefixes_agree_with_key_table(arch: str) -> None:
    """Every key-table component has a prefix in the spec, and every prefix the spec names has keys."""
    spec = arch_spec(arch)
    table = key_table(arch)
    components = {info.component for info in table.values()} - {"other"}
    assert components <= {component for _, component in spec.components}
    for prefix in (*spec.diffusers_prefixes.values(), *(p for p, _, _ in spec.lora_prefixes.values())):
        assert any(key.startswith(prefix) for key in table), prefix
    for component, (prefix, _, _) in spec.lora_prefixes.items():
        assert {component_of(key, arch) for key in table if key.startswith(prefix)} == {component}
    assert any(key in table for key in spec.detection.fingerprints)


@pytest.mark.parametrize("arch", ARCHS)
def test_spec_configs_and_tiny_model(arch: str) -> None:
    spec = arch_spec(arch)
    for name in spec.configs:
        assert isinstance(load_config(arch, name), dict)
    assert set(spec.tiny.hparams) == set(spec.diffusers_prefixes)
    assert spec.text_encoders == tuple(c for c in spec.configs if c.startswith("text_encoder"))
    pipelines = load_config(arch, "model_index")["_class_name"]
    assert pipelines in spec.detection.pipelines
    assert spec.sampler.prediction_type == load_config(arch, "scheduler").get("prediction_type", "epsilon")


@pytest.mark.parametrize("command", ["make_test_cmd", "merge_lora_cmd", "resize_lora_cmd"])
def test_cli_arch_choices_come_from_registry(command: str) -> None:
    import importlib

    import click

    module = importlib.import_module(f"mergekit_sdxl.cli.{command}")
    commands = [obj for obj in vars(module).values() if isinstance(obj, click.Command)]
    options = [p for cmd in commands for p in cmd.params if p.name == "arch"]
    assert options and all(isinstance(o.type, click.Choice) and tuple(o.type.choices) == ARCHS for o in options)


def test_a_v_prediction_variant_is_one_spec(monkeypatch: pytest.MonkeyPatch) -> None:
    """A same-layout variant needs only its spec: detection tells it apart by the `v_pred` marker, and the export's
    scheduler and the sampler read its prediction type from the spec."""
    from mergekit_sdxl.export.folder import scheduler_config

    variant = dataclasses.replace(
        SDXL, id="sdxl-vpred", name="SDXL v-pred",
        detection=dataclasses.replace(SDXL.detection, markers=("v_pred",)),
        sampler=dataclasses.replace(SDXL.sampler, prediction_type="v_prediction"))
    specs = MappingProxyType({**SPECS, variant.id: variant})
    monkeypatch.setattr(registry, "SPECS", specs)
    monkeypatch.setattr(detect, "SPECS", specs)
    keys = [key for key, info in key_table("sdxl").items() if not info.optional]
    assert detect.detect_arch(keys) == "sdxl"
    assert detect.detect_arch([*keys, "v_pred"]) == "sdxl-vpred"
    assert load_config("sdxl-vpred", "unet") == load_config("sdxl", "unet")  # `data` shares SDXL's files
    assert scheduler_config("sdxl-vpred", ())["prediction_type"] == "v_prediction"
    assert scheduler_config("sdxl", ())["prediction_type"] == "epsilon"


def test_a_diffusers_folder_of_a_variant_is_told_by_its_scheduler(monkeypatch: pytest.MonkeyPatch,
                                                                  tmp_path: Path) -> None:
    import json

    from mergekit_sdxl.io import diffusers_folder

    variant = dataclasses.replace(SDXL, id="sdxl-vpred", name="SDXL v-pred", sampler=dataclasses.replace(
        SDXL.sampler, prediction_type="v_prediction"))
    monkeypatch.setattr(diffusers_folder, "SPECS", MappingProxyType({**SPECS, variant.id: variant}))
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    assert diffusers_folder.folder_arch(tmp_path) == "sdxl"  # no scheduler config: diffusers' epsilon
    for prediction, arch in (("epsilon", "sdxl"), ("v_prediction", "sdxl-vpred")):
        config = json.dumps({"_class_name": "EulerDiscreteScheduler", "prediction_type": prediction})
        (tmp_path / "scheduler" / "scheduler_config.json").write_text(config)
        assert diffusers_folder.folder_arch(tmp_path) == arch
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps({"prediction_type": "sample"}))
    with pytest.raises(ArchError, match="prediction type 'sample' fits none of SDXL, SDXL v-pred"):
        diffusers_folder.folder_arch(tmp_path)
