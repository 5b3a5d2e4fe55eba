"""`index.html`: a static report of a grid, to open from disk (no server, no network, nothing fetched).

It shows every page with its axis titles and values, the cell images (zoomable), each cell's full parameters and
recipe on hover or click, an A/B viewer that flips (or blinks) between two chosen cells, and the block-diff
heatmap of the model files involved. All data sits in the page as JSON; text is inserted as text, never as HTML.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPORT = "index.html"


def write_report(result: Any, out: str | Path, diffs: Sequence[tuple[Path, Path, Any]] = ()) -> Path:
    """Write `index.html` for a `GridResult` into `out`; `diffs` are (file A, file B, DiffResult) of the model
    files involved."""
    from mergekit_sdxl.sampler.grid import grid_record

    plan = result.plan
    data = grid_record(plan, result.cells, result.title)
    data["pages"] = [{"title": p.label, "index": i} for i, p in enumerate(plan.z.points)]
    data["columns"] = [p.label for p in plan.x.points]
    data["rows"] = [p.label for p in plan.y.points]
    data["grid"] = result.grid.name
    data["heatmaps"] = [heatmap_data(a, b, d) for a, b, d in diffs]
    path = Path(out) / REPORT
    text = _template().replace("__TITLE__", _escape_html(result.title or "mergekit-sdxl grid"))
    path.write_text(text.replace("__DATA__", _json_for_script(data)), encoding="utf-8")
    return path


def heatmap_data(path_a: Path, path_b: Path, diff: Any) -> dict[str, Any]:
    """One diff as JSON rows (group, kind, component of a part, relative change, cosine, parameters)."""
    rows = [{"group": r["group"], "kind": r["kind"], "component": r.get("component"),
             "relative_change": _finite(r["relative_change"]), "cosine": _finite(r["cosine"]),
             "params": r["params"]} for r in diff.rows()]
    return {"a": Path(path_a).name, "b": Path(path_b).name, "rows": rows}


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _json_for_script(data: Any) -> str:
    """JSON that cannot end the <script> element it sits in, whatever the prompts hold."""
    text = json.dumps(data, ensure_ascii=True, sort_keys=True)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _escape_html(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


def _template() -> str:
    from importlib import resources

    return resources.files("mergekit_sdxl.sampler").joinpath("report.html").read_text(encoding="utf-8")
