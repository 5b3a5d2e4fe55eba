"""Regenerate the packaged key tables `mergekit_sdxl/arch/data/{sdxl,sd15}.json` from the source tables.

Usage: python scripts/gen_key_tables.py [--source DIR] [--check]

The source tables (`tests/data/key_tables/*.json.gz`, gzip-compressed JSON, kept in the repository so the
generator and its test run on any clone) map every key of a real single-file checkpoint to
{shape, dtype, optional, component}.
The packaged copy is compact (one key a line, short lists) and uses the project's component names:
`diffuser` -> `unet`, `scheduler` -> `other`; `clip_l`, `clip_g`, `vae` and `ema` stay as they are.
`--check` exits 1 when the packaged files differ from what would be generated (CI guard).
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE_DIR = ROOT / "tests" / "data" / "key_tables"
SOURCES = {"sdxl": "sdxl_sgm_keys.json", "sd15": "sd1_ldm_keys.json"}
COMPONENTS = {"diffuser": "unet", "scheduler": "other", "clip_l": "clip_l", "clip_g": "clip_g", "vae": "vae",
              "ema": "ema"}
FORMAT = 1


def render(arch: str, table: dict) -> str:
    """Packaged JSON text for one arch: a header line, then `key: [shape, dtype, optional, component]` a line."""
    lines = []
    for key in sorted(table):
        entry = table[key]
        if entry["component"] not in COMPONENTS:
            raise SystemExit(f"{arch}: key {key!r} has unknown component {entry['component']!r}")
        row = [entry["shape"], entry["dtype"], int(bool(entry["optional"])), COMPONENTS[entry["component"]]]
        lines.append(f"{json.dumps(key)}:{json.dumps(row, separators=(',', ':'))}")
    head = f'{{"format":{FORMAT},"arch":{json.dumps(arch)},"keys":{{\n'
    return head + ",\n".join(lines) + "\n}}\n"


def read_source(source: Path, name: str) -> dict:
    """One source table from `source`: `name` as plain JSON if present, else `name`.gz."""
    plain = source / name
    if plain.exists():
        return json.loads(plain.read_text(encoding="utf-8"))
    with gzip.open(source / f"{name}.gz", "rt", encoding="utf-8") as fh:
        return json.load(fh)


def generate(source: Path = SOURCE_DIR) -> dict[str, str]:
    """arch -> packaged JSON text, built from the source tables in `source`."""
    return {arch: render(arch, read_source(source, name)) for arch, name in SOURCES.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=SOURCE_DIR,
                        help="folder of the source tables (*.json or *.json.gz)")
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args(argv)
    target = ROOT / "mergekit_sdxl" / "arch" / "data"
    stale = []
    for arch, text in generate(args.source).items():
        path = target / f"{arch}.json"
        if args.check:
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                stale.append(str(path))
            continue
        target.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        print(f"wrote {path} ({text.count(chr(10)) - 2} keys)")
    if stale:
        print("stale (run scripts/gen_key_tables.py): " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
