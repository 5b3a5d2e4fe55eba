"""Errors keep their cause (`raise ... from exc`) for --debug tracebacks and bug reports; the one-line message the
CLI prints without --debug stays as it was. Causes that are pure noise (a KeyError turned into "no tensor") stay
hidden."""

from __future__ import annotations

import struct
import traceback
from pathlib import Path

import pytest
import torch
import yaml

from mergekit_sdxl.cli.main import main
from mergekit_sdxl.errors import CheckpointError, RecipeError
from mergekit_sdxl.io.reader import open_checkpoint, open_regular
from mergekit_sdxl.io.writer import save_file
from mergekit_sdxl.recipe.load import load_yaml


def _bad_json(path: Path) -> Path:
    raw = b'{"w": {"dtype": "F16", "shape": [2, 2]'  # cut off: not JSON
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    return path


def test_header_json_error_keeps_its_cause(tmp_path):
    with pytest.raises(CheckpointError, match="the safetensors header is not valid JSON") as info:
        open_checkpoint(_bad_json(tmp_path / "bad.safetensors"))
    assert isinstance(info.value.__cause__, ValueError)


def test_open_failure_keeps_the_os_error(tmp_path):
    with pytest.raises(CheckpointError, match="cannot open") as info:
        open_regular(tmp_path / "missing.safetensors")
    assert isinstance(info.value.__cause__, FileNotFoundError)


def test_yaml_error_keeps_its_cause():
    with pytest.raises(RecipeError, match="invalid YAML") as info:
        load_yaml("models: [a, b\n", "r.yaml")
    assert isinstance(info.value.__cause__, yaml.YAMLError)


def test_unknown_key_hides_the_key_error(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.zeros(2)}, path)
    with open_checkpoint(path) as reader, pytest.raises(CheckpointError, match="no tensor 'x'") as info:
        reader.info("x")
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_cli_message_unchanged_and_debug_shows_the_cause(tmp_path, capsys):
    bad = _bad_json(tmp_path / "bad.safetensors")
    with pytest.raises(SystemExit) as info:
        main(["inspect", str(bad)])
    err = capsys.readouterr().err
    assert info.value.code == CheckpointError.exit_code
    assert err.startswith(f"error: {bad}: the safetensors header is not valid JSON: ") and err.count("\n") == 1
    assert "Traceback" not in err
    with pytest.raises(CheckpointError) as debug:
        main(["--debug", "inspect", str(bad)])
    text = "".join(traceback.format_exception(debug.value))
    assert "The above exception was the direct cause of the following exception" in text
    assert "JSONDecodeError" in text
