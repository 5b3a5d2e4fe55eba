"""Regenerate the generated documentation: `docs/methods.md` (method registry), `docs/presets.md` (preset
registries) — the same text as `mergekit-sdxl methods --markdown` / `presets --markdown` — and the sampler and
schedule tables inside `docs/sampler.md` (from `mergekit_sdxl/sampler/catalog.py`, between its BEGIN/END
generated markers; the prose around them is written by hand).

Usage: python scripts/gen_docs.py [--check]

`--check` exits 1 when a page differs from what would be generated (tests/test_reference_docs.py does the same).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mergekit_sdxl.arch.preset_reference import presets_markdown  # noqa: E402
from mergekit_sdxl.methods.reference import methods_markdown  # noqa: E402
from mergekit_sdxl.sampler.catalog import SAMPLER_NAMES, SCHEDULE_NAMES  # noqa: E402

CATALOG_REGION = re.compile(r"(<!-- BEGIN generated: sampler catalog[^\n]*-->\n).*?(<!-- END generated -->)", re.S)


def catalog_markdown() -> str:
    """The sampler and schedule tables of docs/sampler.md, from the catalog."""
    out = ["| `--sampler` | A1111 | ComfyUI | model calls per step | noise each step | source |",
           "|---|---|---|---|---|---|"]
    for s in SAMPLER_NAMES.values():
        noise = "Brownian tree" if s.brownian else "yes" if s.stochastic else "no"
        aliases = "".join(f", `{a}`" for a in s.aliases)
        out.append(f"| `{s.name}`{aliases} | {s.a1111} | `{s.comfyui}` | {s.model_calls_per_step} | {noise} | "
                   f"{s.source} |")
    out += ["", "| `--schedule` | A1111 \"Schedule type\" | ComfyUI | source |", "|---|---|---|---|"]
    for c in SCHEDULE_NAMES.values():
        aliases = "".join(f", `{a}`" for a in c.aliases)
        out.append(f"| `{c.name}`{aliases} | {c.a1111} | `{c.comfyui}` | {c.source} |")
    return "\n".join(out) + "\n"


def sampler_page(current: str) -> str:
    """docs/sampler.md with its generated region replaced."""
    if not CATALOG_REGION.search(current):
        raise SystemExit("docs/sampler.md: the BEGIN/END generated markers are missing")
    return CATALOG_REGION.sub(lambda m: m.group(1) + catalog_markdown() + m.group(2), current, count=1)


# page -> function(current text) -> generated text
PAGES: dict[str, Callable[[str], str]] = {
    "docs/methods.md": lambda _: methods_markdown(),
    "docs/presets.md": lambda _: presets_markdown(),
    "docs/sampler.md": sampler_page,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args(argv)
    stale = []
    for rel, render in PAGES.items():
        path = ROOT / rel
        current = path.read_text(encoding="utf-8") if path.exists() else ""
        text = render(current)
        if args.check:
            if current != text:
                stale.append(rel)
            continue
        if text != current:
            path.write_text(text, encoding="utf-8", newline="\n")
            print(f"wrote {rel}")
    if stale:
        print("stale (run python scripts/gen_docs.py): " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
