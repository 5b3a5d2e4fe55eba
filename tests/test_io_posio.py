"""Positional I/O (mergekit_sdxl.io.posio): every strategy returns the file's bytes, from any thread, and writes
land where they are asked to; the fallback is what runs when os.pread/os.pwrite are missing."""

from __future__ import annotations

import os
import random
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mergekit_sdxl.io import posio
from mergekit_sdxl.io.posio import STRATEGIES, PositionalFile

SIZE = 1 << 16
DATA = random.Random(7).randbytes(SIZE)
AVAILABLE = [s for s in STRATEGIES if s != "pread" or posio.NATIVE]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("posio") / "data.bin"
    path.write_bytes(DATA)
    return path


def _open(path: Path, strategy: str) -> PositionalFile:
    return PositionalFile(os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0)), strategy, path=path)


@pytest.mark.parametrize("strategy", AVAILABLE)
@settings(max_examples=60, deadline=None, derandomize=True)
@given(reads=st.lists(st.tuples(st.integers(0, SIZE), st.integers(0, 5000)), min_size=1, max_size=8))
def test_reads_return_the_files_bytes(data_file, strategy, reads):
    with _open(data_file, strategy) as f:
        for offset, size in reads:
            size = min(size, SIZE - offset)
            buf = bytearray(size)
            f.readinto(memoryview(buf), offset)
            assert bytes(buf) == DATA[offset : offset + size]


@pytest.mark.parametrize("strategy", AVAILABLE)
def test_reading_past_the_end_is_an_eof_error_naming_the_offset(data_file, strategy):
    with _open(data_file, strategy) as f:
        with pytest.raises(EOFError, match=f"byte {SIZE}"):
            f.read(SIZE - 10, 20)


class _SlowSeek:
    """A file whose seek yields to other threads before returning: makes a missing lock show up every time."""

    def __init__(self, file: object) -> None:
        self.file = file

    def seek(self, offset: int) -> int:
        result = self.file.seek(offset)
        time.sleep(0.0001)
        return result

    def __getattr__(self, name: str) -> object:
        return getattr(self.file, name)


@pytest.mark.parametrize("strategy", AVAILABLE)
def test_concurrent_reads_from_many_threads_never_mix_offsets(data_file, strategy):
    """The locked strategy shares one file position: without its lock, threads would read each other's offsets."""
    errors: list[str] = []
    with _open(data_file, strategy) as f:
        if f._file is not None:
            f._file = _SlowSeek(f._file)
        def worker(seed: int) -> None:
            rng = random.Random(seed)
            for _ in range(300):
                offset, size = rng.randrange(SIZE - 4096), rng.randrange(1, 4096)
                if f.read(offset, size) != DATA[offset : offset + size]:
                    errors.append(f"thread {seed}: wrong bytes at {offset}")
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == []


class _ShortReads(PositionalFile):
    """Returns at most 1000 bytes per call, as a read interrupted by a signal or over 2 GiB does."""

    def _read_some(self, view: memoryview, offset: int) -> int:
        return super()._read_some(view[:1000], offset)


@pytest.mark.parametrize("strategy", AVAILABLE)
def test_short_reads_are_continued(data_file, strategy):
    fd = os.open(data_file, os.O_RDONLY | getattr(os, "O_BINARY", 0))
    with _ShortReads(fd, strategy, path=data_file) as f:
        assert f.read(123, 40_000) == DATA[123:40_123]


WRITERS = [s for s in ("pread", "locked") if s != "pread" or posio.NATIVE]


@pytest.mark.parametrize("strategy", WRITERS)
def test_writes_at_offsets_in_any_order_from_threads_give_the_same_file(tmp_path, strategy):
    path = tmp_path / "out.bin"
    chunks = [(i, DATA[i : i + 4096]) for i in range(0, SIZE, 4096)]
    random.Random(3).shuffle(chunks)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    with PositionalFile(fd, strategy, writable=True) as f:
        if f._file is not None:
            f._file = _SlowSeek(f._file)
        os.ftruncate(f.fd, SIZE)
        threads = [threading.Thread(target=lambda part: [f.write(memoryview(c), o) for o, c in part],
                                    args=(chunks[k::4],)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert path.read_bytes() == DATA


def test_read_only_strategies_refuse_writes(tmp_path):
    path = tmp_path / "x.bin"
    path.write_bytes(b"abc")
    for strategy in ("handles", "mmap"):
        with _open(path, strategy) as f, pytest.raises(ValueError, match="read-only"):
            f.write(memoryview(b"z"), 0)
    assert path.read_bytes() == b"abc"


def test_per_thread_handles_notice_a_replaced_file(tmp_path):
    path = tmp_path / "x.bin"
    path.write_bytes(DATA)
    with _open(path, "handles") as f:
        replacement = tmp_path / "y.bin"
        replacement.write_bytes(bytes(SIZE))
        os.replace(replacement, path)
        with pytest.raises(OSError, match="replaced"):
            f.read(0, 10)


def test_close_is_idempotent_and_closes_the_descriptor(data_file):
    f = _open(data_file, "locked")
    fd = f.fd
    f.close()
    f.close()
    with pytest.raises(OSError):
        os.fstat(fd)


def test_default_follows_the_platform():
    """Native calls where this Python has them; the locked fallback otherwise (the portability test mode)."""
    calls = posio.native_calls()
    native = calls["pwrite"] and (calls["preadv"] or calls["pread"])
    assert posio.DEFAULT == ("pread" if native else "locked")
    assert native == hasattr(os, "pwrite")
    if os.environ.get("MERGEKIT_TEST_HIDE_POSIX") == "1":
        assert posio.DEFAULT == "locked" and not any(calls.values())
    if not native:
        fd = os.open(__file__, os.O_RDONLY)
        try:
            with pytest.raises(ValueError, match="not available"):
                PositionalFile(fd, "pread")
        finally:
            os.close(fd)


@pytest.mark.skipif(not posio.NATIVE, reason="needs os.pread (the fallback is tested above)")
def test_pread_without_preadv_copies_the_same_bytes(data_file, monkeypatch):
    """macOS before 11 has pread but no preadv."""
    monkeypatch.setattr(posio, "_PREADV", None)
    with _open(data_file, "pread") as f:
        assert f.read(1000, 30_000) == DATA[1000:31_000]
