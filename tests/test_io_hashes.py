"""Legacy / AutoV2 / AutoV3 hashes against hashlib on whole-file reads."""

from __future__ import annotations

import hashlib
import os

import pytest
import torch
from safetensors.torch import save_file

from mergekit_sdxl.io import hashes
from mergekit_sdxl.io.hashes import cache_file, cached_hashes, hash_file, hashes_for, legacy_hash, store_cached_hashes


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MERGEKIT_SDXL_CACHE_DIR", str(tmp_path / "cache"))


def _reference(data: bytes, safetensors: bool) -> dict[str, str | None]:
    n = int.from_bytes(data[:8], "little")
    return {
        "legacy": hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8],
        "sha256": hashlib.sha256(data).hexdigest(),
        "autov3_full": hashlib.sha256(data[8 + n:]).hexdigest() if safetensors else None,
    }


@pytest.mark.parametrize("chunk", [1 << 16, 1000, 8 << 20])
@pytest.mark.parametrize("size", [0, 10, 0x100000 - 1, 0x100000 + 5, 0x110000, 3_000_001])
def test_random_files_match_hashlib(tmp_path, size, chunk):
    data = os.urandom(size)
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    seen = []
    h = hash_file(path, progress=seen.append, chunk_size=chunk)
    ref = _reference(data, safetensors=False)
    assert (h.legacy, h.sha256, h.autov3) == (ref["legacy"], ref["sha256"], None)
    assert h.autov2 == ref["sha256"][:10] and size == sum(seen)
    assert legacy_hash(path) == ref["legacy"]


@pytest.mark.parametrize("chunk", [1 << 16, 777, 8 << 20])
def test_safetensors_autov3(tmp_path, chunk):
    tensors = {"a": torch.randn(300_000), "b": torch.arange(1000)}
    save_file(tensors, tmp_path / "a.safetensors", metadata={"x": "1"})
    save_file(tensors, tmp_path / "b.safetensors", metadata={"x": "a much longer value " * 50})
    ha = hash_file(tmp_path / "a.safetensors", chunk_size=chunk)
    hb = hash_file(tmp_path / "b.safetensors", chunk_size=chunk)
    data = (tmp_path / "a.safetensors").read_bytes()
    ref = _reference(data, safetensors=True)
    assert (ha.legacy, ha.sha256, ha.autov3_full) == (ref["legacy"], ref["sha256"], ref["autov3_full"])
    assert ha.autov3_short == ref["autov3_full"][:12] and ha.autov3 == ha.autov3_full
    assert ha.autov3_full == hb.autov3_full  # metadata edits keep AutoV3
    assert ha.sha256 != hb.sha256


def test_small_file_legacy_is_hash_of_empty_slice(tmp_path):
    # A1111's model_hash seeks to 1 MiB and hashes what it reads there: nothing, for a small file
    (tmp_path / "s.safetensors").write_bytes(b"x" * 1000)
    assert hash_file(tmp_path / "s.safetensors").legacy == hashlib.sha256(b"").hexdigest()[:8] == "e3b0c442"


def test_hand_computed_legacy(tmp_path):
    data = bytes(0x100000) + b"\x01" * 0x10000 + b"\x02" * 100
    (tmp_path / "f").write_bytes(data)
    assert hash_file(tmp_path / "f").legacy == hashlib.sha256(b"\x01" * 0x10000).hexdigest()[:8]


def test_truncated_safetensors_has_no_autov3(tmp_path):
    (tmp_path / "t.safetensors").write_bytes((500).to_bytes(8, "little") + b"{" + b" " * 10)
    assert hash_file(tmp_path / "t.safetensors").autov3_full is None


def test_persistent_cache(tmp_path, monkeypatch):
    path = tmp_path / "f.bin"
    path.write_bytes(b"abc" * 1000)
    assert cached_hashes(path) is None
    calls = []
    real = hashes.hash_file
    monkeypatch.setattr(hashes, "hash_file", lambda p, progress=None: calls.append(p) or real(p, progress))
    first = hashes_for(path)
    assert cache_file().is_file() and cache_file().parent == tmp_path / "cache"
    assert cached_hashes(path) == first and hashes_for(path) == first and len(calls) == 1
    path.write_bytes(b"abcd" * 1000)  # new size and mtime: stale entry ignored, hashed again
    assert cached_hashes(path) is None
    assert hashes_for(path).sha256 == hashlib.sha256(b"abcd" * 1000).hexdigest() and len(calls) == 2


def test_store_and_corrupt_cache(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"x")
    h = hashes.FileHashes("12345678", "ab" * 32, None)
    store_cached_hashes(path, h)
    assert cached_hashes(path) == h
    cache_file().write_text("{not json")
    assert cached_hashes(path) is None
    store_cached_hashes(path, h)  # a corrupt cache is replaced, not fatal
    assert cached_hashes(path) == h


def test_as_dict(tmp_path):
    (tmp_path / "f").write_bytes(b"x")
    d = hash_file(tmp_path / "f").as_dict()
    assert set(d) == {"legacy", "autov2", "autov3", "autov3_full", "sha256"}
