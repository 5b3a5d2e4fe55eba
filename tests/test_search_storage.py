"""Study storage handling that needs no database server and no torch: a storage URL's password never reaches a
message, and a stop signal arriving while Optuna creates a trial leaves no trial RUNNING for ever."""

from __future__ import annotations

import os
import signal

import pytest

from mergekit_sdxl.errors import UsageError
from mergekit_sdxl.search.study import redact_text, redact_url


@pytest.mark.parametrize(("url", "shown"), [
    ("postgresql+psycopg2://mk:s3cret@db.example:5432/opt", "postgresql+psycopg2://mk:***@db.example:5432/opt"),
    ("postgresql://mk:p%40ss%3Aw@127.0.0.1/opt?sslmode=require", "postgresql://mk:***@127.0.0.1/opt?sslmode=require"),
    ("mysql+pymysql://root:@localhost/opt", "mysql+pymysql://root:***@localhost/opt"),
    ("postgresql://mk@db/opt", "postgresql://mk@db/opt"),  # no password: unchanged
    ("postgresql://db:5432/opt", "postgresql://db:5432/opt"),  # a port is not a password
    ("sqlite:////tmp/a:b@c/study.db", "sqlite:////tmp/a:b@c/study.db"),  # a path, no credentials
])
def test_redact_url_hides_only_the_password(url, shown):
    assert redact_url(url) == shown


def test_redact_text_hides_the_password_raw_and_percent_decoded():
    url = "postgresql://mk:p%40ss@db/opt"
    text = f"cannot connect to {url}: password 'p@ss' refused (p%40ss)"
    assert redact_text(text, url) == "cannot connect to postgresql://mk:***@db/opt: password '***' refused (***)"


def test_storage_errors_name_the_url_without_its_password():
    pytest.importorskip("optuna")
    from mergekit_sdxl.search.study import StudyOptions, open_study

    # port 1 on localhost refuses at once; with the driver missing the message says which one to install
    options = StudyOptions("postgresql+psycopg2://mk:s3cretPW@127.0.0.1:1/opt", "s", 1, out_dir=None)  # type: ignore[arg-type]
    with pytest.raises(UsageError) as info:
        open_study(options, None, must_exist=True)
    message = str(info.value)
    assert "s3cretPW" not in message and "mk:***@127.0.0.1:1" in message and "\n" not in message


def test_a_stop_signal_inside_ask_fails_and_requeues_that_trial(tmp_path):
    optuna = pytest.importorskip("optuna")
    from optuna.trial import TrialState

    from mergekit_sdxl.io import signals
    from mergekit_sdxl.search.scoring import ScorerSpec
    from mergekit_sdxl.search.space import Dimension
    from mergekit_sdxl.search.study import StudyOptions, run_trials
    from mergekit_sdxl.search.worker import TrialOutput

    class SignalOnThirdTrial(optuna.samplers.RandomSampler):
        def sample_independent(self, study, trial, name, distribution):  # inside study.ask()
            if trial.number == 2 and not study.user_attrs.get("signalled"):
                study.set_user_attr("signalled", True)
                os.kill(os.getpid(), signal.SIGINT)
            return super().sample_independent(study, trial, name, distribution)

    class Pool:
        size = 1

        def submit(self, slot, phase, *args):
            self.phase = phase

        def wait(self):
            return 0, TrialOutput(scores={"s": 1.0}, value=None if self.phase == "begin" else 1.0)

    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'study.db'}", direction="maximize",
                                sampler=SignalOnThirdTrial(seed=0))
    dims = [Dimension("x", (), low=0.0, high=1.0)]
    options = StudyOptions("unused", "s", 5, tmp_path, prune=False)
    with signals.handling(restore=True), pytest.raises(KeyboardInterrupt):
        run_trials(study, Pool(), dims, [ScorerSpec("python:m:s")], options)
    trials = study.get_trials(deepcopy=False)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2 + [TrialState.FAIL, TrialState.WAITING]
    assert trials[3].system_attrs["fixed_params"] == trials[2].params  # evaluated again first on continuing
