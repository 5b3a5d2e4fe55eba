"""`optimize --storage` against a real PostgreSQL server: run, continue (the same command again), then two local
Ray workers on the same study; every trial fully recorded there, no SQLite file written, no password printed.

Runs only when MERGEKIT_TEST_POSTGRES_URL names a database the test may create and delete studies in, e.g.
    MERGEKIT_TEST_POSTGRES_URL='postgresql+psycopg2://mk:PASSWORD@127.0.0.1/mkopt' \\
        .venv/bin/python -m pytest -q -m slow tests/test_search_postgres.py
(needs `pip install 'mergekit-sdxl[postgres]'`; see docs/optimize.md). Without the variable it is skipped.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest
from search_helpers import write_recipe, write_space

URL = os.environ.get("MERGEKIT_TEST_POSTGRES_URL", "")
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900),
              pytest.mark.skipif(not URL, reason="set MERGEKIT_TEST_POSTGRES_URL to a PostgreSQL database URL")]

pytest.importorskip("optuna")
pytest.importorskip("ray")


def _cli(*args: object) -> int:
    from mergekit_sdxl.cli.main import main

    try:
        main([str(a) for a in args])
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def test_postgres_study_runs_continues_and_takes_two_ray_workers(tmp_path, make_ckpt, monkeypatch, capsys):
    import optuna

    from mergekit_sdxl.search.study import _PASSWORD

    here = str(Path(__file__).parent)
    monkeypatch.syspath_prepend(here)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")])))
    a = make_ckpt("sdxl", seed=1)
    recipe = write_recipe(tmp_path, a, make_ckpt(seed=2, like=a, delta="noise:0.5"))
    space = write_space(tmp_path, {"output.alpha[IN04]": [0, 1]})
    out, name = tmp_path / "out", f"pg-test-{uuid.uuid4().hex[:12]}"  # the server may hold other studies
    command = ["optimize", recipe, "--space", space, "--scorer", "python:test_search_study:_brightness", "-o", out,
               "--storage", URL, "--study", name, "--device", "cpu", "--dtype", "fp32", "--threads", "1",
               "--no-prune"]
    try:
        assert _cli(*command, "--trials", "2") == 0
        first = [t.params for t in optuna.load_study(study_name=name, storage=URL).trials]
        assert _cli(*command, "--trials", "3") == 0  # the same command again: the same study continues
        study = optuna.load_study(study_name=name, storage=URL)
        assert [t.params for t in study.trials[:2]] == first and len(study.trials) == 3
        assert _cli(*command, "--trials", "7", "--workers", "2", "--ray-address", "local") == 0
        _check_recorded(optuna.load_study(study_name=name, storage=URL), out, 7)
        assert not (out / "study.db").exists()
        assert (out / "results.csv").read_text().count("\n") == 8 and (out / "best.yaml").is_file()
        assert _cli("optimize", "--resume", "--study", name + "-none", "--storage", URL, "-o", out) == 2
        printed = capsys.readouterr()
        password = (_PASSWORD.match(URL) or {"password": ""})["password"]
        assert "no study" in printed.err and "***@" in printed.err
        if password:
            assert password not in printed.out + printed.err
    finally:
        optuna.delete_study(study_name=name, storage=URL)


def _check_recorded(study, out: Path, trials: int) -> None:
    import optuna

    assert len(study.trials) == trials
    for trial in study.trials:
        attrs = trial.user_attrs
        assert trial.state == optuna.trial.TrialState.COMPLETE and trial.value is not None
        assert attrs["state"] == "complete" and set(attrs["scores"]) == {"_brightness"}
        assert set(attrs["timings"]) == {"merge", "load", "render", "score"}
        assert attrs["images"] and all((out / p).is_file() for p in attrs["images"])
    assert len({t.user_attrs["worker"] for t in study.trials[3:]}) == 2  # both Ray workers ran trials
