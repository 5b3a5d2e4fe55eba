"""Reproducing published merges end to end: files merged the way A1111 and SuperMerger merge them (their arithmetic,
key selection and metadata, see tests/published_tools.py), then `index` + `recipe-from` + `merge --models-dir
--verify-against` redo them; our own files round trip to byte-identical outputs; short-hash ambiguity and
missing ancestors fail with errors that name the candidates and the indexed folders."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from published_tools import a1111_merge, supermerger_merge
from safetensors.torch import load_file

from mergekit_sdxl.cli.main import main
from mergekit_sdxl.index.store import ModelIndex
from mergekit_sdxl.provenance.verify import distance

POS_IDS = "conditioner.embedders.0.transformer.text_model.embeddings.position_ids"
KOHAKU_MBW = "0,0.1,0.1,0,0.1,0.1,0,0.1,0.1,0,0,0,0,0,0.05,0.05,0.05,0.05,0.05,0.05"
ADD_MBW = "0.5,1,1,0.8,1,1,0.6,1,1,0,0.5,0.5,0.5,0.5,0.25,0.5,1,0.5,0.5,0.2"


def run(capsys, *args: object) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        main(["-q", *map(str, args)])
    out = capsys.readouterr()
    return info.value.code, out.out, out.err


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Three related tiny fp16 SDXL models in one folder: A, B = A fine-tuned, C = A fine-tuned differently."""
    from mergekit_sdxl.synth import write_test_checkpoint

    folder = tmp_path_factory.mktemp("models")
    a = folder / "base.safetensors"
    write_test_checkpoint(a, arch="sdxl", size="tiny", seed=11)
    b = folder / "tuned-b.safetensors"
    write_test_checkpoint(b, seed=12, like=a, delta="noise:0.05")
    c = folder / "tuned-c.safetensors"
    write_test_checkpoint(c, seed=13, like=a, delta="noise:0.05")
    sd1 = folder / "sd1-base.safetensors"  # with the optional keys: scheduler buffers, EMA, markers
    write_test_checkpoint(sd1, arch="sd15", size="tiny", seed=21, include_optional=True)
    sd1b = folder / "sd1-tuned.safetensors"
    write_test_checkpoint(sd1b, seed=22, like=sd1, delta="noise:0.05")
    sd1c = folder / "sd1-other.safetensors"
    write_test_checkpoint(sd1c, seed=23, like=sd1, delta="noise:0.05")
    return {"dir": folder, "a": a, "b": b, "c": c, "sd1a": sd1, "sd1b": sd1b, "sd1c": sd1c}


@pytest.fixture(scope="module")
def index_db(tmp_path_factory, models) -> Path:
    """One index of the models folder for the module (each test's merge re-checks it: nothing is hashed again)."""
    from mergekit_sdxl.index.scan import scan

    db = tmp_path_factory.mktemp("index") / "index.sqlite3"
    with ModelIndex(db) as index:
        scan(index, [models["dir"]])
    return db


CASES = {
    "a1111-weighted-sum": lambda m, out: a1111_merge(out, m["a"], m["b"], None, "Weighted sum", 0.3),
    "a1111-add-difference": lambda m, out: a1111_merge(out, m["a"], m["b"], m["c"], "Add difference", 0.7),
    "supermerger-weight-sum-mbw": lambda m, out: supermerger_merge(out, m["a"], m["b"], None, "Weight sum",
                                                                   KOHAKU_MBW),
    "supermerger-add-difference-mbw": lambda m, out: supermerger_merge(out, m["a"], m["b"], m["c"],
                                                                       "Add difference", ADD_MBW),
    "a1111-sd1-add-difference": lambda m, out: a1111_merge(out, m["sd1a"], m["sd1b"], m["sd1c"], "Add difference",
                                                           0.45),
    "supermerger-2025-06-add-difference-mbw": lambda m, out: supermerger_merge(out, m["a"], m["b"], m["c"],
                                                                               "Add difference", ADD_MBW,
                                                                               version="2025-01"),
}
DATES = {"supermerger-2025-06-add-difference-mbw": "2025-06-01"}  # SuperMerger records none: given to recipe-from
# largest distance expected in fp16 ulps: SuperMerger's weight sum is an fp32 torch.lerp (one rounding of its own)
EXPECTED_ULPS = {"a1111-weighted-sum": 0, "a1111-add-difference": 0, "a1111-sd1-add-difference": 0,
                 "supermerger-weight-sum-mbw": 1,
                 "supermerger-add-difference-mbw": 0, "supermerger-2025-06-add-difference-mbw": 0}


