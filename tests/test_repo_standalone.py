"""The repository stands alone: nothing in it points at the engineers' `../shared` folder, which a clone does not
have (documentation lives in docs/, test data in tests/data/)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("README.md", "docs", "recipes", "mergekit_sdxl", "scripts", "tests", "benchmarks", "Makefile", ".ci",
           "pyproject.toml")
NEEDLES = (b"shared/", b"shared\\")  # also catches ../shared/... and shared\docs on Windows
SKIPPED_DIRS = {"__pycache__", ".pytest_cache", ".hypothesis", ".ruff_cache", ".mypy_cache"}


def _files(root: Path, names: tuple[str, ...]) -> list[Path]:
    out: list[Path] = []
    for name in names:
        path = root / name
        if path.is_file():
            out.append(path)
        elif path.is_dir():
            out += [p for p in sorted(path.rglob("*"))
                    if p.is_file() and not SKIPPED_DIRS.intersection(p.relative_to(root).parts)]
    return out


def shared_references(root: Path, names: tuple[str, ...] = SCANNED, skip: tuple[Path, ...] = ()) -> list[str]:
    """`file:line: text` for every line of a text file under `names` that mentions a shared/ path."""
    hits = []
    for path in _files(root, names):
        if path in skip:
            continue
        data = path.read_bytes()
        if b"\0" in data[:8192]:  # binary (images, gzip): no prose to point anywhere
            continue
        for number, line in enumerate(data.splitlines(), 1):
            if any(needle in line for needle in NEEDLES):
                hits.append(f"{path.relative_to(root)}:{number}: {line.decode('utf-8', 'replace').strip()}")
    return hits


def test_nothing_in_the_repository_refers_to_shared():
    hits = shared_references(ROOT, skip=(Path(__file__).resolve(),))
    assert hits == [], "references to ../shared (write our own docs/ or vendor the data):\n" + "\n".join(hits)


def test_the_scan_finds_a_planted_reference(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("fine\nsee ../shared/docs/lora.md\n", encoding="utf-8")
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "r.yaml").write_text("# see shared\\docs\\conventions.md\n", encoding="utf-8")
    (tmp_path / "docs" / "img.png").write_bytes(b"\x89PNG\0shared/")  # binary: skipped
    (tmp_path / "docs" / "__pycache__").mkdir()
    (tmp_path / "docs" / "__pycache__" / "x.md").write_text("shared/", encoding="utf-8")
    assert shared_references(tmp_path) == ["docs/a.md:2: see ../shared/docs/lora.md",
                                           "recipes/r.yaml:1: # see shared\\docs\\conventions.md"]


LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def _relative_links(page: Path) -> list[str]:
    return [target for target in LINK.findall(page.read_text(encoding="utf-8"))
            if "://" not in target and not target.startswith("mailto:")]


def test_every_docs_page_is_in_the_index_and_every_link_resolves():
    pages = sorted((ROOT / "docs").glob("*.md"))
    index = ROOT / "docs" / "README.md"
    linked = set(_relative_links(index))
    unlisted = [p.name for p in pages if p != index and p.name not in linked]
    assert unlisted == [], f"docs pages missing from docs/README.md: {unlisted}"
    broken = [f"{page.relative_to(ROOT)} -> {target}" for page in [ROOT / "README.md", *pages]
              for target in _relative_links(page) if not (page.parent / target).exists()]
    assert broken == [], f"links to files that do not exist: {broken}"
    readme_links = set(_relative_links(ROOT / "README.md"))
    assert all(f"docs/{p.name}" in readme_links for p in pages if p != index), "README must link every docs page"


def test_readme_commands_table_lists_every_command():
    from mergekit_sdxl.cli.main import COMMANDS

    text = (ROOT / "README.md").read_text(encoding="utf-8")
    table = text.split("## Commands", 1)[1].split("\n## ", 1)[0]
    missing = [name for name in COMMANDS if f"`{name}" not in table]
    assert missing == [], f"README's commands table lacks {missing}"
