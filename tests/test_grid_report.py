"""index.html, the grid report, opened from disk in headless Chromium: cells render, hover shows parameters, the
A/B toggle flips the shown image, the heatmap names its files; nothing is fetched from the network."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mergekit_sdxl.sampler.axes import axis
from mergekit_sdxl.sampler.grid import CellRecord, GridResult, write_grid
from mergekit_sdxl.sampler.gridplan import GridPlan, describe_settings
from mergekit_sdxl.sampler.report import write_report

HOSTILE = "</script><img src=x onerror=alert(1)> & \"quotes\""


class _Diff:
    def rows(self):
        return [{"group": "IN04", "kind": "block", "keys": 10, "params": 1000, "relative_change": 0.05,
                 "cosine": 0.99},
                {"group": "vae", "kind": "component", "keys": 5, "params": 500, "relative_change": 0.0,
                 "cosine": 1.0},
                {"group": "IN04", "kind": "part", "component": "unet", "keys": 10, "params": 1000,
                 "relative_change": 0.05, "cosine": 0.99},
                {"group": "L03", "kind": "part", "component": "clip_g", "keys": 12, "params": 100,
                 "relative_change": 0.01, "cosine": 0.999},
                {"group": "dec.up0", "kind": "part", "component": "vae", "keys": 5, "params": 500,
                 "relative_change": 0.0, "cosine": 1.0}]


@pytest.fixture
def report(tmp_path) -> tuple[Path, GridResult]:
    plan = GridPlan.build(axis(["out.alpha[IN04]=0,1"]), axis(["seed=1,2"]), axis([f"prompt=a cat;{HOSTILE}"]))
    records = []
    for cell in plan.cells:  # each cell a distinct flat colour, so the page's images can be told apart
        colour = (40 + 50 * cell.x, 60 + 80 * cell.y, 30 + 150 * cell.z)
        path = tmp_path / cell.file_name
        Image.new("RGB", (64, 64), colour).save(path)
        params = f"{dict(cell.render).get('prompt', '')}\nSteps: 2, Seed: {cell.seed(1)}"
        recipe = json.dumps({"recipe": "r.yaml", "settings": describe_settings(cell.settings)})
        records.append(CellRecord(cell, path, params, "r", describe_settings(cell.settings), recipe))
    grid, pages = write_grid(plan, records, tmp_path, "r.yaml · Euler · 2 steps")
    result = GridResult(plan, grid, pages, records, [], 0.1, 0.2, "r.yaml · Euler · 2 steps")
    page = write_report(result, tmp_path, [(Path("/m/a.safetensors"), Path("/m/b.safetensors"), _Diff())])
    return page, result


def test_report_is_static_and_safe(report):
    page, result = report
    text = page.read_text()
    assert "http://" not in text and "https://" not in text  # nothing to fetch
    assert HOSTILE not in text  # prompts sit in the page only as escaped JSON
    assert len(result.pages) == 2 and all(p.is_file() for p in result.pages)


def test_report_in_chromium(report, chromium):
    page_path, result = report
    page = chromium.open(page_path.as_uri())
    page.wait_for("Array.from(document.querySelectorAll('table.grid img')).every(i => i.complete && "
                  "i.naturalWidth === 64)")
    assert page.evaluate("document.querySelectorAll('table.grid img').length") == len(result.cells) == 8
    headers = page.evaluate("Array.from(document.querySelectorAll('table.grid th')).map(t => t.textContent)")
    assert {"out.alpha[IN04]", "seed", "0", "1"} <= set(headers)
    assert page.evaluate("document.querySelectorAll('h2')[1].textContent") == f"prompt: {HOSTILE}"
    assert page.evaluate("document.querySelectorAll('img[src=x]').length") == 0  # the hostile prompt stayed text

    # hover: the details panel shows that cell's parameters and recipe
    page.evaluate("document.querySelectorAll('table.grid img')[3].dispatchEvent(new MouseEvent('mouseenter'))")
    details = page.evaluate("document.getElementById('cell-params').textContent")
    assert "z00_y01_x01.png" in details and "Seed: 2" in details and "out.alpha[IN04]: 1" in details
    assert '"out.alpha[IN04]": "1"' in page.evaluate("document.getElementById('cell-recipe').textContent")

    # A/B: choose cells 1 and 6, then the toggle flips the shown image between them
    def shown() -> tuple[str, list[int]]:
        """The A/B image's file and the colour the browser actually paints at its centre (from a screenshot)."""
        src = page.evaluate("document.getElementById('ab-image').getAttribute('src')")
        page.wait_for("document.getElementById('ab-image').complete")
        x, y = page.evaluate("(() => { const r = document.getElementById('ab-image').getBoundingClientRect(); "
                             "return [r.left + r.width / 2, r.top + r.height / 2]; })()")
        shot = np.asarray(Image.open(page.screenshot(page_path.parent / "shot.png")).convert("RGB"))
        scale = shot.shape[1] / page.evaluate("window.innerWidth")
        return src, [int(v) for v in shot[int(y * scale), int(x * scale)]]

    for index, button in ((1, "set-a"), (6, "set-b")):
        page.evaluate(f"document.querySelectorAll('table.grid img')[{index}].click()")
        page.evaluate(f"document.getElementById('{button}').click()")
    b_src, b_pixel = shown()
    page.evaluate("document.getElementById('ab-toggle').click()")
    a_src, a_pixel = shown()
    assert (a_src, b_src) == (result.cells[1].path.name, result.cells[6].path.name)
    assert a_pixel == _colour(result.cells[1].path) and b_pixel == _colour(result.cells[6].path)
    page.evaluate("document.getElementById('ab-toggle').click()")
    assert shown()[0] == b_src

    # zoom scales the cells; the heatmap names both files
    page.evaluate("const z = document.getElementById('zoom'); z.value = 4; z.dispatchEvent(new Event('input'))")
    assert page.evaluate("document.querySelector('table.grid img').getBoundingClientRect().width") == 256
    heat = page.evaluate("document.getElementById('heatmaps').textContent")
    assert "b.safetensors" in heat and "a.safetensors" in heat and "relative change" in heat
    rows = page.evaluate("Array.from(document.querySelectorAll('#heatmaps tr')).map(r => r.textContent)")
    assert rows == ["UNetIN045.0", "CLIP-GL031.0", "VAEdec.up00.0"]  # one row per component, values in %
    assert not page.evaluate("performance.getEntriesByType('resource').some(r => !r.name.startsWith('file:'))")


def _colour(path: Path) -> list[int]:
    return [int(v) for v in np.asarray(Image.open(path))[0, 0]]
