"""`<lora:NAME:...>` in prompts, as A1111's built-in Lora extension reads it, applied to the loaded model in memory.

Syntax (A1111): `<lora:NAME>`, `<lora:NAME:TE>`, `<lora:NAME:TE:UNET>` and named `te=`, `unet=` (the first
number is the text-encoder multiplier, the second the UNet's, which defaults to the first). `NAME` is a file
stem under `--lora-dir` (searched recursively: .safetensors, .pt, .ckpt). Every `<name:...>` extra-network tag is
removed from the prompt text, as A1111 removes them; only `lora` (and its alias `lyco`) is applied. `lbw=` (the
lora-block-weight extension's block weights: a preset such as `MIDD`, or 12/17/20/26 values; see `arch.lbw`)
scales the adapter per block. Other named arguments (`dyn=`) are kept in `LoraTag.named`.

The adapters' weight changes come from the bake code (`lora.bake.AdapterSet`), added to the loaded weights; the
originals are kept and put back bit for bit when the set of adapters changes.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mergekit_sdxl.errors import PromptError, UsageError

_TAG = re.compile(r"<(\w+):([^>]+)>")
LORA_NETWORKS = ("lora", "lyco")
LORA_EXTENSIONS = (".safetensors", ".pt", ".ckpt")


@dataclass(frozen=True)
class LoraTag:
    """One `<lora:...>` tag: adapter name, text-encoder and UNet multipliers, other named arguments."""

    name: str
    te: float = 1.0
    unet: float = 1.0
    named: tuple[tuple[str, str], ...] = ()
    text: str = ""


def _number(value: str, tag: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise PromptError(f"{tag}: {value!r} is not a number") from None


def _parse(network: str, args: str, tag: str) -> LoraTag:
    positional, named = [], {}
    for item in args.split(":"):
        parts = item.split("=", 2)
        if len(parts) == 2:
            named[parts[0]] = parts[1]
        else:
            positional.append(item)
    if not positional or not positional[0]:
        raise PromptError(f"{tag}: a LoRA tag needs a name")
    te = _number(positional[1], tag) if len(positional) > 1 else 1.0
    te = _number(named.pop("te"), tag) if "te" in named else te
    unet = _number(positional[2], tag) if len(positional) > 2 else te
    unet = _number(named.pop("unet"), tag) if "unet" in named else unet
    if "lbw" in named:
        _check_lbw(named["lbw"], tag)
    return LoraTag(positional[0], te, unet, tuple(sorted(named.items())), tag)


def _check_lbw(value: str, tag: str) -> None:
    """`lbw=` as the lora-block-weight extension reads it (presets, 12/17/20/26 values); PromptError otherwise."""
    from mergekit_sdxl.arch.lbw import parse_lbw
    from mergekit_sdxl.errors import RecipeError

    try:
        parse_lbw(value, where=tag)
    except RecipeError as exc:
        raise PromptError(str(exc)) from exc


def blocks_of(tag: LoraTag) -> str | None:
    """The tag's `lbw=` block weights as an adapter `blocks` value (None without one)."""
    from mergekit_sdxl.arch.lbw import LBW_PREFIX

    value = dict(tag.named).get("lbw")
    return None if value is None else LBW_PREFIX + value


def extract_lora_tags(prompt: str) -> tuple[str, list[LoraTag], list[str]]:
    """(prompt without extra-network tags, the LoRA tags in order, the other tags, which are ignored)."""
    tags: list[LoraTag] = []
    ignored: list[str] = []

    def found(match: re.Match) -> str:
        if match.group(1) in LORA_NETWORKS:
            tags.append(_parse(match.group(1), match.group(2), match.group(0)))
        else:
            ignored.append(match.group(0))
        return ""

    return _TAG.sub(found, prompt), tags, ignored


def find_lora(name: str, lora_dir: str | os.PathLike[str] | None) -> Path:
    """The adapter file called `name` under `lora_dir` (UsageError naming the tag's name otherwise)."""
    if lora_dir is None:
        raise UsageError(f"<lora:{name}>: give --lora-dir, the folder that holds the LoRA files")
    for root, _dirs, files in os.walk(lora_dir, followlinks=True):
        for ext in LORA_EXTENSIONS:
            if f"{name}{ext}" in files:
                return Path(root) / f"{name}{ext}"
    raise UsageError(f"<lora:{name}>: no {name}.safetensors (or .pt, .ckpt) under {lora_dir}")


def adapter_specs(tags: Sequence[LoraTag], lora_dir: str | os.PathLike[str] | None) -> list:
    """`lora.bake.AdapterSpec`s for `tags`: strength = UNet multiplier, te_strength = text-encoder multiplier."""
    from mergekit_sdxl.lora.bake import AdapterSpec

    return [AdapterSpec(str(find_lora(t.name, lora_dir)), strength=t.unet, te_strength=t.te, blocks=blocks_of(t))
            for t in tags]


def lora_hashes(tags: Sequence[LoraTag], specs: Sequence) -> str:
    """A1111's `Lora hashes` value: `name: first 12 hex of the file's AutoV3 (sha256 for non-safetensors)`."""
    from mergekit_sdxl.io.hashes import hashes_for

    parts = []
    for tag, spec in zip(tags, specs):
        hashes = hashes_for(spec.path)
        short = (hashes.autov3 or hashes.sha256)[:12]
        parts.append(f"{tag.name.replace(':', '').replace(',', '')}: {short}")
    return ", ".join(dict.fromkeys(parts))
