"""optimize end to end on tiny models: recovery of a known block weight, resume, reproducibility, outputs."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest
from search_helpers import render_references, write_recipe, write_space

pytest.importorskip("optuna")


@pytest.fixture(scope="module")
def pair(make_ckpt) -> tuple[Path, Path]:
    a = make_ckpt("sdxl", seed=1)
    return a, make_ckpt(seed=2, like=a, delta="noise:0.5")


def _request(tmp_path: Path, recipe: Path, space: Path, scorers: list[str], **kw):
    from mergekit_sdxl.search.optimize import OptimizeRequest

    options = kw.pop("scorer_options", {})
    return OptimizeRequest(out_dir=tmp_path / "out", recipe=recipe, space=space, scorers=scorers,
                           scorer_options=options, device="cpu", dtype="fp32", threads=1, **kw)


def _study(out: Path, name: str = "recipe"):
    import optuna

    return optuna.load_study(study_name=name, storage=f"sqlite:///{out / 'study.db'}")


@pytest.mark.slow  # 30 trials: ~100 s on a busy 2-core machine
def test_reference_scorer_recovers_the_changed_block(tmp_path, pair):
    """References rendered with IN04 = 0.6 (OUT04 unchanged at 0): the search finds both within 0.15."""
    from mergekit_sdxl.search.optimize import optimize

    recipe = write_recipe(tmp_path, *pair)
    space = write_space(tmp_path, {"output.alpha[IN04]": [0, 1], "output.alpha[OUT04]": [0, 1]})
    refs = render_references(recipe, space, {"output.alpha[IN04]": 0.6, "output.alpha[OUT04]": 0.0},
                             tmp_path / "refs")
    result = optimize(_request(tmp_path, recipe, space, ["reference"], trials=30,
                               scorer_options={"reference": refs}), notify=lambda m: None)
    best = _study(tmp_path / "out").best_trial
    assert result.best_number == best.number and len(_study(tmp_path / "out").trials) == 30
    assert abs(best.params["output.alpha[IN04]"] - 0.6) <= 0.15, best.params
    assert abs(best.params["output.alpha[OUT04]"] - 0.0) <= 0.15, best.params
    # the best recipe runs as written and holds the found values in the searched blocks, zeros elsewhere
    from mergekit_sdxl.recipe import load_recipe

    found = load_recipe(result.outputs["best"])
    alpha = list(next(p for p in found.steps["output"].params if p.name == "alpha").blocks)
    assert alpha[5] == pytest.approx(best.params["output.alpha[IN04]"])
    assert alpha[15] == pytest.approx(best.params["output.alpha[OUT04]"])
    assert [v for i, v in enumerate(alpha) if i not in (5, 15)] == [0.0] * 18


def _brightness(images, context):
    import numpy as np

    return float(np.mean([np.asarray(i.image, dtype=float).mean() for i in images]))


_PENDING_INTERRUPT: list[int] = []


def _interrupt_once(images, context):
    """Ctrl-C during the scoring of the trial numbered in _PENDING_INTERRUPT (once)."""
    if context["trial"] in _PENDING_INTERRUPT:
        _PENDING_INTERRUPT.remove(context["trial"])
        raise KeyboardInterrupt
    return _brightness(images, context)


def test_resume_after_interrupt_continues_the_same_study(tmp_path, pair, monkeypatch):
    from mergekit_sdxl.search.optimize import optimize

    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    recipe = write_recipe(tmp_path, *pair)
    space = write_space(tmp_path, {"output.alpha[IN04]": [0, 1]})
    _PENDING_INTERRUPT[:] = [2]
    scorer = ["python:test_search_study:_interrupt_once"]
    with pytest.raises(KeyboardInterrupt):
        optimize(_request(tmp_path, recipe, space, scorer, trials=4, prune=False), notify=lambda m: None)
    first = _study(tmp_path / "out")
    states = [t.state.name for t in first.trials]
    assert states == ["COMPLETE", "COMPLETE", "FAIL", "WAITING"]  # the cut-short trial is queued again
    cut = first.trials[2].params
    # the same command again: the study continues, the cut-short trial runs again first
    result = optimize(_request(tmp_path, recipe, space, scorer, trials=4, prune=False), notify=lambda m: None)
    assert result.trials_run == 2
    study = _study(tmp_path / "out")
    assert study._study_id == first._study_id
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    assert study.trials[3].params == cut


def test_fixed_seed_reproduces_trials_exactly(tmp_path, pair, monkeypatch):
    from mergekit_sdxl.search.optimize import optimize

    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    recipe = write_recipe(tmp_path, *pair)
    space = write_space(tmp_path, {"output.alpha[IN04]": [0, 1], "output.alpha[M00]": {"low": 0, "high": 1,
                                                                                          "step": 0.05}})
    runs = []
    for name in ("one", "two"):
        optimize(_request(tmp_path, recipe, space, ["python:test_search_study:_brightness"], trials=3, seed=7,
                          study=name), notify=lambda m: None)
        runs.append([(t.params, t.value, t.user_attrs["scores"]) for t in _study(tmp_path / "out", name).trials])
    assert runs[0] == runs[1]
    assert len({tuple(p.values()) for p, _, _ in runs[0]}) == 3  # three different points, not one repeated
    assert all(p["output.alpha[M00]"] * 20 == pytest.approx(round(p["output.alpha[M00]"] * 20)) for p, _, _ in runs[0])


def test_seed_changes_the_suggestions():
    """The seed is what fixes the sequence (a different seed gives other points), for every algorithm."""
    import optuna

    from mergekit_sdxl.search.study import make_sampler, quiet_optuna

    quiet_optuna()
    dists = {"x": optuna.distributions.FloatDistribution(0, 1), "y": optuna.distributions.FloatDistribution(0, 1)}

    def points(algorithm: str, seed: int) -> list[dict]:
        study = optuna.create_study(sampler=make_sampler(algorithm, seed), direction="maximize")
        for _ in range(4):
            trial = study.ask(dists)
            study.tell(trial, -(trial.params["x"] - 0.3) ** 2)
        return [t.params for t in study.trials]

    for algorithm in ("tpe", "cmaes", "gp", "random"):
        assert points(algorithm, 1) == points(algorithm, 1)
        assert points(algorithm, 1) != points(algorithm, 2)


def test_outputs_record_every_trial_and_report_offline(tmp_path, pair, monkeypatch, chromium):
    from mergekit_sdxl.search.optimize import optimize

    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    recipe = write_recipe(tmp_path, *pair)
    space = write_space(tmp_path, {"output.alpha[IN04]": [0, 1], "output.alpha[OUT04]": [0, 1]},
                        payload={"prompts": ["a", "b"], "negative": "", "seeds": [1, 2], "size": "64x64", "steps": 2,
                                 "batch_size": 2})
    result = optimize(_request(tmp_path, recipe, space, ["python:test_search_study:_brightness:2"], trials=3,
                               top_k=2), notify=lambda m: None)
    out = tmp_path / "out"
    study = _study(out)
    for trial in study.trials:
        attrs = trial.user_attrs
        assert attrs["state"] == "complete" and len(attrs["images"]) == 4
        assert all((out / p).is_file() for p in attrs["images"])
        assert set(attrs["timings"]) == {"merge", "load", "render", "score"}
        assert trial.value == pytest.approx(2 * attrs["scores"]["_brightness"])
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [int(r["number"]) for r in rows] == [0, 1, 2]
    assert float(rows[0]["output.alpha[IN04]"]) == pytest.approx(study.trials[0].params["output.alpha[IN04]"])
    page = result.outputs["report"].read_text()
    assert "Optimisation history" in page and "Parallel coordinates" in page and "plotly" in page.lower()
    assert not re.search(r"<script[^>]+src=", page), "the report must not load scripts from the network"
    view = chromium.open(result.outputs["report"].resolve().as_uri())  # plotly inlined: the plots draw from file://
    view.wait_for("document.querySelectorAll('.plotly-graph-div .main-svg').length >= 2", timeout=60)
    view.wait_for("Array.from(document.images).filter(i => i.complete && i.naturalWidth > 0).length === 2")
    assert sorted(p.name for p in (out / "topk").iterdir()) == [
        f"rank01_trial{study.best_trial.number:05d}.png", f"rank02_trial{_second(study):05d}.png"]


def _second(study) -> int:
    return sorted(study.trials, key=lambda t: -t.value)[1].number
