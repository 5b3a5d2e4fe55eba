"""extract-lora --help and the README say which --format each client loads fully (peft LoRAs lose every UNet
attention projection in ComfyUI)."""

from __future__ import annotations

import re
from pathlib import Path

from click.testing import CliRunner

from mergekit_sdxl.cli.main import cli
from mergekit_sdxl.lora.clients import FORMAT_CLIENTS, FORMATS

README = Path(__file__).resolve().parents[1] / "README.md"
CLIENTS = ("A1111/Forge", "ComfyUI", "kohya sd-scripts", "diffusers")


def _flat(text: str) -> str:
    return re.sub(r"\s+", " ", text)


def test_help_names_the_clients_of_each_format() -> None:
    result = CliRunner().invoke(cli, ["extract-lora", "--help"])
    assert result.exit_code == 0
    text = _flat(result.output)
    kohya = text[text.index("kohya: "):text.index("peft: ")]
    assert all(client in kohya for client in CLIENTS) and "fully" in kohya
    peft = text[text.index("peft: "):]
    assert "ComfyUI drops every UNet attention projection" in peft
    assert "decided whole" in text  # --text-encoders: attention blocks all or none


def test_readme_says_the_same() -> None:
    text = _flat(README.read_text(encoding="utf-8"))
    section = text[text.index("Which format for which client"):]
    section = section[:section.index("docs/lora.md")]
    assert all(client in section for client in CLIENTS)
    assert "ComfyUI drops every UNet attention projection of a peft file" in section


def test_every_format_has_a_client_line() -> None:
    assert FORMATS == ("kohya", "peft") and all(FORMAT_CLIENTS[f] for f in FORMATS)
