"""The commit primitives (io/commit.py), the run's input set (io/inputs.py) and signal atomicity (io/signals.py).

Every no-clobber path is exercised: renameat2(RENAME_NOREPLACE), the link()+unlink() fallback, the mkdir()+rename()
fallback for folders and the last-resort checked rename; each must leave a file that appeared at the output name
untouched."""

from __future__ import annotations

import errno
import os
import signal
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from broken_corpus import record  # noqa: E402

from mergekit_sdxl.errors import OutputError
from mergekit_sdxl.io import commit, inputs, signals
from mergekit_sdxl.io.writer import SafetensorsWriter, TensorSpec, save_file

_HUP = getattr(signal, "SIGHUP", signal.SIGTERM)  # Windows (and the portability test mode) have no SIGHUP


def _no_renameat2(monkeypatch) -> None:
    monkeypatch.setattr(commit, "_call_renameat2", lambda src, dst, flags: False)


def _no_link(monkeypatch) -> None:
    def link(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")
    monkeypatch.setattr(os, "link", link)


@pytest.mark.parametrize("way", ["renameat2", "link", "checked"])
def test_file_noreplace_never_clobbers(tmp_path, monkeypatch, way):
    if way != "renameat2":
        _no_renameat2(monkeypatch)
    if way == "checked":
        _no_link(monkeypatch)
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.write_bytes(b"new")
    dst.write_bytes(b"precious")
    with pytest.raises(FileExistsError):
        commit.rename_noreplace(src, dst)
    assert dst.read_bytes() == b"precious" and src.read_bytes() == b"new"
    dst.unlink()
    got = commit.rename_noreplace(src, dst)
    assert dst.read_bytes() == b"new" and not src.exists()
    if way == "renameat2" and commit.libc.renameat2() is not None:
        assert got == "renameat2"
    elif way != "renameat2":
        assert got == way
    record("commit", f"file-noreplace-{way}", True, new=True)


@pytest.mark.parametrize("way", ["renameat2", "mkdir"])
def test_folder_noreplace_never_clobbers(tmp_path, monkeypatch, way):
    if way == "mkdir":
        _no_renameat2(monkeypatch)
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    (src / "f").write_bytes(b"new")
    dst.mkdir()
    with pytest.raises(FileExistsError):
        commit.rename_noreplace(src, dst)  # even an empty folder is not replaced
    assert (src / "f").exists() and list(dst.iterdir()) == []
    dst.rmdir()
    assert commit.rename_noreplace(src, dst) in ("renameat2", "mkdir")
    assert (dst / "f").read_bytes() == b"new" and not src.exists()
    record("commit", f"folder-noreplace-{way}", True, new=True)


@pytest.mark.parametrize("way", ["renameat2", "link", "checked"])
def test_output_that_appears_during_the_run_is_kept(tmp_path, monkeypatch, way):
    """Two merges to one new output: the later must not silently replace the earlier."""
    if way != "renameat2":
        _no_renameat2(monkeypatch)
    if way == "checked":
        _no_link(monkeypatch)
    out = tmp_path / "out.safetensors"
    with pytest.raises(OutputError, match="appeared while the output was being written"):
        with SafetensorsWriter(out, [TensorSpec("a", "F32", (2,))]) as w:
            w.write("a", torch.ones(2))
            out.write_bytes(b"the other run's output")
    assert out.read_bytes() == b"the other run's output"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors"]
    record("commit", f"appeared-during-run-{way}", True, new=True)


def test_overwrite_replaces_only_a_regular_file(tmp_path):
    spec = {"a": torch.ones(2)}
    link = tmp_path / "link.safetensors"
    target = tmp_path / "target.safetensors"
    target.write_bytes(b"precious")
    link.symlink_to(target)
    with pytest.raises(OutputError, match="symbolic link"):
        save_file(spec, link, overwrite=True)
    assert target.read_bytes() == b"precious" and link.is_symlink()
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(OutputError, match="not a regular file"):
        save_file(spec, fifo, overwrite=True)
    with pytest.raises(OutputError, match="not a regular file"):
        commit.check_target("/dev/null", overwrite=True)
    assert Path("/dev/null").is_char_device()
    dangling = tmp_path / "dangling.safetensors"
    dangling.symlink_to(tmp_path / "nowhere")
    with pytest.raises(OutputError, match="symbolic link"):
        save_file(spec, dangling, overwrite=True)
    assert not (tmp_path / "nowhere").exists()
    record("commit", "overwrite-only-regular-files", True, new=True)


def test_input_set_sees_through_links(tmp_path):
    real = tmp_path / "model.safetensors"
    save_file({"a": torch.ones(2)}, real)
    hard = tmp_path / "hard.safetensors"
    os.link(real, hard)
    soft = tmp_path / "soft.safetensors"
    soft.symlink_to(real)
    before = real.read_bytes()
    with inputs.run_scope():
        from mergekit_sdxl.io.reader import open_checkpoint

        with open_checkpoint(soft):
            pass
        for target in (real, hard, soft, tmp_path / "." / "model.safetensors"):
            with pytest.raises(OutputError, match="is one of the inputs"):
                save_file({"a": torch.zeros(2)}, target, overwrite=True)
    assert real.read_bytes() == before
    record("commit", "input-set-links", True, new=True)


def test_input_folder_is_protected(tmp_path):
    folder = tmp_path / "pipe"
    (folder / "unet").mkdir(parents=True)
    (folder / "unet" / "w.safetensors").write_bytes(b"x")
    with inputs.run_scope() as run:
        inputs.note_read(folder)
        assert run.folder_holding(folder / "unet" / "new.safetensors") == folder
        with pytest.raises(OutputError, match="inside the input folder"):
            commit.check_target(folder / "unet" / "new.safetensors", overwrite=True)
        with pytest.raises(OutputError, match="holds the input folder"):
            commit.check_target(tmp_path, overwrite=True, folder=True)
    record("commit", "input-folder", True, new=True)


def test_folder_overwrite_rules(tmp_path):
    out = tmp_path / "out"
    with commit.staged_folder(out) as tmp:
        (tmp / "a.txt").write_text("1")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.txt").write_text("2")
    assert commit.read_manifest(out) == {"a.txt", "sub/b.txt"}
    with pytest.raises(OutputError, match="already exists"):
        commit.check_target(out, overwrite=False, folder=True)
    with commit.staged_folder(out, overwrite=True) as tmp:
        (tmp / "c.txt").write_text("3")
    assert sorted(p.name for p in out.iterdir()) == [commit.MANIFEST, "c.txt"]
    (out / "mine.txt").write_text("user's notes")
    with pytest.raises(OutputError, match="'mine.txt', which mergekit-sdxl did not write"):
        with commit.staged_folder(out, overwrite=True):
            pass
    assert (out / "mine.txt").read_text() == "user's notes"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with commit.staged_folder(empty) as tmp:  # an empty folder holds nothing to lose: no --overwrite needed
        (tmp / "d.txt").write_text("4")
    assert (empty / "d.txt").exists()
    late = tmp_path / "late"
    late.mkdir()
    with pytest.raises(OutputError, match="appeared while the output was being written"):
        with commit.staged_folder(late) as tmp:
            (tmp / "e.txt").write_text("5")
            (late / "theirs.txt").write_text("arrived meanwhile")
    assert sorted(p.name for p in late.iterdir()) == ["theirs.txt"]
    record("commit", "folder-overwrite-rules", True, new=True)


def test_folder_swap_without_exchange(tmp_path, monkeypatch):
    _no_renameat2(monkeypatch)
    out = tmp_path / "out"
    with commit.staged_folder(out) as tmp:
        (tmp / "a.txt").write_text("1")
    with commit.staged_folder(out, overwrite=True) as tmp:
        (tmp / "b.txt").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == [commit.MANIFEST, "b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    record("commit", "folder-swap-fallback", True, new=True)


def test_failed_staging_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        with commit.staged_folder(out) as tmp:
            (tmp / "a.txt").write_text("1")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    record("commit", "staging-interrupted", True, new=True)


def test_signal_during_commit_is_held_and_the_run_counts_as_done(tmp_path, monkeypatch):
    """SIGTERM arriving while the output is renamed into place: the output lands, no Interrupted escapes."""
    real = commit.rename_noreplace

    def slow_rename(src, dst):
        os.kill(os.getpid(), signal.SIGTERM)  # delivered (to our handler) while inside the critical section
        return real(src, dst)

    monkeypatch.setattr(commit, "rename_noreplace", slow_rename)
    out = tmp_path / "out.safetensors"
    with signals.handling():
        save_file({"a": torch.ones(2)}, out)
        assert signals.committed() == [out]
        assert signals.late_signal() == "SIGTERM"
        os.kill(os.getpid(), signal.SIGINT)  # after the commit: recorded only
        assert signals.late_signal() == "SIGINT"
    assert out.exists()
    record("signals", "held-during-commit", True, new=True)


def test_signal_before_commit_interrupts_and_cleans(tmp_path):
    out = tmp_path / "out.safetensors"
    with signals.handling():
        with pytest.raises(signals.Interrupted) as info:
            with SafetensorsWriter(out, [TensorSpec("a", "F32", (2,))]) as w:
                w.write("a", torch.ones(2))
                os.kill(os.getpid(), _HUP)
        assert info.value.exit_code == 128 + _HUP
    assert list(tmp_path.iterdir()) == []
    record("signals", "before-commit", True, new=True)


def test_handlers_are_restored():
    before = {s: signal.getsignal(s) for s in signals.STOP_SIGNALS}
    with signals.handling():
        assert all(signal.getsignal(s) is signals._handler for s in signals.STOP_SIGNALS)
    assert {s: signal.getsignal(s) for s in signals.STOP_SIGNALS} == before


def test_a_finished_process_ignores_stop_signals_while_it_exits():
    """The CLI's own process (restore=False) leaves the stop signals ignored: Python's finalization resets
    Python-level handlers to the default action, so a SIGTERM in the last milliseconds of a completed merge killed
    it (exit -15, no message, output complete); ignored signals stay ignored through finalization."""
    import subprocess

    code = ("import os, signal\n"
            "from mergekit_sdxl.io import signals\n"
            "with signals.handling(restore=False):\n"
            "    pass\n"
            "assert all(signal.getsignal(s) is signal.SIG_IGN for s in signals.STOP_SIGNALS)\n"
            "os.kill(os.getpid(), signal.SIGTERM)\n"
            "print('survived')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stdout.strip()) == (0, "survived"), done.stderr
    record("signals", "ignored-while-exiting", True, new=True)
