"""Regenerate the generated reference pages: `docs/methods.md` (method registry) and `docs/presets.md` (preset
registries), the same text as `mergekit-sdxl methods --markdown` and `mergekit-sdxl presets --markdown`.

Usage: python scripts/gen_docs.py [--check]

`--check` exits 1 when a page differs from what would be generated (tests/test_reference_docs.py does the same).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mergekit_sdxl.arch.preset_reference import presets_markdown  # noqa: E402
from mergekit_sdxl.methods.reference import methods_markdown  # noqa: E402

PAGES: dict[str, Callable[[], str]] = {"docs/methods.md": methods_markdown, "docs/presets.md": presets_markdown}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args(argv)
    stale = []
    for rel, render in PAGES.items():
        path, text = ROOT / rel, render()
        if args.check:
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                stale.append(rel)
            continue
        path.write_text(text, encoding="utf-8", newline="\n")
        print(f"wrote {rel}")
    if stale:
        print("stale (run python scripts/gen_docs.py): " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
