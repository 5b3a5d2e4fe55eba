"""The preset reference, generated from the preset registries: MBW presets (`arch/mbw.py`) and LoRA Block Weight
presets (`arch/lbw.py`).

`mergekit-sdxl presets` prints it (text, `--markdown`, `--json`); `docs/presets.md` is `presets_markdown()` written
by `scripts/gen_docs.py`, and `tests/test_reference_docs.py` fails when the two differ. Each MBW preset is shown
as the parser reads it on each architecture (`parse_mbw`), so the reference says what a recipe really gets.
"""

from __future__ import annotations

from typing import Any

from mergekit_sdxl.arch import lbw, mbw
from mergekit_sdxl.arch.blocks import DEFAULT_CONVENTION, block_names
from mergekit_sdxl.arch.tables import ARCH_NAMES, ARCHS
from mergekit_sdxl.errors import MergekitError


def _number(value: float) -> str:
    return f"{value:.6g}"


def _read(name: str, arch: str) -> list[float] | str:
    """The preset's vector on `arch` under the default convention, or the parser's refusal as text."""
    try:
        return mbw.to_list(mbw.parse_mbw(name, arch, DEFAULT_CONVENTION, where=name), arch)
    except MergekitError as exc:
        return f"refused: {exc}"


def preset_reference() -> dict[str, Any]:
    """Both preset tables as plain data (JSON-ready)."""
    return {
        "mbw": {
            "layouts": {arch: list(block_names(arch, DEFAULT_CONVENTION)) for arch in ARCHS},
            "presets": {name: {arch: _read(name, arch) for arch in ARCHS} for name in mbw.PRESETS},
        },
        "lbw": {
            "layout": list(lbw.LAYOUTS[17]),
            "presets": {name: list(values) for name, values in lbw.PRESETS.items()},
        },
    }


def _values(values: list[float] | str) -> str:
    return values if isinstance(values, str) else ", ".join(_number(v) for v in values)


def presets_text() -> str:
    """The reference for a terminal."""
    ref = preset_reference()
    lines = ["MBW presets (any float parameter of a method step; names are case-insensitive)"]
    for arch in ARCHS:
        lines.append(f"  {ARCH_NAMES[arch]} order: {', '.join(ref['mbw']['layouts'][arch])}")
    for name, per_arch in ref["mbw"]["presets"].items():
        lines.append(f"  {name}")
        lines += [f"    {ARCH_NAMES[arch]:<6} {_values(per_arch[arch])}" for arch in ARCHS]
    lines += ["", "LoRA Block Weight presets (`blocks:` of a LoRA step, `bake --blocks`; names are case-sensitive)",
              f"  order: {', '.join(ref['lbw']['layout'])}"]
    lines += [f"  {name:<8} {_values(values)}" for name, values in ref["lbw"]["presets"].items()]
    return "\n".join(lines) + "\n"


def presets_markdown() -> str:
    """docs/presets.md."""
    ref = preset_reference()
    out = [
        "# Presets",
        "",
        "<!-- Generated from the preset registries by `python scripts/gen_docs.py` (the same text as",
        "     `mergekit-sdxl presets --markdown`). Do not edit: tests/test_reference_docs.py checks it. -->",
        "",
        "## MBW presets",
        "",
        "A preset name can stand wherever a method step takes an MBW vector (`alpha: GRAD_V`), in a LoRA step's",
        "`blocks:` and on a `grid` axis. Names are case-insensitive. The presets are SuperMerger's, stored as",
        "26-value SD1 vectors; each is shown as this tool reads it on each architecture under the default",
        f"`{DEFAULT_CONVENTION}` convention (on SDXL a 26-value vector is read by SuperMerger's rule, see",
        "[conventions.md](conventions.md)). Values in block order:",
        "",
    ]
    out += [f"- {ARCH_NAMES[arch]}: {', '.join(ref['mbw']['layouts'][arch])}" for arch in ARCHS]
    out += ["", "| preset | " + " | ".join(ARCH_NAMES[arch] for arch in ARCHS) + " |",
            "|---|" + "---|" * len(ARCHS)]
    for name, per_arch in ref["mbw"]["presets"].items():
        out.append(f"| `{name}` | " + " | ".join(_values(per_arch[arch]) for arch in ARCHS) + " |")
    out += [
        "",
        "## LoRA Block Weight presets",
        "",
        "The presets of the `sd-webui-lora-block-weight` extension, for a LoRA step's `blocks:` and",
        "`bake --blocks`. Names are case-sensitive, as in the extension. Each is a 17-value vector in the",
        f"extension's SD1 LoRA layout ({', '.join(ref['lbw']['layout'])}); blocks it leaves out get 0. How",
        "the layouts map to keys: [lora-block-weight.md](lora-block-weight.md).",
        "",
        "| preset | values |",
        "|---|---|",
    ]
    out += [f"| `{name}` | {_values(values)} |" for name, values in ref["lbw"]["presets"].items()]
    out.append("")
    return "\n".join(out)
