"""SafetensorsReader: strict header validation, reads, read_into, read_part_into, and open_checkpoint dispatch."""

from __future__ import annotations

import json
import struct
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from safetensors.torch import save_file as st_save_file

from mergekit_sdxl.errors import CheckpointError
from mergekit_sdxl.io.reader import MAX_HEADER, SafetensorsReader, open_checkpoint, sniff


def _raw_file(path, header: bytes | str, data: bytes = b"") -> None:
    header = header.encode() if isinstance(header, str) else header
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)


def _entry(dtype="F32", shape=(2,), offsets=(0, 8)) -> dict:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


@pytest.fixture
def sample(tmp_path):
    tensors = {"w": torch.randn(4, 3), "pos": torch.arange(5), "h": torch.randn(7).half(),
               "bf": torch.randn(2, 2).bfloat16(), "f8": torch.randn(3).to(torch.float8_e5m2),
               "flag": torch.tensor([True, False]), "empty": torch.zeros(0, 4), "scalar": torch.tensor(2.5)}
    path = tmp_path / "m.safetensors"
    st_save_file(tensors, path, metadata={"a": "1"})
    return path, tensors


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


def test_reads_every_tensor(sample):
    path, tensors = sample
    with SafetensorsReader(path) as r:
        assert r.metadata == {"a": "1"}
        assert sorted(r.keys()) == sorted(tensors)
        offsets = [r.info(k).start for k in r.keys()]
        assert offsets == sorted(offsets)  # file order
        for key, t in tensors.items():
            got = r.read(key)
            assert got.dtype == t.dtype and got.shape == t.shape and torch.equal(_bits(got), _bits(t))
            assert r.read_bytes(key) == _bits(t).numpy().tobytes()


def test_read_into_reuses_buffer(sample):
    path, tensors = sample
    buf = torch.empty(1024, dtype=torch.uint8)
    with SafetensorsReader(path) as r:
        got = r.read_into("w", buf)
        assert got.data_ptr() == buf.data_ptr() and torch.equal(got, tensors["w"])
        assert torch.equal(r.read_into("h", buf), tensors["h"])
        with pytest.raises(ValueError, match="too small"):
            r.read_into("w", torch.empty(4, dtype=torch.uint8))
        with pytest.raises(ValueError):
            r.read_into("w", torch.empty(64, dtype=torch.float32))


def test_read_part_into_reads_a_slice(sample):
    path, tensors = sample
    buf = torch.empty(64, dtype=torch.uint8)
    with SafetensorsReader(path) as r:
        got = r.read_part_into("w", 5, 4, buf)
        assert got.data_ptr() == buf.data_ptr() and torch.equal(got, tensors["w"].reshape(-1)[5:9])
        assert torch.equal(r.read_part_into("h", 6, 1, buf), tensors["h"][6:])
        assert r.read_part_into("bf", 0, 0, buf).numel() == 0
        with pytest.raises(ValueError, match="outside"):
            r.read_part_into("h", 6, 2, buf)
        with pytest.raises(ValueError, match="too small"):
            r.read_part_into("w", 0, 12, torch.empty(40, dtype=torch.uint8))


def test_parallel_reads(sample):
    path, tensors = sample
    with SafetensorsReader(path) as r, ThreadPoolExecutor(4) as pool:
        results = list(pool.map(r.read, list(tensors) * 20))
    assert all(torch.equal(_bits(a), _bits(tensors[k])) for a, k in zip(results, list(tensors) * 20))


def test_missing_key_names_file_and_key(sample):
    path, _ = sample
    with SafetensorsReader(path) as r, pytest.raises(CheckpointError, match=r"m\.safetensors.*'nope'"):
        r.read("nope")


def test_metadata_null_and_absent(tmp_path):
    _raw_file(tmp_path / "a.safetensors", json.dumps({"__metadata__": None, "x": _entry()}), b"\0" * 8)
    assert SafetensorsReader(tmp_path / "a.safetensors").metadata == {}
    _raw_file(tmp_path / "b.safetensors", json.dumps({"x": _entry()}) + "    ", b"\0" * 8)
    assert SafetensorsReader(tmp_path / "b.safetensors").keys() == ["x"]


