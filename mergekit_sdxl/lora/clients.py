"""Which client loads which adapter format `extract-lora` writes (torch-free: CLI help reads it).

Measured against the clients' code (A1111 v1.10 Lora extension, ComfyUI v0.8, kohya sd-scripts, diffusers
`load_lora_weights`); docs/lora.md has the full table.
"""

from __future__ import annotations

FORMAT_CLIENTS = {
    "kohya": "loaded fully by A1111/Forge, ComfyUI, kohya sd-scripts and diffusers",
    "peft": "for diffusers/peft only: ComfyUI drops every UNet attention projection (to_q/to_k/to_v/to_out) of "
            "a peft file, and A1111/Forge and kohya sd-scripts read kohya names",
}
FORMATS = tuple(FORMAT_CLIENTS)


def format_help() -> str:
    """The `--format` help text: one sentence per format."""
    return " ".join(f"{name}: {text}." for name, text in FORMAT_CLIENTS.items())
