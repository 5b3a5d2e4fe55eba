"""Trials spread over Ray workers: two local CPU Ray workers finish the same trials in less wall time than one Ray
worker (both pay Ray's start-up), and every trial is fully recorded in the one shared storage (the driver is its
only writer)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from search_helpers import write_recipe, write_space

pytest.importorskip("ray")
pytest.importorskip("optuna")


@pytest.mark.slow  # starts a local Ray (~10-30 s) and runs four studies of 12 trials
@pytest.mark.timeout(1800)
def test_two_ray_workers_beat_one_and_record_every_trial(tmp_path, make_ckpt, monkeypatch):
    import optuna
    import ray

    from mergekit_sdxl.search.pools import RAY_OBJECT_STORE

    here = str(Path(__file__).parent)
    monkeypatch.syspath_prepend(here)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")])))
    a = make_ckpt("sdxl", seed=1)
    recipe = write_recipe(tmp_path, a, make_ckpt(seed=2, like=a, delta="noise:0.5"))
    space = write_space(tmp_path, {"output.alpha[IN04]": [0, 1], "output.alpha[OUT04]": [0, 1]},
                        payload={"prompts": ["1girl"], "negative": "", "seeds": [1, 2], "size": "64x64", "steps": 4,
                                 "batch_size": 2})
    gain = _spare_core_gain()
    if gain < 1.3:  # measured, not assumed: on a saturated machine two processes cannot beat one
        pytest.skip(f"this machine runs two CPU-bound processes only {gain:.2f}x faster than one right now (no spare "
                    "core): the two-worker speed-up cannot be measured here; rerun when the machine is less busy")
    seconds = {}
    # one local Ray for every run (each pays the same: actors starting, inputs opened once per actor)
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=RAY_OBJECT_STORE, log_to_driver=False)
    try:
        _run_both(tmp_path, recipe, space, seconds, optuna)
    finally:
        ray.shutdown()
    print(f"\n1 Ray worker: {seconds[1]:.1f} s; 2 Ray workers: {seconds[2]:.1f} s (12 trials each, two runs "
          "of each in the order 1, 2, 2, 1)")
    after = _spare_core_gain()
    if seconds[2] >= seconds[1] and after < 1.3:  # the spare core went away while the studies ran
        pytest.skip(f"the machine's spare core went away during the test (two processes {after:.2f}x one); "
                    f"measured 1 worker {seconds[1]:.1f} s, 2 workers {seconds[2]:.1f} s")
    assert seconds[2] < seconds[1], seconds


def _spin(n: int) -> int:
    total = 0
    for i in range(n):
        total += i * i
    return total


def _spare_core_gain(n: int = 3_000_000) -> float:
    """Throughput of two CPU-bound processes relative to one, as the machine gives it now."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    with context.Pool(2) as pool:
        pool.map(_spin, [1000, 1000])  # both processes started before timing
        start = time.perf_counter()
        pool.apply(_spin, (n,))
        one = time.perf_counter() - start
        start = time.perf_counter()
        pool.map(_spin, [n, n], chunksize=1)
        two = time.perf_counter() - start
    return 2 * one / two


def _run_both(tmp_path: Path, recipe: Path, space: Path, seconds: dict, optuna) -> None:
    from mergekit_sdxl.search.optimize import OptimizeRequest, optimize

    # order 1, 2, 2, 1 so that a change in the machine's load during the test weighs on both counts alike
    for run, workers in enumerate((1, 2, 2, 1)):
        out = tmp_path / f"out{run}"
        request = OptimizeRequest(out_dir=out, recipe=recipe, space=space,
                                  scorers=["python:test_search_study:_brightness"], trials=12, device="cpu",
                                  dtype="fp32", threads=1, workers=workers, prune=False,
                                  ray_address="local")
        start = time.perf_counter()
        optimize(request, notify=lambda m: None)
        seconds[workers] = seconds.get(workers, 0.0) + time.perf_counter() - start
        study = optuna.load_study(study_name="recipe", storage=f"sqlite:///{out / 'study.db'}")
        assert len(study.trials) == 12
        for trial in study.trials:
            attrs = trial.user_attrs
            assert trial.state == optuna.trial.TrialState.COMPLETE and trial.value is not None
            assert attrs["state"] == "complete" and set(attrs["scores"]) == {"_brightness"}
            assert set(attrs["timings"]) == {"merge", "load", "render", "score"}
            assert len(attrs["images"]) == 2 and all((out / p).is_file() for p in attrs["images"])
        used = {t.user_attrs["worker"] for t in study.trials}
        assert len(used) == workers, used
