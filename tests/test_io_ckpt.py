"""`.ckpt/.pt/.pth` loading: weights only, never unpickling arbitrary objects."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from mergekit_sdxl.errors import CheckpointError
from mergekit_sdxl.io.ckpt import TorchCheckpoint, load_state_dict
from mergekit_sdxl.io.reader import open_checkpoint


class _SideEffect:
    """Unpickling this writes a marker file: proof that code ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_pickle_does_not_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"a": torch.ones(2)}, "payload": _SideEffect(str(marker))}, path)
    with pytest.raises(CheckpointError, match="refused for safety") as info:
        open_checkpoint(path)
    assert "evil.ckpt" in str(info.value)
    assert "weights_only` set to `False`" not in str(info.value)  # never suggest the unsafe way
    assert not marker.exists()


def test_malicious_legacy_pickle_does_not_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"a": _SideEffect(str(marker))}, f, protocol=2)
    with pytest.raises(CheckpointError, match="refused for safety"):
        open_checkpoint(path)
    assert not marker.exists()


@pytest.mark.parametrize("zipped", [True, False])
def test_unwraps_state_dict(tmp_path, zipped):
    tensors = {"model.diffusion_model.w": torch.randn(3, 4).half(), "cond.position_ids": torch.arange(77)}
    path = tmp_path / "m.ckpt"
    torch.save({"state_dict": tensors, "global_step": 470000, "epoch": 3}, path,
               _use_new_zipfile_serialization=zipped)
    with open_checkpoint(path) as ckpt:
        assert isinstance(ckpt, TorchCheckpoint)
        assert ckpt.keys() == list(tensors) and ckpt.metadata == {}
        for key, t in tensors.items():
            info = ckpt.info(key)
            assert info.shape == tuple(t.shape) and info.nbytes == t.numel() * t.element_size()
            assert torch.equal(ckpt.read(key), t)


def test_nested_state_dict_and_plain_dict(tmp_path):
    torch.save({"state_dict": {"state_dict": {"a": torch.ones(1)}}}, tmp_path / "n.pth")
    assert list(load_state_dict(tmp_path / "n.pth")) == ["a"]
    torch.save({"a": torch.ones(1)}, tmp_path / "p.pt")
    assert list(load_state_dict(tmp_path / "p.pt")) == ["a"]


def test_non_tensor_leaves_refused(tmp_path):
    torch.save({"state_dict": {"a": torch.ones(1), "step": 5}}, tmp_path / "m.ckpt")
    with pytest.raises(CheckpointError, match="'step' holds a int"):
        open_checkpoint(tmp_path / "m.ckpt")
    torch.save([torch.ones(1)], tmp_path / "l.ckpt")
    with pytest.raises(CheckpointError, match="not a dict"):
        open_checkpoint(tmp_path / "l.ckpt")