BAD_HEADERS = {
    "invalid json": ('{"x": ', b""),
    "invalid utf-8": (b'{"x\xff": 1}', b""),
    "not an object": ("[1, 2]", b""),
    "entry not an object": ('{"x": [1]}', b""),
    "unknown dtype": (json.dumps({"x": _entry(dtype="F7")}), b"\0" * 8),
    "sub-byte dtype": (json.dumps({"x": _entry(dtype="F4")}), b"\0" * 8),
    "shape size mismatch": (json.dumps({"x": _entry(shape=(3,))}), b"\0" * 8),
    "negative dim": (json.dumps({"x": _entry(shape=(-2,))}), b"\0" * 8),
    "bool dim": (json.dumps({"x": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}), b"\0" * 4),
    "float offsets": (json.dumps({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0.0, 8.0]}}), b"\0" * 8),
    "missing offsets": (json.dumps({"x": {"dtype": "F32", "shape": [2]}}), b"\0" * 8),
    "offsets beyond data": (json.dumps({"x": _entry(offsets=(8, 16))}), b"\0" * 8),
    "reversed offsets": (json.dumps({"x": _entry(offsets=(8, 0))}), b"\0" * 8),
    "overlap": (json.dumps({"x": _entry(), "y": _entry(offsets=(4, 12))}), b"\0" * 12),
    "gap": (json.dumps({"x": _entry(offsets=(4, 12))}), b"\0" * 12),
    "trailing bytes": (json.dumps({"x": _entry()}), b"\0" * 9),
    "duplicate key": ('{"x": ' + json.dumps(_entry()) + ', "x": ' + json.dumps(_entry()) + "}", b"\0" * 8),
    "duplicate metadata key": ('{"__metadata__": {"a": "1", "a": "2"}}', b""),
    "metadata not strings": (json.dumps({"__metadata__": {"a": 1}}), b""),
    "metadata not object": (json.dumps({"__metadata__": "x"}), b""),
}


@pytest.mark.parametrize("case", list(BAD_HEADERS))
def test_bad_headers_refused(tmp_path, case):
    header, data = BAD_HEADERS[case]
    path = tmp_path / "bad.safetensors"
    _raw_file(path, header, data)
    with pytest.raises(CheckpointError, match="bad.safetensors"):
        SafetensorsReader(path)


def test_header_length_beyond_file_refused(tmp_path):
    path = tmp_path / "t.safetensors"
    path.write_bytes(struct.pack("<Q", 1000) + b"{}")
    with pytest.raises(CheckpointError, match="past the end"):
        SafetensorsReader(path)


def test_huge_header_length_refused_without_allocating(tmp_path, monkeypatch):
    path = tmp_path / "t.safetensors"
    path.write_bytes(struct.pack("<Q", 2**63) + b"{}")
    allocations = []
    real = bytearray
    monkeypatch.setattr("builtins.bytearray", lambda n=0, *a: allocations.append(n) or real(n, *a))
    with pytest.raises(CheckpointError, match="exceeds"):
        SafetensorsReader(path)
    assert max(allocations, default=0) <= 8
    path.write_bytes(struct.pack("<Q", MAX_HEADER + 1) + b"{}")
    with pytest.raises(CheckpointError, match="exceeds"):
        SafetensorsReader(path)


def test_short_and_missing_files(tmp_path):
    (tmp_path / "s.safetensors").write_bytes(b"abc")
    with pytest.raises(CheckpointError, match="too short"):
        SafetensorsReader(tmp_path / "s.safetensors")
    with pytest.raises(CheckpointError, match="cannot open"):
        SafetensorsReader(tmp_path / "nope.safetensors")
    with pytest.raises(CheckpointError, match="no such file"):
        open_checkpoint(tmp_path / "nope.safetensors")


def test_open_checkpoint_dispatch(tmp_path, sample):
    path, tensors = sample
    assert isinstance(open_checkpoint(path), SafetensorsReader)
    renamed = tmp_path / "model.weights"  # unknown extension: sniffed
    renamed.write_bytes(path.read_bytes())
    assert sniff(renamed) == "safetensors"
    assert isinstance(open_checkpoint(renamed), SafetensorsReader)
    torch.save({"state_dict": {"a": torch.ones(2)}}, tmp_path / "m.ckpt")
    ckpt = open_checkpoint(tmp_path / "m.ckpt")
    assert ckpt.keys() == ["a"] and ckpt.info("a").dtype == "F32"
    (tmp_path / "junk.bin").write_bytes(b"hello world, not a model")
    with pytest.raises(CheckpointError, match="not a safetensors or PyTorch"):
        open_checkpoint(tmp_path / "junk.bin")


@pytest.mark.parametrize("length", [0x280, 0x380, 0x480, 0x580])
def test_sniff_a_header_length_that_looks_like_a_pickle_opcode(tmp_path, length):
    """A header length of 128 + 256*k (k = 2..5) starts with the bytes `\\x80\\x0k`, pickle's PROTO opcode."""
    import json
    import struct

    header = json.dumps({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    header += b" " * (length - len(header))
    path = tmp_path / "m.safetensors"
    path.write_bytes(struct.pack("<Q", length) + header + b"\0\0\0\0")
    assert sniff(path) == "safetensors"
    with open_checkpoint(path) as reader:
        assert reader.read("a").tolist() == [0.0]
    pickled = tmp_path / "m.ckpt"
    torch.save({"a": torch.ones(1)}, pickled, _use_new_zipfile_serialization=False)
    assert sniff(pickled) == "torch-pickle"