@pytest.mark.parametrize("case", list(CASES))
def test_published_merge_is_reproduced(tmp_path, capsys, models, index_db, case):
    published = CASES[case](models, tmp_path / f"{case}.safetensors")
    db = index_db
    recipe = tmp_path / "repro.yaml"
    dated = ["--date", DATES[case]] if case in DATES else []
    code, _, err = run(capsys, "recipe-from", published, "-o", recipe, "--db", db, *dated)
    assert code == 0, err
    ours = tmp_path / "out" / "repro.safetensors"
    ours.parent.mkdir()
    code, out, err = run(capsys, "merge", recipe, "--models-dir", models["dir"], "--db", db, "-o", ours,
                         "--verify-against", published, "--json")
    assert code == 0, err
    verdict = json.loads(out)["verify"]
    assert verdict["passed"] and verdict["max_ulps"] == EXPECTED_ULPS[case], verdict
    # checked independently of the report: every published tensor against ours
    mine, theirs = load_file(ours), load_file(published)
    assert set(mine) == set(theirs)
    worst = max(distance(mine[k], theirs[k], "F16", 0)[0] for k in theirs if theirs[k].is_floating_point())
    assert worst == EXPECTED_ULPS[case]
    if EXPECTED_ULPS[case] == 0:
        assert verdict["identical"]
    # A1111's arithmetic turns integer keys it merges into floats (SDXL position_ids, SD1 model_ema.num_updates);
    # the reproduction keeps the integers: same values, another dtype, so only there the AutoV3 differs
    floated = [k.split(" ")[0] for k in verdict["dtype_mismatch"]]
    assert floated == {"a1111-weighted-sum": [POS_IDS], "a1111-add-difference": [POS_IDS],
                       "a1111-sd1-add-difference": ["model_ema.num_updates"]}.get(case, [])
    assert verdict["autov3_match"] == (EXPECTED_ULPS[case] == 0 and not floated)


def test_the_reproduction_depends_on_what_the_metadata_says(tmp_path, capsys, models, index_db):
    """A perturbed multiplier in the recipe gives a merge that verification rejects (the check has teeth)."""
    published = a1111_merge(tmp_path / "p.safetensors", models["a"], models["b"], None, "Weighted sum", 0.3)
    db = index_db
    recipe = tmp_path / "r.yaml"
    assert run(capsys, "recipe-from", published, "-o", recipe, "--db", db)[0] == 0
    data = yaml.safe_load(recipe.read_text())
    data["steps"]["merged"]["alpha"] = 0.31
    recipe.write_text(yaml.safe_dump(data))
    code, _, err = run(capsys, "merge", recipe, "--models-dir", models["dir"], "--db", db,
                       "-o", tmp_path / "o.safetensors", "--verify-against", published)
    assert code == 7 and "NOT reproduced" in err


def test_missing_ancestor(tmp_path, capsys, models):
    published = a1111_merge(tmp_path / "p.safetensors", models["a"], models["b"], models["c"], "Add difference", 1)
    elsewhere = tmp_path / "partial"
    elsewhere.mkdir()
    for name in ("a", "b"):  # model C is not on this machine
        (elsewhere / models[name].name).symlink_to(models[name])
    db = tmp_path / "index.sqlite3"
    assert run(capsys, "index", elsewhere, "--db", db)[0] == 0
    code, out, _ = run(capsys, "recipe-from", published, "--tree", "--db", db)
    assert code == 0
    lines = {line.split(":")[0].strip("├└─ │"): line for line in out.splitlines()[1:]}
    assert "[present:" in lines["A"] and "[present:" in lines["B"] and "[absent]" in lines["C"]
    assert "tuned-c.safetensors" in lines["C"]
    recipe = tmp_path / "r.yaml"
    assert run(capsys, "recipe-from", published, "-o", recipe, "--db", db)[0] == 0
    code, _, err = run(capsys, "merge", recipe, "--models-dir", elsewhere, "--db", db, "-o", tmp_path / "o.safetensors")
    assert code == 3 and "models.model_c" in err and "no indexed file has sha256" in err
    assert str(elsewhere.resolve()) in err and not (tmp_path / "o.safetensors").exists()


