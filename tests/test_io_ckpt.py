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
