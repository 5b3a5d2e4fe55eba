"""`optimize` as a typed API: search a recipe's parameters, then write the best recipe, the results and the report.

    result = optimize(OptimizeRequest(recipe=Path("r.yaml"), space=Path("space.yaml"), scorers=["reference"],
                                      scorer_options={"reference": "refs/"}, trials=30, out_dir=Path("opt")))
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergekit_sdxl.errors import UsageError
from mergekit_sdxl.search.scoring import ScorerSpec, parse_scorer
from mergekit_sdxl.search.space import SearchSpace, load_space, parse_space
from mergekit_sdxl.search.study import (
    CONFIG_ATTR,
    StudyOptions,
    TrialEvent,
    default_storage,
    open_study,
    run_trials,
    study_config,
)
from mergekit_sdxl.search.worker import WorkerSetup


@dataclass
class OptimizeRequest:
    """What `mergekit-sdxl optimize` was asked (see its --help for each field)."""

    out_dir: Path
    recipe: Path | None = None
    space: Path | None = None
    scorers: Sequence[str] = ()
    scorer_options: Mapping[str, Any] = field(default_factory=dict)
    model_paths: Mapping[str, str] = field(default_factory=dict)
    models_dirs: Sequence[Path] = ()  # indexed first; models named by hash are found there (index.resolve)
    db: Path | None = None  # the model index (default: the one `mergekit-sdxl index` uses)
    trials: int = 30
    storage: str | None = None
    study: str | None = None
    algorithm: str = "tpe"
    seed: int | None = 0
    prune: bool = True
    workers: int = 1
    ray_address: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    threads: int | None = None
    resume: bool = False
    report_only: bool = False
    top_k: int = 5


@dataclass
class OptimizeResult:
    """Where the study and its outputs are."""

    study_name: str
    storage: str
    trials_run: int
    best_number: int | None
    best_value: float | None
    outputs: dict[str, Path]


def optimize(request: OptimizeRequest, on_event: Callable[[TrialEvent], None] | None = None,
             notify: Callable[[str], None] = print) -> OptimizeResult:
    """Run (or continue) the study, then write best.yaml, results.csv, report.html and the top-k grids.

    With `report_only` no trial runs; with `resume` the study must exist and anything not given (recipe, space,
    scorers) is taken from what the study recorded.
    """
    from mergekit_sdxl.search.report import write_outputs

    out_dir = request.out_dir
    storage = request.storage or default_storage(out_dir)
    name = request.study or (request.recipe.stem if request.recipe else None)
    if name is None:
        raise UsageError("give RECIPE, or --study NAME to continue or report on an existing study")
    options = StudyOptions(storage, name, request.trials, out_dir, request.algorithm, request.seed, request.prune)
    existing = open_study(options, None, must_exist=True) if (request.resume or request.report_only) else None
    recorded = existing.user_attrs.get(CONFIG_ATTR, {}) if existing is not None else {}
    recipe_path = str(request.recipe) if request.recipe else recorded.get("recipe_path")
    if recipe_path is None:
        raise UsageError("give RECIPE (the study has no record of one)")
    model_paths = dict(request.model_paths) or dict(recorded.get("model_paths", {}))
    space = _space(request.space, recorded)
    scorers = _scorers(request, recorded)
    recipe, arch, dims = _bind(recipe_path, model_paths, space, request.models_dirs, request.db)
    ran = 0
    if not request.report_only:
        config = study_config(recipe_path, model_paths, space, dims, scorers, Path(recipe_path).read_text("utf-8"))
        study = open_study(options, config)
        ran = _search(study, options, request, recipe_path, _worker_paths(recipe, model_paths), space, dims,
                      scorers, on_event, notify)
    study = open_study(options, None, must_exist=True)
    outputs = write_outputs(study, recipe, recipe_path, dims, arch, out_dir, request.top_k, space.payload)
    best = _best(study)
    return OptimizeResult(name, storage, ran, best[0], best[1], outputs)


def _search(study: Any, options: StudyOptions, request: OptimizeRequest, recipe_path: str,
            model_paths: Mapping[str, str], space: SearchSpace, dims: Sequence[Any], scorers: Sequence[ScorerSpec],
            on_event: Callable[[TrialEvent], None] | None, notify: Callable[[str], None]) -> int:
    from optuna.trial import TrialState

    from mergekit_sdxl.search.pools import LocalPool, RayPool

    if sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in study.trials) >= options.trials:
        return 0  # nothing to run: no worker is started
    setup = WorkerSetup(recipe_path, dict(model_paths), space, tuple(scorers), request.device, request.dtype,
                        request.threads)
    driver = _driver_scorers(scorers, options.out_dir, notify)
    if request.workers > 1 or request.ray_address:
        notify(f"starting {request.workers} Ray worker(s){' at ' + request.ray_address if request.ray_address else ''}")
        pool: Any = RayPool(setup, request.workers, request.ray_address)
    else:
        pool = LocalPool(setup)
    try:
        return run_trials(study, pool, dims, scorers, options, driver, on_event)
    finally:
        pool.close()
        for scorer in driver.values():
            getattr(scorer, "close", lambda: None)()


def _space(path: Path | None, recorded: Mapping[str, Any]) -> SearchSpace:
    if path is not None:
        return load_space(path)
    text = recorded.get("space_text")
    if not text:
        raise UsageError("give --space SPACE.yaml (the study has no record of one)")
    from mergekit_sdxl.recipe.load import load_yaml

    source = str(recorded.get("space_source", "<recorded space>"))
    return parse_space(load_yaml(text, source), source, text)


def _scorers(request: OptimizeRequest, recorded: Mapping[str, Any]) -> list[ScorerSpec]:
    if request.scorers:
        return [_with_options(parse_scorer(text), request.scorer_options) for text in request.scorers]
    specs = [ScorerSpec(s["name"], s["weight"], s.get("options", {})) for s in recorded.get("scorers", [])]
    if not specs and not request.report_only:
        raise UsageError("give at least one --scorer (aesthetic, clip, reference, manual, python:MODULE:FUNCTION)")
    return specs


def _with_options(spec: ScorerSpec, options: Mapping[str, Any]) -> ScorerSpec:
    wanted = {"aesthetic": ("clip", "aesthetic_head"), "clip": ("clip",), "reference": ("reference", "clip"),
              "manual": ("manual_mode", "manual_port")}.get(spec.name, ())
    picked = {k: str(options[k]) if isinstance(options[k], Path) else options[k] for k in wanted
              if options.get(k) is not None}
    return ScorerSpec(spec.name, spec.weight, picked)


def _bind(recipe_path: str, model_paths: Mapping[str, str], space: SearchSpace, models_dirs: Sequence[Path] = (),
          db: Path | None = None) -> tuple[Any, str, list[Any]]:
    """The recipe (models named by hash resolved through the model index), its architecture (from the recipe, else
    the inputs' headers) and the space's dimensions."""
    from contextlib import ExitStack

    from mergekit_sdxl.index.resolve import resolve_recipe
    from mergekit_sdxl.recipe import load_recipe

    recipe = resolve_recipe(load_recipe(recipe_path, dict(model_paths)), models_dirs, db)
    arch = recipe.arch
    if arch is None:
        from mergekit_sdxl.engine.run import headers_of, job_arch, open_inputs

        with ExitStack() as stack:
            arch = job_arch(recipe, headers_of(recipe, open_inputs(recipe, stack)))
    return recipe, arch, space.dimensions(recipe, arch)


def _worker_paths(recipe: Any, model_paths: Mapping[str, str]) -> dict[str, str]:
    """The model paths workers load the recipe with: the user's overrides plus every model the index found (workers
    do not resolve hashes again: they may run where the index is not)."""
    return {**{alias: ref.path for alias, ref in recipe.models.items() if ref.hashes and ref.path}, **model_paths}


def _driver_scorers(scorers: Sequence[ScorerSpec], out_dir: Path, notify: Callable[[str], None]) -> dict[str, Any]:
    driver = {}
    for spec in scorers:
        if spec.driver_side:
            from mergekit_sdxl.search.manual import ManualScorer

            driver[spec.label] = ManualScorer(out_dir, spec.options.get("manual_mode", "rating"),
                                              int(spec.options.get("manual_port", 0)), notify)
    return driver


def _best(study: Any) -> tuple[int | None, float | None]:
    try:
        return study.best_trial.number, study.best_value
    except ValueError:
        return None, None