def test_ambiguous_short_hash_in_a_recipe(tmp_path, capsys, models):
    db = tmp_path / "index.sqlite3"
    assert run(capsys, "index", models["dir"], "--db", db)[0] == 0
    with ModelIndex(db) as index:  # make two different files share an AutoV2 (a 1-in-10^12 event, staged)
        rows = {row.name: row for row in index.entries()}
        index.put(replace(rows["tuned-b.safetensors"], sha256="feedc0ffee" + rows["tuned-b.safetensors"].sha256[10:]))
        index.put(replace(rows["tuned-c.safetensors"], sha256="feedc0ffee" + rows["tuned-c.safetensors"].sha256[10:]))
    recipe = tmp_path / "r.yaml"
    recipe.write_text("models:\n  a: {autov2: 'feedc0ffee'}\n  b: {path: " + str(models["a"]) + "}\n"
                      "steps:\n  m: {method: weighted_sum, a: a, b: b, alpha: 0.5}\n")
    code, _, err = run(capsys, "merge", recipe, "--db", db, "-o", tmp_path / "o.safetensors")
    assert code == 3 and "ambiguous" in err and "tuned-b.safetensors" in err and "tuned-c.safetensors" in err


ROUND_TRIP = """\
name: round trip
convention: supermerger-2023
models:
  a: {path: %(a)s}
  b: {path: %(b)s, sha256: %(b_sha)s}
  c: %(c)s
steps:
  delta: "b - c"
  mid:
    method: weighted_sum
    a: a
    b: b
    alpha: [0, 0.1, 0.1, 0, 0.1, 0.1, 0, 0.1, 0.1, 0, 0, 0, 0, 0, 0.05, 0.05, 0.05, 0.05, 0.05, 0.05]
  tw:
    method: add_difference
    a: mid
    b: b
    c: c
    convention: sd-mecha
    alpha: {value: {IN04: 0.3, default: 0.1}, overrides: [{match: "attn2", value: 0.0}]}
  out: "tw + 0.5 * delta"
output: {dtype: bf16, seed: 7, metadata: {modelspec.author: someone, modelspec.title: Custom Title}}
"""


def test_our_own_file_round_trips_to_identical_bytes(tmp_path, capsys, models, index_db):
    import hashlib

    sha_b = hashlib.sha256(models["b"].read_bytes()).hexdigest()
    original = tmp_path / "orig.yaml"
    original.write_text(ROUND_TRIP % {"a": models["a"], "b": models["b"], "b_sha": sha_b, "c": models["c"]})
    first = tmp_path / "one" / "merged.safetensors"
    first.parent.mkdir()
    assert run(capsys, "merge", original, "-o", first)[0] == 0
    db = index_db
    recipe = tmp_path / "again.yaml"
    assert run(capsys, "recipe-from", first, "-o", recipe)[0] == 0
    text = recipe.read_text()
    assert f"sha256: {sha_b}" in text and "autov3:" in text and str(models["a"]) not in text
    second = tmp_path / "two" / "merged.safetensors"
    second.parent.mkdir()
    code, out, err = run(capsys, "merge", recipe, "--models-dir", models["dir"], "--db", db, "-o", second,
                         "--verify-against", first, "--json")
    assert code == 0, err
    assert second.read_bytes() == first.read_bytes()
    assert json.loads(out)["verify"]["autov3_match"]


def test_hash_named_model_without_an_index_creates_nothing(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("models:\n  a: {autov2: 'feedc0ffee'}\n  b: x.safetensors\nsteps:\n  m: 0.5 * a + 0.5 * b\n")
    db = tmp_path / "none.sqlite3"
    code, _, err = run(capsys, "merge", recipe, "--db", db, "-o", tmp_path / "o.safetensors")
    assert code == 3 and "models.a is named by hash and there is no model index" in err
    assert not db.exists() and not (tmp_path / "o.safetensors").exists()
