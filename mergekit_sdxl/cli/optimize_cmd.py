"""`mergekit-sdxl optimize`: search a recipe's parameters (Optuna), trials merged in memory, rendered and scored."""

from __future__ import annotations

from pathlib import Path

import click

from mergekit_sdxl.cli import console
from mergekit_sdxl.cli.options import out_option
from mergekit_sdxl.dtypes import WEIGHTS, choices
from mergekit_sdxl.search.study import ALGORITHMS, TrialEvent  # torch-free

DTYPES = ("auto", *choices(WEIGHTS))


@click.command("optimize")
@click.argument("recipe", required=False, type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option("--space", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="The search space YAML: parameters with ranges, ties, and the payload to render.")
@click.option("--scorer", "scorers", multiple=True, metavar="NAME[:WEIGHT]",
              help="aesthetic, clip, reference, manual or python:MODULE:FUNCTION; repeat to combine (weighted sum).")
@click.option("--trials", type=click.IntRange(1, 100_000), default=30, show_default=True,
              help="Trials the study should have finished (a continued study runs only the rest).")
@click.option("-m", "--model", "model_paths", multiple=True, metavar="ALIAS=PATH",
              help="Override a model path of the recipe (repeatable).")
@click.option("--models-dir", "models_dirs", multiple=True, type=click.Path(file_okay=False, path_type=Path),
              help="Index this folder first (incremental) and find models named by hash there (repeatable).")
@click.option("--db", type=click.Path(dir_okay=False, path_type=Path),
              help="Model index for models named by hash (default: the one `mergekit-sdxl index` uses).")
@out_option("out", type=click.Path(file_okay=False, path_type=Path), default=Path("optimize-out"),
              show_default=True, help="Output folder: study.db, trials/, best.yaml, results.csv, report.html, topk/.")
@click.option("--storage", metavar="URL", help="Optuna storage URL (default: sqlite:///OUT/study.db; e.g. "
              "postgresql+psycopg2://user@host/db with the [postgres] extra, password in PGPASSWORD or ~/.pgpass).")
@click.option("--study", "study_name", metavar="NAME", help="Study name (default: the recipe's file name).")
@click.option("--algorithm", type=click.Choice(ALGORITHMS), default="tpe", show_default=True,
              help="Optuna sampler: TPE, CMA-ES, Gaussian process, or random.")
@click.option("--seed", type=int, default=0, show_default=True, help="Sampler seed (same seed: same trials).")
@click.option("--prune/--no-prune", default=True, show_default=True,
              help="Stop trials whose first images score below the median of earlier trials.")
@click.option("--workers", type=click.IntRange(1, 1024), default=1, show_default=True,
              help="Trials in parallel on Ray workers (one per GPU, or per CPU process without GPUs).")
@click.option("--ray-address", metavar="ADDR", help="Join a running Ray cluster; `local` starts a private local "
              "Ray even for one worker (default: a local Ray when --workers > 1).")
@click.option("--device", default="auto", show_default=True, help="Where each worker merges and renders.")
@click.option("--dtype", type=click.Choice(DTYPES), default="auto", show_default=True, help="Render dtype.")
@click.option("--threads", type=click.IntRange(1, 1024), help="CPU threads per worker (default: the cores shared "
              "among the workers; 1 is fastest for small models on a busy machine).")
@click.option("--clip", type=click.Path(exists=True, path_type=Path),
              help="A local CLIP (transformers folder, or weights file beside its config.json) for aesthetic, "
                   "clip and reference.")
@click.option("--aesthetic-head", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="The aesthetic head's weights (.safetensors, or .pt/.pth read weights-only).")
@click.option("--reference", type=click.Path(exists=True, path_type=Path),
              help="Reference image(s) for the reference scorer: a folder (one per payload image) or one file.")
@click.option("--manual-mode", type=click.Choice(("rating", "ab")), default="rating", show_default=True,
              help="manual scorer: a 1-10 rating, or an A/B choice against the best so far (Bradley-Terry).")
@click.option("--manual-port", type=click.IntRange(0, 65535), default=0, show_default=True,
              help="Port of the manual scorer's page on 127.0.0.1 (0: any free port).")
@click.option("--top-k", type=click.IntRange(0, 100), default=5, show_default=True, help="Grids of the best trials.")
@click.option("--resume", is_flag=True, help="Continue an existing study (recipe, space, scorers as recorded).")
@click.option("--report", "report_only", is_flag=True, help="Only write best.yaml, results and report.html.")
def command(recipe: Path | None, space: Path | None, scorers: tuple[str, ...], trials: int,
            model_paths: tuple[str, ...], models_dirs: tuple[Path, ...], db: Path | None, out: Path,
            storage: str | None, study_name: str | None, algorithm: str,
            seed: int, prune: bool, workers: int, ray_address: str | None, device: str, dtype: str, threads: int | None,
            clip: Path | None, aesthetic_head: Path | None, reference: Path | None, manual_mode: str,
            manual_port: int, top_k: int, resume: bool, report_only: bool) -> None:
    """Search RECIPE's parameters: each trial merges in memory, renders the payload, scores it and is recorded.

    The study lives in its storage: run the same command again to continue it after Ctrl-C. When done (or with
    --report) OUT holds best.yaml (run it with `merge`), results.csv, report.html and the top-k grids.
    """
    from mergekit_sdxl.errors import UsageError
    from mergekit_sdxl.recipe.load import parse_model_overrides
    from mergekit_sdxl.search.optimize import OptimizeRequest, optimize

    if not (resume or report_only) and (recipe is None or space is None or not scorers):
        raise UsageError("give RECIPE, --space SPACE.yaml and at least one --scorer (or --resume / --report with "
                         "--study NAME)")
    request = OptimizeRequest(
        out_dir=out, recipe=recipe, space=space, scorers=scorers, model_paths=parse_model_overrides(model_paths),
        models_dirs=models_dirs, db=db,
        scorer_options={"clip": clip, "aesthetic_head": aesthetic_head, "reference": reference,
                        "manual_mode": manual_mode, "manual_port": manual_port},
        trials=trials, storage=storage, study=study_name, algorithm=algorithm, seed=seed, prune=prune,
        workers=workers, ray_address=ray_address, device=device, dtype=dtype, threads=threads, resume=resume,
        report_only=report_only, top_k=top_k)
    result = optimize(request, on_event=_report, notify=console.info)
    if result.best_number is not None:
        console.info(f"best: trial {result.best_number}, value {result.best_value:.6g}")
    for name, path in result.outputs.items():
        console.info(f"{name}: {path}")
    click.echo(str(result.outputs.get("best", result.outputs["report"])))


def _report(event: TrialEvent) -> None:
    t = event.timings
    timing = " ".join(f"{k} {t[k]:.1f}s" for k in ("merge", "load", "render", "score") if k in t)
    scores = ", ".join(f"{k} {v:.4g}" for k, v in event.scores.items())
    value = "pruned" if event.value is None else f"{event.value:.4g}"
    best = "" if event.best_number is None else f" | best #{event.best_number} {event.best_value:.4g}"
    console.info(f"[{event.done}/{event.total}] trial {event.number}: {value} ({scores}) {timing}{best}")
