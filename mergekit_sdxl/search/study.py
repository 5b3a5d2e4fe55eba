"""The study: Optuna storage and sampler, and the loop that asks for trials, hands them to workers and records them.

One process drives: it asks Optuna for parameters, sends them to a worker (`pools`), prunes after the first
images when their score is below the median of earlier trials, runs the scorers that need a person, writes the
images and tells Optuna the result with everything recorded on the trial (parameters, scores, image paths,
timings, worker). A study lives in its storage (SQLite file by default, any Optuna RDB URL such as PostgreSQL):
re-running the same command continues it; trials cut short by Ctrl-C are marked failed and evaluated again first.
"""

from __future__ import annotations

import os
import re
import socket
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergekit_sdxl.errors import UsageError
from mergekit_sdxl.io.signals import critical
from mergekit_sdxl.search.files import atomic_write
from mergekit_sdxl.search.scoring import ScorerSpec, combine
from mergekit_sdxl.search.space import Dimension, fingerprint
from mergekit_sdxl.search.worker import TrialImage, TrialOutput

ALGORITHMS = ("tpe", "cmaes", "gp", "random")
CONFIG_ATTR = "mergekit_sdxl.config"
DRIVER_ATTR = "mergekit_sdxl.driver"
PRUNE_STARTUP = 5  # trials completed before the median pruner may stop any


@dataclass
class StudyOptions:
    """How to search: storage, study name, budget, algorithm and seed, pruning, output folder."""

    storage: str
    study_name: str
    trials: int
    out_dir: Path
    algorithm: str = "tpe"
    seed: int | None = 0
    prune: bool = True


@dataclass(frozen=True)
class TrialEvent:
    """Reported after each finished trial."""

    number: int
    state: str  # "complete", "pruned", "failed"
    value: float | None
    scores: Mapping[str, float]
    timings: Mapping[str, float]
    done: int
    total: int
    best_number: int | None
    best_value: float | None


@dataclass
class _Running:
    trial: Any
    values: dict[str, Any]
    images: list[str] = field(default_factory=list)
    partial: float | None = None
    phase: str = "begin"


def default_storage(out_dir: Path) -> str:
    """`sqlite:///<out>/study.db` (absolute path)."""
    return f"sqlite:///{(out_dir / 'study.db').resolve()}"


_PASSWORD = re.compile(r"^(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^/?#@:]*):(?P<password>[^/?#@]*)@")


def redact_url(url: str) -> str:
    """The storage URL with its password (`scheme://user:PASSWORD@host`) replaced by `***`, for messages and logs."""
    return _PASSWORD.sub(lambda m: f"{m['head']}:***@", url, count=1)


def redact_text(text: str, url: str) -> str:
    """`text` (e.g. a driver's error message) with the URL's password, wherever it appears, replaced by `***`."""
    match = _PASSWORD.match(url)
    password = match["password"] if match else ""
    if password:
        from urllib.parse import unquote

        for secret in {password, unquote(password)}:
            text = text.replace(secret, "***")
    return text.replace(url, redact_url(url))


def distributions(dims: Sequence[Dimension]) -> dict[str, Any]:
    """Optuna distributions for the dimensions."""
    return {d.name: _distribution(d) for d in dims}


def _distribution(d: Dimension) -> Any:
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    if d.choices is not None:
        return CategoricalDistribution(list(d.choices))
    if d.low is None or d.high is None:  # the space parser gives every range both ends
        raise ValueError(f"dimension {d.name!r}: a range needs low and high")
    return FloatDistribution(d.low, d.high, step=d.step, log=d.log)


def make_sampler(algorithm: str, seed: int | None) -> Any:
    """TPE (multivariate), CMA-ES, GP or random, seeded."""
    import optuna

    if algorithm == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True)
    if algorithm == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed)
    if algorithm == "gp":
        return optuna.samplers.GPSampler(seed=seed)
    if algorithm == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise UsageError(f"--algorithm {algorithm!r}: choose {', '.join(ALGORITHMS)}")


