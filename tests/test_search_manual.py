"""The manual scorer's page in headless Chromium: it shows the trial's images and its answers become trial values."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from search_helpers import write_recipe, write_space

pytest.importorskip("optuna")


def _run_study_in_thread(tmp_path: Path, pair: tuple[Path, Path], mode: str, trials: int):
    from mergekit_sdxl.search.optimize import OptimizeRequest, optimize

    recipe = write_recipe(tmp_path, *pair)
    space = write_space(tmp_path, {"output.alpha[IN04]": [0, 1]},
                        payload={"prompts": ["1girl"], "negative": "", "seeds": [1, 2], "size": "64x64", "steps": 2})
    urls: list[str] = []
    outcome: dict = {}
    request = OptimizeRequest(out_dir=tmp_path / "out", recipe=recipe, space=space, scorers=["manual"],
                              scorer_options={"manual_mode": mode}, trials=trials, device="cpu", dtype="fp32",
                              threads=1)

    def run() -> None:
        try:
            outcome["result"] = optimize(request, notify=lambda m: urls.append(m.split("open ")[-1].split(" ")[0]))
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, urls, outcome


def _answer(page, trial: int, button: str, images: int) -> None:
    page.wait_for(f"document.getElementById('title').textContent === 'Trial {trial}'", timeout=300)
    page.wait_for(f"Array.from(document.images).filter(i => i.complete && i.naturalWidth === 64).length === {images}",
                  timeout=60)
    page.evaluate(f"document.getElementById('{button}').click()")
    page.wait_for("document.getElementById('status').textContent.startsWith('saved')")


def test_manual_rating_page(tmp_path, make_ckpt, chromium):
    import optuna

    a = make_ckpt("sdxl", seed=1)
    pair = (a, make_ckpt(seed=2, like=a, delta="noise:0.5"))
    thread, urls, outcome = _run_study_in_thread(tmp_path, pair, "rating", trials=2)
    for _ in range(600):
        if urls or outcome:
            break
        thread.join(0.5)
    assert urls, outcome
    page = chromium.open(urls[0])
    _answer(page, 0, "rate-7", images=2)
    _answer(page, 1, "rate-3", images=2)
    thread.join(120)
    assert "error" not in outcome, outcome.get("error")
    study = optuna.load_study(study_name="recipe", storage=f"sqlite:///{tmp_path / 'out' / 'study.db'}")
    assert [t.value for t in study.trials] == [7.0, 3.0]
    # a request without the page's token is refused
    import urllib.error
    import urllib.request

    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(urls[0].split("?")[0] + "state", timeout=5)


@pytest.mark.slow  # the rating page runs in the default suite; this one adds the A/B layout
def test_manual_ab_page_bradley_terry(tmp_path, make_ckpt, chromium):
    import optuna

    a = make_ckpt("sdxl", seed=1)
    pair = (a, make_ckpt(seed=2, like=a, delta="noise:0.5"))
    thread, urls, outcome = _run_study_in_thread(tmp_path, pair, "ab", trials=3)
    for _ in range(600):
        if urls or outcome:
            break
        thread.join(0.5)
    assert urls, outcome
    page = chromium.open(urls[0])
    _answer(page, 1, "choose-B", images=4)  # trial 0 needs no answer; trial 1 (B) beats trial 0 (A)
    assert page.evaluate("document.querySelector('#side-A h2').textContent") == "A (trial 0)"
    _answer(page, 2, "choose-A", images=4)  # the incumbent is now trial 1, and it beats trial 2
    thread.join(120)
    assert "error" not in outcome, outcome.get("error")
    study = optuna.load_study(study_name="recipe", storage=f"sqlite:///{tmp_path / 'out' / 'study.db'}")
    values = [t.value for t in study.trials]
    assert values[0] == 0.0 and values[1] > 0.0 and values[2] < values[1]
