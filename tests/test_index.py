"""The model index: incremental hashing (size + mtime + inode), renames, vanished files, hash lookups with
ambiguity and missing-hash errors, concurrent runs, a corrupt database, and the `index` command."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mergekit_sdxl.cli.main import main
from mergekit_sdxl.errors import RecipeError, UsageError
from mergekit_sdxl.index.resolve import lookup
from mergekit_sdxl.index.scan import plan_scan, run_scan, scan
from mergekit_sdxl.index.store import ModelIndex
from mergekit_sdxl.io.hashes import hash_file


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MERGEKIT_SDXL_CACHE_DIR", str(tmp_path / "cache"))


def _small(path: Path, seed: int, metadata: dict[str, str] | None = None) -> Path:
    """A small safetensors file with SDXL fingerprint keys (a few KB), distinct per seed."""
    g = torch.Generator().manual_seed(seed)
    tensors = {"conditioner.embedders.1.model.ln_final.weight": torch.randn(8, generator=g).half(),
               "model.diffusion_model.input_blocks.0.0.weight": torch.randn(4, 4, 3, 3, generator=g).half()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path, metadata=metadata)
    return path


@pytest.fixture
def models(tmp_path) -> Path:
    folder = tmp_path / "models"
    _small(folder / "a.safetensors", 1)
    _small(folder / "sub" / "b.safetensors", 2, {"sd_merge_recipe": json.dumps({"type": "webui"})})
    (folder / "notes.txt").write_text("not a model")
    _small(folder / ".hidden.safetensors", 3)  # temporaries and hidden files are skipped
    return folder


def run_cli(capsys, *args: object) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        main([str(a) for a in args])
    out = capsys.readouterr()
    return info.value.code, out.out, out.err


def test_scan_records_hashes_and_header_facts(tmp_path, models):
    with ModelIndex(tmp_path / "db") as index:
        report = scan(index, [models])
        assert report.files == 2 and len(report.hashed) == 2 and not report.failed
        a = index.get(os.path.realpath(models / "a.safetensors"))
        expected = hash_file(models / "a.safetensors")
        assert (a.sha256, a.autov3, a.legacy) == (expected.sha256, expected.autov3, expected.legacy)
        assert (a.kind, a.arch, a.dtype, a.tensors, a.merge_type) == ("checkpoint", "sdxl", "F16", 2, None)
        b = index.get(os.path.realpath(models / "sub" / "b.safetensors"))
        assert b.merge_type == "webui" and json.loads(b.merge_recipe) == {"type": "webui"}
        assert index.roots() == [os.path.realpath(models)]


def test_second_run_hashes_nothing_and_changes_are_noticed(tmp_path, models, monkeypatch):
    calls: list[str] = []
    import mergekit_sdxl.io.hashes as hashes_module

    real = hashes_module.hashes_for
    monkeypatch.setattr(hashes_module, "hashes_for", lambda p, progress=None: calls.append(p) or real(p, progress))
    with ModelIndex(tmp_path / "db") as index:
        scan(index, [models])
        assert len(calls) == 2
        calls.clear()
        again = scan(index, [models])
        assert calls == [] and again.unchanged == 2 and not again.hashed
        a = models / "a.safetensors"
        _small(a, 11)  # new content: size may stay, mtime/inode change
        changed = scan(index, [models])
        assert calls == [os.path.realpath(a)] and changed.hashed == [os.path.realpath(a)]
        assert index.get(os.path.realpath(a)).sha256 == hashlib.sha256(a.read_bytes()).hexdigest()
        os.utime(a, ns=(0, 123))  # only the mtime: still hashed again
        calls.clear()
        scan(index, [models])
        assert calls == [os.path.realpath(a)]


def test_rename_keeps_hashes_and_vanished_files_are_forgotten(tmp_path, models, monkeypatch):
    with ModelIndex(tmp_path / "db") as index:
        scan(index, [models])
        old = os.path.realpath(models / "sub" / "b.safetensors")
        sha = index.get(old).sha256
        import mergekit_sdxl.io.hashes as hashes_module

        monkeypatch.setattr(hashes_module, "hashes_for", lambda *a, **k: pytest.fail("a rename must not re-hash"))
        os.rename(old, models / "b-renamed.safetensors")
        report = scan(index, [models])
        assert (report.renamed, report.removed) == (1, 1)
        assert index.get(old) is None
        assert index.get(os.path.realpath(models / "b-renamed.safetensors")).sha256 == sha
        os.unlink(models / "a.safetensors")
        assert scan(index, [models]).removed == 1
        assert [e.name for e in index.entries()] == ["b-renamed.safetensors"]


def test_rows_outside_the_scanned_folder_are_kept(tmp_path, models):
    other = _small(tmp_path / "elsewhere" / "c.safetensors", 5)
    with ModelIndex(tmp_path / "db") as index:
        scan(index, [models, other])
        scan(index, [models / "sub"])  # a subfolder: nothing outside it is forgotten
        assert len(index.entries()) == 3


def test_fifo_and_missing_targets(tmp_path, models):
    os.mkfifo(models / "pipe.safetensors")  # would block a naive reader forever
    with ModelIndex(tmp_path / "db") as index:
        assert scan(index, [models]).files == 2
        with pytest.raises(UsageError, match="no such folder or file"):
            plan_scan(index, [tmp_path / "nope"])


def test_unreadable_header_is_recorded_not_fatal(tmp_path, models):
    (models / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with ModelIndex(tmp_path / "db") as index:
        report = scan(index, [models])
        assert not report.failed
        row = index.get(os.path.realpath(models / "broken.safetensors"))
        assert row.sha256 and row.error and "JSON" in row.error and row.kind == "other"


def test_lookup_by_each_hash_and_copies(tmp_path, models):
    shutil.copy(models / "a.safetensors", models / "a-copy.safetensors")
    with ModelIndex(tmp_path / "db") as index:
        scan(index, [models])
        a = index.get(os.path.realpath(models / "a.safetensors"))
        for field, value in (("sha256", a.sha256), ("autov2", a.sha256[:10]), ("autov3", a.autov3[:12]),
                             ("autov3", a.autov3.upper())):
            match = lookup(index, field, value, "models.a")
            assert match.entry.sha256 == a.sha256 and match.copies == 1


def test_ambiguous_short_hash_lists_the_candidates(tmp_path, models):
    with ModelIndex(tmp_path / "db") as index:
        scan(index, [models])
        rows = index.entries()
        # two different files whose sha256 share their first 10 hex digits (AutoV2 collides)
        index.put(replace(rows[0], sha256="abcdef0123" + "1" * 54))
        index.put(replace(rows[1], sha256="abcdef0123" + "2" * 54))
        with pytest.raises(RecipeError) as info:
            lookup(index, "autov2", "ABCDEF0123", "model.anxl3")
        message = str(info.value)
        assert "model.anxl3" in message and "ambiguous" in message and "2 different files" in message
        assert rows[0].path in message and rows[1].path in message
        assert lookup(index, "sha256", "abcdef01232", "m").entry.path == rows[1].path  # more digits decide
        with pytest.raises(RecipeError, match="too short"):
            lookup(index, "autov2", "abc", "m")


def test_missing_hash_names_the_indexed_folders(tmp_path, models):
    with ModelIndex(tmp_path / "db") as index:
        with pytest.raises(RecipeError, match="has no folders yet"):
            lookup(index, "sha256", "0" * 64, "models.x")
        scan(index, [models])
        with pytest.raises(RecipeError) as info:
            lookup(index, "sha256", "0" * 64, "models.x")
        assert "models.x" in str(info.value) and os.path.realpath(models) in str(info.value)


def test_changed_file_no_longer_matches_its_old_hash(tmp_path, models):
    with ModelIndex(tmp_path / "db") as index:
        scan(index, [models])
        a = models / "a.safetensors"
        old = index.get(os.path.realpath(a)).sha256
        _small(a, 99)
        with pytest.raises(RecipeError, match="changed or gone"):
            lookup(index, "sha256", old, "models.a")
        new = hashlib.sha256(a.read_bytes()).hexdigest()
        assert lookup(index, "sha256", new, "models.a").entry.path == os.path.realpath(a)  # re-hashed on lookup


def test_corrupt_or_newer_database_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.sqlite3"
    bad.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(UsageError, match="not a usable index database"):
        ModelIndex(bad)
    newer = tmp_path / "newer.sqlite3"
    ModelIndex(newer).close()
    db = sqlite3.connect(newer)
    db.execute("PRAGMA user_version = 99")
    db.close()
    with pytest.raises(UsageError, match="newer mergekit-sdxl"):
        ModelIndex(newer)


def test_two_runs_at_once_share_one_database(tmp_path):
    folder = tmp_path / "many"
    for i in range(6):
        _small(folder / f"m{i}.safetensors", 100 + i)
    db = tmp_path / "shared.sqlite3"
    cmd = [sys.executable, "-m", "mergekit_sdxl.cli.main", "-q", "index", str(folder), "--db", str(db)]
    env = {**os.environ, "MERGEKIT_SDXL_CACHE_DIR": str(tmp_path / "c1")}
    procs = [subprocess.Popen(cmd, env={**env, "MERGEKIT_SDXL_CACHE_DIR": str(tmp_path / f"c{i}")},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(2)]
    results = [p.communicate(timeout=120) + (p.returncode,) for p in procs]
    assert all(code == 0 for *_, code in results), results
    with ModelIndex(db) as index:
        rows = index.entries()
        assert len(rows) == 6 and all(r.sha256 == hashlib.sha256(Path(r.path).read_bytes()).hexdigest()
                                      for r in rows)
        assert sqlite3.connect(db).execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_progress_counts_every_hashed_byte(tmp_path, models):
    seen: list[int] = []
    with ModelIndex(tmp_path / "db") as index:
        plan = plan_scan(index, [models])
        report = run_scan(index, plan, seen.append)
    assert sum(seen) == plan.bytes_to_hash == report.bytes_hashed > 0


def test_cli_index_list_find_json(tmp_path, models, capsys):
    db = tmp_path / "db.sqlite3"
    code, out, _ = run_cli(capsys, "index", models, "--db", db, "--json")
    assert code == 0 and json.loads(out)["files"] == 2
    code, out, _ = run_cli(capsys, "index", models, "--db", db)
    assert code == 0 and "0 hashed" in out and "2 unchanged" in out
    code, out, _ = run_cli(capsys, "index", "--list", "--db", db)
    a = hash_file(models / "a.safetensors")
    assert code == 0 and a.autov2 in out and "b.safetensors" in out and "carries a merge recipe" in out
    code, out, _ = run_cli(capsys, "index", "--find", a.autov3_short, "--db", db, "--json")
    found = json.loads(out)
    assert code == 0 and [f["sha256"] for f in found] == [a.sha256] and found[0]["matched"] == "autov3"
    code, out, err = run_cli(capsys, "index", "--find", "0" * 12, "--db", db)
    assert code == 2 and "no indexed file" in err and os.path.realpath(models) in err
    code, _, err = run_cli(capsys, "index", "--find", "xyz", "--db", db)
    assert code == 2 and "not a hash" in err
    code, _, err = run_cli(capsys, "index", "--db", db)
    assert code == 2 and "give folders" in err


def test_default_database_lives_in_the_cache_folder(tmp_path, models, capsys):
    code, out, _ = run_cli(capsys, "index", models)
    assert code == 0 and (tmp_path / "cache" / "index.sqlite3").exists()


def _recipe(tmp_path: Path, models_yaml: str):
    from mergekit_sdxl.recipe.load import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text(f"models:\n{models_yaml}steps:\n  s: 0.5 * a + 0.5 * b\n")
    return load_recipe(path)


def test_resolve_models_by_each_hash_and_path_checks(tmp_path, models):
    from mergekit_sdxl.index.resolve import resolve_models

    with ModelIndex(tmp_path / "db") as index:
        scan(index, [models])
        a = index.get(os.path.realpath(models / "a.safetensors"))
        b = index.get(os.path.realpath(models / "sub" / "b.safetensors"))
        recipe = _recipe(tmp_path, f"  a: {{autov3: '{a.autov3[:12]}', autov2: '{a.autov2}'}}\n"
                                   f"  b: {{path: gone.safetensors, sha256: {b.sha256}}}\n")
        resolved = resolve_models(recipe, index)
        assert resolved.models["a"].path == a.path and resolved.models["b"].path == b.path
        assert resolved.models["b"].sha256 == b.sha256  # the pin stays: the merge checks it again
        # a path that exists wins, but its locators must describe it
        ok = _recipe(tmp_path, f"  a: {{path: {models / 'a.safetensors'}, autov2: '{a.autov2}'}}\n  b: x\n")
        assert resolve_models(ok, index).models["a"].path == str(models / "a.safetensors")
        wrong = _recipe(tmp_path, f"  a: {{path: {models / 'a.safetensors'}, autov2: '{b.autov2}'}}\n  b: x\n")
        with pytest.raises(RecipeError, match=r"models\.a: .*a\.safetensors has AutoV2 .* not " + b.autov2):
            resolve_models(wrong, index)
        mixed = _recipe(tmp_path, f"  a: {{sha256: {a.sha256}, autov3: '{b.autov3[:12]}'}}\n  b: x\n")
        with pytest.raises(RecipeError, match="name different files"):
            resolve_models(mixed, index)
        plain = _recipe(tmp_path, "  a: x.safetensors\n  b: y.safetensors\n")
        assert resolve_models(plain, index) == plain  # nothing named by hash: untouched


def test_set_up_retries_a_lock_that_sqlite_reports_without_waiting(tmp_path, monkeypatch):
    """Two runs switching a new database to WAL at once: SQLite may answer "database is locked" at once (it skips
    the busy handler where waiting could deadlock). The set-up tries again instead of calling the file unusable."""
    from mergekit_sdxl.index import store

    real, calls = store._open_once, []

    def flaky(path, where):
        calls.append(path)
        if len(calls) <= 2:
            raise sqlite3.OperationalError("database is locked")
        return real(path, where)

    monkeypatch.setattr(store, "_open_once", flaky)
    ModelIndex(tmp_path / "db.sqlite3").close()
    assert len(calls) == 3


def test_a_lock_held_past_the_busy_timeout_is_one_clear_error(tmp_path, monkeypatch):
    from mergekit_sdxl.index import store

    def locked(path, where):
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(store, "_open_once", locked)
    monkeypatch.setattr(store, "BUSY_TIMEOUT_MS", 200)
    with pytest.raises(UsageError, match="locked by another program"):
        ModelIndex(tmp_path / "db.sqlite3")
