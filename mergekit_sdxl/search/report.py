"""A study's outputs: best.yaml, results.csv (and .parquet when pyarrow is installed), the top-k grids and
report.html (Optuna's optimisation history, parameter importances and parallel coordinates, plotly inlined: the
page works offline). Every file is written under a temporary name and renamed into place.
"""

from __future__ import annotations

import csv
import html
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mergekit_sdxl.search.best import best_recipe_text, values_header
from mergekit_sdxl.search.files import atomic_write
from mergekit_sdxl.search.space import Dimension, Payload, apply_values

TIMINGS = ("merge", "load", "render", "score")


def write_outputs(study: Any, recipe: Any, recipe_path: str, dims: Sequence[Dimension], arch: str, out_dir: Path,
                  top_k: int, payload: Payload) -> dict[str, Path]:
    """Write every output of the study into `out_dir`; returns name -> path of what was written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = trial_rows(study, dims)
    outputs = {"csv": atomic_write(out_dir / "results.csv", _csv(rows))}
    parquet = _parquet(rows, out_dir / "results.parquet")
    if parquet is not None:
        outputs["parquet"] = parquet
    best = _best(study)
    if best is not None:
        variant = apply_values(recipe, dims, best.params, arch)
        header = values_header(study.study_name, best.number, best.value, best.params,
                               best.user_attrs.get("scores", {}))
        outputs["best"] = atomic_write(out_dir / "best.yaml", best_recipe_text(recipe_path, variant, dims, header))
    grids = _top_grids(study, out_dir, top_k, payload)
    outputs["report"] = atomic_write(out_dir / "report.html", _html(study, rows, grids, out_dir))
    return outputs


def trial_rows(study: Any, dims: Sequence[Dimension]) -> list[dict[str, Any]]:
    """One flat row per trial: number, state, value, parameters, scores, timings, worker, images."""
    rows = []
    labels = sorted({k for t in study.trials for k in t.user_attrs.get("scores", {})})
    for trial in study.trials:
        attrs = trial.user_attrs
        row: dict[str, Any] = {"number": trial.number, "state": trial.state.name.lower(), "value": trial.value,
                               "first_images_score": attrs.get("first_images_score")}
        row.update({d.name: trial.params.get(d.name) for d in dims})
        row.update({f"score.{k}": attrs.get("scores", {}).get(k) for k in labels})
        row.update({f"seconds.{k}": attrs.get("timings", {}).get(k) for k in TIMINGS})
        row["worker"] = attrs.get("worker")
        row["images"] = ";".join(attrs.get("images", []))
        row["error"] = attrs.get("error")
        row["started"] = trial.datetime_start.isoformat() if trial.datetime_start else None
        row["finished"] = trial.datetime_complete.isoformat() if trial.datetime_complete else None
        rows.append(row)
    return rows


def _csv(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    if rows:
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return buffer.getvalue()


def _parquet(rows: list[dict[str, Any]], path: Path) -> Path | None:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        return None
    table = pa.Table.from_pylist([{k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in r.items()}
                                  for r in rows])
    buffer = pa.BufferOutputStream()
    pq.write_table(table, buffer)
    return atomic_write(path, buffer.getvalue().to_pybytes())


def _best(study: Any) -> Any:
    try:
        return study.best_trial
    except ValueError:
        return None


def _top_grids(study: Any, out_dir: Path, top_k: int, payload: Payload) -> list[tuple[Any, str]]:
    """A grid per top-k complete trial (rows prompts, columns seeds): topk/rankNN_trialNNNNN.png."""
    from PIL import Image

    from mergekit_sdxl.sampler.layout import render_page

    complete = [t for t in study.trials if t.value is not None and t.user_attrs.get("state") == "complete"]
    ranked = sorted(complete, key=lambda t: -t.value)[:max(0, top_k)]
    folder = out_dir / "topk"
    out = []
    for rank, trial in enumerate(ranked, 1):
        paths = [out_dir / p for p in trial.user_attrs.get("images", [])]
        if len(paths) != len(payload.images) or not all(p.exists() for p in paths):
            continue
        cells = [Image.open(p).convert("RGB") for p in sorted(paths, key=lambda p: int(p.name[1:4]))]
        n = len(payload.seeds)
        rows = [cells[i:i + n] for i in range(0, len(cells), n)]
        grid, _ = render_page(rows, [str(s) for s in payload.seeds], list(payload.prompts), x_title="seed",
                              y_title="prompt", title=f"#{rank} trial {trial.number}: value {trial.value:.6g}")
        folder.mkdir(exist_ok=True)
        name = f"rank{rank:02d}_trial{trial.number:05d}.png"
        encoded = io.BytesIO()
        grid.save(encoded, format="PNG")
        atomic_write(folder / name, encoded.getvalue())
        out.append((trial, f"topk/{name}"))
    kept = {Path(path).name for _, path in out}
    for stale in folder.glob("rank*_trial*.png") if folder.is_dir() else ():  # an earlier report's ranking
        if stale.name not in kept:
            stale.unlink()
    return out


def _html(study: Any, rows: list[dict[str, Any]], grids: list[tuple[Any, str]], out_dir: Path) -> str:
    figures = _figures(study)
    best = _best(study)
    head = (f"<h1>Study {html.escape(study.study_name)}</h1><p>{len(rows)} trials; "
            + (f"best: trial {best.number}, value {best.value:.6g}" if best else "no complete trial yet")
            + " &mdash; best recipe: <a href='best.yaml'>best.yaml</a>, table: <a href='results.csv'>results.csv</a>"
            "</p>")
    plots = "".join(f"<section><h2>{html.escape(title)}</h2>{body}</section>" for title, body in figures)
    top = "".join(f"<figure><img src='{path}' alt='trial {t.number}'><figcaption>#{i} trial {t.number}: "
                  f"value {t.value:.6g}; {html.escape(_params_text(t.params))}</figcaption></figure>"
                  for i, (t, path) in enumerate(grids, 1))
    table = _table(rows)
    style = ("body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse;font-size:12px}"
             "td,th{border:1px solid #ccc;padding:2px 5px}figure{display:inline-block;margin:0.5em}"
             "img{max-width:100%;image-rendering:pixelated}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(study.study_name)}</title>"
            f"<style>{style}</style></head><body>{head}{plots}<section><h2>Top trials</h2>{top or 'none yet'}"
            f"</section><section><h2>All trials</h2>{table}</section></body></html>")


def _figures(study: Any) -> list[tuple[str, str]]:
    """Optuna's plots as HTML fragments (plotly.js inlined once); a plot that cannot be drawn yet says why."""
    import optuna.visualization as vis

    complete = [t for t in study.trials if t.value is not None]
    makers = [("Optimisation history", vis.plot_optimization_history),
              ("Parameter importances", _importances),
              ("Parallel coordinates", vis.plot_parallel_coordinate)]
    out: list[tuple[str, str]] = []
    js: str | bool = "inline"  # plotly's include_plotlyjs: the first figure inlines plotly.js, later ones not
    for title, make in makers:
        try:
            if len(complete) < 2:
                raise ValueError("needs at least two complete trials")
            figure = make(study)
            out.append((title, figure.to_html(full_html=False, include_plotlyjs=js)))
            js = False
        except Exception as exc:  # noqa: BLE001 - a plot that cannot be drawn must not lose the report
            out.append((title, f"<p>not available: {html.escape(str(exc))}</p>"))
    return out


def _importances(study: Any) -> Any:
    import optuna.visualization as vis
    from optuna.importance import PedAnovaImportanceEvaluator

    return vis.plot_param_importances(study, evaluator=PedAnovaImportanceEvaluator())


def _table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "<p>no trials</p>"
    columns = [c for c in rows[0] if c not in ("images", "started", "finished")]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_cell(r[c]))}</td>" for c in columns) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _cell(value: Any) -> str:
    if value is None:
        return ""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _params_text(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={_cell(v)}" for k, v in params.items())