def test_corrupt_zip(tmp_path):
    path = tmp_path / "m.ckpt"
    torch.save({"a": torch.ones(100)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="m.ckpt"):
        open_checkpoint(path)
    assert os.path.exists(path)


# ---------------------------------------------------------------------------------------- hostile and faulty files


def _refused(path, match):
    with pytest.raises(CheckpointError, match=match) as info:
        open_checkpoint(path)
    assert str(path.name) in str(info.value) and "\n" not in str(info.value)


def test_dict_that_contains_itself(tmp_path):
    d: dict = {}
    d["state_dict"] = d
    torch.save(d, tmp_path / "self.ckpt")
    _refused(tmp_path / "self.ckpt", "contains itself")
    flat: dict = {"a": torch.ones(1)}
    flat["b"] = flat
    torch.save(flat, tmp_path / "flat.ckpt")
    _refused(tmp_path / "flat.ckpt", "contains itself")


def test_state_dict_nesting_limit(tmp_path):
    obj: dict = {"a": torch.ones(1)}
    for _ in range(20):
        obj = {"state_dict": obj}
    torch.save(obj, tmp_path / "deep.ckpt")
    _refused(tmp_path / "deep.ckpt", "nested more than")


@pytest.mark.parametrize("zipped", [True, False])
def test_expanded_and_overlapping_views_refused(tmp_path, zipped):
    base = torch.ones(4)
    for name, t in {"stride0": base[:1].expand(1_000_000), "overlap": torch.ones(8).as_strided((3, 3), (1, 1))}.items():
        path = tmp_path / f"{name}.ckpt"
        torch.save({"w": t}, path, _use_new_zipfile_serialization=zipped)
        _refused(path, "repeat elements")


def test_strided_views_read_correctly(tmp_path):
    base = torch.arange(24, dtype=torch.float32)
    tensors = {"a": base.reshape(4, 6), "t": base.reshape(4, 6).t(), "s": base[3:9], "e": base[:0],
               "step": base.reshape(4, 6)[:, ::2]}
    torch.save(tensors, tmp_path / "views.ckpt")
    with open_checkpoint(tmp_path / "views.ckpt") as ckpt:
        for key, t in tensors.items():
            got = ckpt.read(key)
            assert got.is_contiguous() and torch.equal(got, t), key


def test_storage_reused_too_often_refused(tmp_path):
    w = torch.ones(1024)
    torch.save({f"k{i}": w for i in range(2000)}, tmp_path / "amp.ckpt")
    _refused(tmp_path / "amp.ckpt", "only 4096 are stored")
    torch.save({"a": w, "b": w}, tmp_path / "tied.ckpt")  # tied weights stay fine
    with open_checkpoint(tmp_path / "tied.ckpt") as ckpt:
        assert torch.equal(ckpt.read("b"), w)


@pytest.mark.parametrize("kind", ["meta", "sparse", "quantized"])
def test_non_dense_tensors_refused(tmp_path, kind):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = {"meta": lambda: torch.ones(3, device="meta"), "sparse": lambda: torch.eye(3).to_sparse(),
             "quantized": lambda: torch.quantize_per_tensor(torch.ones(3), 0.1, 0, torch.quint8)}[kind]()
    torch.save({"w": t}, tmp_path / f"{kind}.ckpt")
    _refused(tmp_path / f"{kind}.ckpt", "tensor 'w'|not a readable")


def test_storage_size_lies(tmp_path):
    """The pickle declares a bigger storage than the zip member holds: refused before any read."""
    import struct
    import zipfile

    path = tmp_path / "lie.ckpt"
    torch.save({"w": torch.zeros(16)}, path)
    with zipfile.ZipFile(path) as z:
        members = {n: z.read(n) for n in z.namelist()}
    pkl = next(n for n in members if n.endswith("data.pkl"))
    members[pkl] = members[pkl].replace(b"K\x10", b"J" + struct.pack("<i", 1 << 30))
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for n, blob in members.items():
            z.writestr(n, blob)
    _refused(path, "declares a 4294967296-byte storage")


def test_truncated_while_reading_is_an_error_not_sigbus(tmp_path):
    path = tmp_path / "big.ckpt"
    torch.save({"a": torch.ones(1 << 16), "b": torch.ones(1 << 16)}, path)
    with open_checkpoint(path) as ckpt:
        assert torch.equal(ckpt.read("a"), torch.ones(1 << 16))
        os.truncate(path, 4096)  # another program cuts the file while we read it
        with pytest.raises(CheckpointError, match="unexpected end of file"):
            ckpt.read("b")


def test_big_endian_refused(tmp_path):
    import zipfile

    path = tmp_path / "be.ckpt"
    torch.save({"w": torch.ones(2)}, path)
    with zipfile.ZipFile(path) as z:
        members = {n: z.read(n) for n in z.namelist()}
    name = next(n for n in members if n.endswith("/byteorder"))
    members[name] = b"big"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for n, blob in members.items():
            z.writestr(n, blob)
    _refused(path, "'big'-endian")