def open_study(options: StudyOptions, config: Mapping[str, Any] | None, must_exist: bool = False) -> Any:
    """Create the study, or load it when it exists (checking it was made with the same settings).

    `config` is what the study records about its recipe, space and scorers (None: only load). The sampler's seed
    is offset by the trials already in the study, so a continued study does not repeat its first suggestions.
    """
    import optuna

    quiet_optuna()
    storage = _storage(options.storage)
    where = redact_url(options.storage)
    names = {s.study_name for s in optuna.get_all_study_summaries(storage)}
    exists = options.study_name in names
    if must_exist and not exists:
        known = ", ".join(sorted(names)) or "none"
        raise UsageError(f"no study {options.study_name!r} in {where} (studies there: {known})")
    if not exists and config is None:
        raise UsageError(f"no study {options.study_name!r} in {where}")
    pruner = optuna.pruners.MedianPruner(n_startup_trials=PRUNE_STARTUP) if options.prune else \
        optuna.pruners.NopPruner()
    probe = optuna.load_study(study_name=options.study_name, storage=storage) if exists else None
    offset = len(probe.trials) if probe is not None else 0
    seed = None if options.seed is None else options.seed + offset
    study = optuna.create_study(storage=storage, study_name=options.study_name, direction="maximize",
                                sampler=make_sampler(options.algorithm, seed), pruner=pruner, load_if_exists=True)
    stored = study.user_attrs.get(CONFIG_ATTR)
    if config is not None:
        if stored is None:
            study.set_user_attr(CONFIG_ATTR, dict(config))
        elif stored.get("fingerprint") != config.get("fingerprint"):
            raise UsageError(f"study {options.study_name!r} in {where} was made with another recipe, space, "
                             "payload or scorers; use the same ones to continue it, or another --study name")
    return study


def study_config(recipe_path: str, model_paths: Mapping[str, str], space: Any, dims: Sequence[Dimension],
                 scorers: Sequence[ScorerSpec], recipe_text: str) -> dict[str, Any]:
    """What a study records about how it was made (the fingerprint covers what must not change on resume)."""
    payload = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(space.payload).items()}
    same = {"recipe": recipe_text, "dims": [d.describe() for d in dims], "payload": payload,
            "scorers": [[s.name, s.weight] for s in scorers]}
    return {"fingerprint": fingerprint(same), "recipe_path": str(Path(recipe_path).resolve()),
            "model_paths": dict(model_paths), "space_text": space.text, "space_source": space.source,
            "dims": same["dims"], "payload": payload,
            "scorers": [{"name": s.name, "weight": s.weight, "options": dict(s.options)} for s in scorers]}


def run_trials(study: Any, pool: Any, dims: Sequence[Dimension], scorers: Sequence[ScorerSpec],
               options: StudyOptions, driver_scorers: Mapping[str, Callable[..., float]] | None = None,
               on_event: Callable[[TrialEvent], None] | None = None) -> int:
    """Run trials until the study has `options.trials` finished (complete or pruned) ones; returns how many ran."""
    import optuna
    from optuna.trial import TrialState

    dists = distributions(dims)
    _retry_interrupted(study)
    finished = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in study.trials)
    idle, ran = list(range(pool.size))[::-1], 0
    running: dict[int, _Running] = {}
    driver = driver_scorers or {}
    try:
        while True:
            while idle and finished + len(running) < options.trials:
                slot = idle.pop()
                # a stop signal is held until the new trial is known (owner, params, in `running`): cut inside
                # ask() it left a RUNNING trial nothing would ever fail or retry (seen against PostgreSQL)
                with critical():
                    trial = study.ask(fixed_distributions=dists)
                    trial.set_user_attr(DRIVER_ATTR, f"{socket.gethostname()}:{os.getpid()}")
                    running[slot] = _Running(trial, dict(trial.params))
                pool.submit(slot, "begin", trial.number, running[slot].values, options.prune)
            if not running:
                return ran
            slot, result = pool.wait()
            run = running[slot]
            if isinstance(result, BaseException):
                del running[slot]
                _record(run, None, "failed", f"{type(result).__name__}: {result}")
                study.tell(run.trial, state=TrialState.FAIL)
                raise result
            if run.phase == "begin":  # the first images are back: record them, maybe prune
                run.phase = "finish"
                run.images += _save(options.out_dir, run.trial.number, result.images)
                run.partial = result.value
                if result.value is not None:
                    run.trial.report(result.value, 0)
                    if run.trial.should_prune():
                        _record(run, result, "pruned")
                        study.tell(run.trial, state=TrialState.PRUNED)
                        finished, ran = finished + 1, ran + 1
                        del running[slot]
                        idle.append(slot)
                        _emit(on_event, study, run, "pruned", None, result, finished, options)
                        continue
                pool.submit(slot, "finish")
                continue
            run.images += _save(options.out_dir, run.trial.number, result.images)
            scores = dict(result.scores)
            start = time.perf_counter()
            for label, scorer in driver.items():
                scores[label] = scorer(run.trial.number, [options.out_dir / p for p in run.images], run.values)
            result.timings["score"] = result.timings.get("score", 0.0) + time.perf_counter() - start
            result.scores = scores
            value = combine(scorers, scores)
            _record(run, result, "complete")
            study.tell(run.trial, value)
            finished, ran = finished + 1, ran + 1
            del running[slot]
            idle.append(slot)
            _emit(on_event, study, run, "complete", value, result, finished, options)
    except BaseException:
        for run in running.values():  # cut short: failed now, evaluated again first when the study continues
            try:
                study.tell(run.trial, state=optuna.trial.TrialState.FAIL)
                study.enqueue_trial(run.values, skip_if_exists=False)
            except Exception:  # noqa: BLE001, S110 - already told (the failing trial itself)
                pass
        raise


def quiet_optuna() -> None:
    """Optuna's per-trial INFO lines and experimental warnings stay out of the user's terminal."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def _storage(url: str) -> Any:
    import optuna

    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}})
    try:
        return optuna.storages.RDBStorage(url)
    except ImportError as exc:  # Optuna wraps the missing driver's ModuleNotFoundError (its cause names the module)
        missing = getattr(exc.__cause__, "name", None) or getattr(exc, "name", None) or "unknown"
        raise UsageError(f"--storage {redact_url(url)}: the database driver {missing!r} is not installed; for "
                         "PostgreSQL use postgresql+psycopg2://... and pip install 'mergekit-sdxl[postgres]'") from None
    except Exception as exc:  # noqa: BLE001 - a bad URL or an unreachable database: one line for the user
        raise UsageError(f"--storage {redact_url(url)}: cannot open the study storage "
                         f"({_first_line(redact_text(str(exc), url))})") from None  # the cause may hold the password


def _first_line(text: str) -> str:
    """The driver's message without SQLAlchemy's hints and background links (one line for the user)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else "no message"


def _retry_interrupted(study: Any) -> None:
    """Trials left RUNNING by a driver on this machine that no longer runs: failed, and queued to run again."""
    from optuna.trial import TrialState

    host = socket.gethostname()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = str(trial.user_attrs.get(DRIVER_ATTR, ""))
        name, _, pid = owner.rpartition(":")
        if name == host and pid.isdigit() and not _alive(int(pid)):
            study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
            study.enqueue_trial(trial.params, skip_if_exists=False)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _save(out_dir: Path, number: int, images: Sequence[TrialImage]) -> list[str]:
    """Write a trial's PNGs under trials/NNNNN/ (atomically: temp name, then rename); relative paths."""
    folder = out_dir / "trials" / f"{number:05d}"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for image in images:
        name = f"p{image.index:03d}_s{image.seed}.png"
        atomic_write(folder / name, image.png)
        paths.append(f"trials/{number:05d}/{name}")
    return paths


def _record(run: _Running, result: TrialOutput | None, state: str, error: str | None = None) -> None:
    trial = run.trial
    trial.set_user_attr("images", run.images)
    trial.set_user_attr("state", state)
    if run.partial is not None:
        trial.set_user_attr("first_images_score", run.partial)
    if result is not None:
        trial.set_user_attr("scores", dict(result.scores))
        trial.set_user_attr("timings", {k: round(v, 4) for k, v in result.timings.items()})
        trial.set_user_attr("worker", result.worker)
    if error:
        trial.set_user_attr("error", error[:2000])


def _emit(on_event: Callable[[TrialEvent], None] | None, study: Any, run: _Running, state: str, value: float | None,
          result: TrialOutput, done: int, options: StudyOptions) -> None:
    if on_event is None:
        return
    try:
        best = study.best_trial
        best_number, best_value = best.number, best.value
    except ValueError:
        best_number = best_value = None
    on_event(TrialEvent(run.trial.number, state, value, dict(result.scores), dict(result.timings), done,
                        options.trials, best_number, best_value))
