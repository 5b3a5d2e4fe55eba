"""SafetensorsWriter: byte-identical to safetensors' save_file, any write order, atomic, never overwrites inputs."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from safetensors.torch import save_file as st_save_file

from mergekit_sdxl.errors import OutputError
from mergekit_sdxl.io.writer import (
    SafetensorsWriter,
    TensorSpec,
    build_header,
    cleanup_stale_temps,
    safetensors_order,
    save_file,
    temp_path,
)

ALL_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2, torch.int64,
              torch.bool, torch.int32, torch.uint8, torch.int8, torch.int16, torch.float64]


def _sample(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g) * 10).to(dtype)
    return torch.randint(-100 if dtype != torch.uint8 else 0, 100, shape, generator=g).to(dtype)


def _mixed() -> dict[str, torch.Tensor]:
    shapes = [(3, 4), (5,), (2, 3, 1, 1), (), (0, 7), (7,)]
    tensors = {}
    for i, dtype in enumerate(ALL_DTYPES):
        name = f"model.{['b', 'a', 'c'][i % 3]}.{i}.{str(dtype).removeprefix('torch.')}"
        tensors[name] = _sample(dtype, shapes[i % len(shapes)], i)
    tensors["cond.position_ids"] = torch.arange(77).unsqueeze(0)
    tensors["zz.é"] = torch.ones(2, dtype=torch.float16)
    return tensors


def _equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (fp8 has no torch.equal)."""
    raw = [t.reshape(-1).view(torch.uint8) for t in (a, b)]
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(*raw)


@pytest.mark.parametrize("metadata", [None, {}, {"modelspec.title": "x é \n \"q\" \\ \u2028"}])
def test_bytes_equal_save_file(tmp_path, metadata):
    tensors = _mixed()
    st_save_file(tensors, tmp_path / "ref.safetensors", metadata=metadata)
    save_file(tensors, tmp_path / "ours.safetensors", metadata=metadata)
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()


def test_empty_file_matches_save_file(tmp_path):
    st_save_file({}, tmp_path / "ref.safetensors")
    save_file({}, tmp_path / "ours.safetensors")
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()


def test_metadata_sorted_and_reproducible(tmp_path):
    tensors = {"w": torch.ones(3)}
    save_file(tensors, tmp_path / "a.safetensors", {"b": "1", "a": "2", "c": "3"})
    save_file(tensors, tmp_path / "b.safetensors", {"c": "3", "a": "2", "b": "1"})
    raw = (tmp_path / "a.safetensors").read_bytes()
    assert raw == (tmp_path / "b.safetensors").read_bytes()
    assert b'{"__metadata__":{"a":"2","b":"1","c":"3"},' in raw


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_every_dtype_round_trips(tmp_path, dtype):
    t = _sample(dtype, (4, 3), 7)
    save_file({"t": t}, tmp_path / "x.safetensors")
    back = load_file(tmp_path / "x.safetensors")["t"]
    assert _equal(back, t)


def test_write_in_arbitrary_order(tmp_path):
    tensors = _mixed()
    specs = [TensorSpec.of(k, t) for k, t in tensors.items()]
    with SafetensorsWriter(tmp_path / "x.safetensors", specs, {"k": "v"}) as w:
        for key in sorted(tensors, reverse=True):
            w.write(key, tensors[key])
    st_save_file(tensors, tmp_path / "ref.safetensors", metadata={"k": "v"})
    assert (tmp_path / "x.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()


def test_given_order_keeps_spec_order(tmp_path):
    tensors = {"z": torch.ones(2), "a": torch.zeros(3, dtype=torch.int64)}
    specs = [TensorSpec.of(k, t) for k, t in tensors.items()]
    with SafetensorsWriter(tmp_path / "x.safetensors", specs, order="given") as w:
        for key, t in tensors.items():
            w.write(key, t)
    raw = (tmp_path / "x.safetensors").read_bytes()
    assert raw.index(b'"z"') < raw.index(b'"a"')
    back = load_file(tmp_path / "x.safetensors")
    assert all(torch.equal(back[k], t) for k, t in tensors.items())


def test_write_bytes_and_noncontiguous(tmp_path):
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    specs = [TensorSpec("t", "F32", (4, 3)), TensorSpec("raw", "I32", (2,))]
    with SafetensorsWriter(tmp_path / "x.safetensors", specs) as w:
        w.write("t", base.t())
        w.write_bytes("raw", torch.tensor([5, 6], dtype=torch.int32).numpy().tobytes())
    back = load_file(tmp_path / "x.safetensors")
    assert torch.equal(back["t"], base.t())
    assert back["raw"].tolist() == [5, 6]


def test_exception_leaves_no_file(tmp_path):
    out = tmp_path / "x.safetensors"
    with pytest.raises(RuntimeError, match="boom"):
        with SafetensorsWriter(out, [TensorSpec("a", "F32", (2,))]) as w:
            w.write("a", torch.ones(2))
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_keyboard_interrupt_leaves_no_file(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with SafetensorsWriter(tmp_path / "x.safetensors", [TensorSpec("a", "F32", (2,))]):
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_missing_tensor_fails_and_leaves_no_file(tmp_path):
    specs = [TensorSpec("a", "F32", (2,)), TensorSpec("b", "F32", (2,))]
    with pytest.raises(OutputError, match="never written"):
        with SafetensorsWriter(tmp_path / "x.safetensors", specs) as w:
            w.write("a", torch.ones(2))
    assert list(tmp_path.iterdir()) == []


def test_temp_file_name_and_place(tmp_path):
    out = tmp_path / "merged.safetensors"
    with SafetensorsWriter(out, [TensorSpec("a", "F32", (2,))]) as w:
        assert temp_path(out) == tmp_path / f".merged.safetensors.{os.getpid()}.mergekit-tmp"
        assert temp_path(out).exists() and not out.exists()
        w.write("a", torch.ones(2))
    assert not temp_path(out).exists() and out.exists()


@pytest.mark.parametrize("bad", [
    ("a", torch.ones(2, dtype=torch.float16)),  # dtype differs
    ("a", torch.ones(3)),  # shape differs
    ("nope", torch.ones(2)),  # not announced
])
def test_write_checks_spec(tmp_path, bad):
    with pytest.raises(ValueError):
        with SafetensorsWriter(tmp_path / "x.safetensors", [TensorSpec("a", "F32", (2,))]) as w:
            w.write(*bad)
    assert list(tmp_path.iterdir()) == []


def test_write_twice_refused(tmp_path):
    with pytest.raises(ValueError, match="twice"):
        with SafetensorsWriter(tmp_path / "x.safetensors", [TensorSpec("a", "F32", (2,))]) as w:
            w.write("a", torch.ones(2))
            w.write("a", torch.ones(2))


def test_refuses_existing_output_and_inputs(tmp_path):
    out = tmp_path / "x.safetensors"
    out.write_bytes(b"old")
    spec = [TensorSpec("a", "F32", (2,))]
    with pytest.raises(OutputError, match="already exists"):
        SafetensorsWriter(out, spec)
    with pytest.raises(OutputError, match="input"):
        SafetensorsWriter(out, spec, overwrite=True, inputs=[tmp_path / "." / "x.safetensors"])
    link = tmp_path / "link.safetensors"
    link.symlink_to(out)
    with pytest.raises(OutputError, match="input"):
        SafetensorsWriter(link, spec, overwrite=True, inputs=[out])
    save_file({"a": torch.ones(2)}, out, overwrite=True)
    assert torch.equal(load_file(out)["a"], torch.ones(2))


def test_refuses_missing_folder(tmp_path):
    with pytest.raises(OutputError, match="does not exist"):
        SafetensorsWriter(tmp_path / "nope" / "x.safetensors", [])


def test_cleanup_stale_temps(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stale = tmp_path / f".out.safetensors.{dead_pid}.mergekit-tmp"
    mine = tmp_path / f".out.safetensors.{os.getpid()}.mergekit-tmp"
    other = tmp_path / f".other.safetensors.{dead_pid}.mergekit-tmp"
    for p in (stale, mine, other):
        p.write_bytes(b"x")
    assert cleanup_stale_temps(tmp_path, "out.safetensors") == [stale]
    assert not stale.exists() and mine.exists() and other.exists()


def test_safetensors_order_is_dtype_rank_then_key():
    specs = [TensorSpec("b", "F16", (1,)), TensorSpec("a", "F16", (1,)), TensorSpec("z", "I64", (1,)),
             TensorSpec("c", "BOOL", (1,)), TensorSpec("d", "F32", (1,)), TensorSpec("e", "F8_E4M3", (1,)),
             TensorSpec("f", "F8_E5M2", (1,)), TensorSpec("g", "BF16", (1,))]
    assert [s.key for s in safetensors_order(specs)] == ["z", "d", "g", "a", "b", "e", "f", "c"]


def test_header_padding_and_offsets():
    header, offsets = build_header([TensorSpec("a", "F32", (3,)), TensorSpec("b", "U8", (5,))], None)
    n = int.from_bytes(header[:8], "little")
    assert n % 8 == 0 and len(header) == 8 + n
    assert offsets == {"a": 8 + n, "b": 8 + n + 12}


def test_threads_write_concurrently(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    tensors = {f"k{i:03d}": torch.full((1000,), float(i)) for i in range(64)}
    specs = [TensorSpec.of(k, t) for k, t in tensors.items()]
    with SafetensorsWriter(tmp_path / "x.safetensors", specs) as w, ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda kv: w.write(*kv), tensors.items()))
    back = load_file(tmp_path / "x.safetensors")
    assert all(torch.equal(back[k], t) for k, t in tensors.items())


def test_header_slack_and_update_metadata(tmp_path):
    from safetensors import safe_open

    tensors = {"a": torch.arange(6, dtype=torch.float32), "b": torch.ones(2, dtype=torch.int64)}
    specs = [TensorSpec.of(k, t) for k, t in tensors.items()]
    out = tmp_path / "x.safetensors"
    with SafetensorsWriter(out, specs, {"hash": "0" * 16}, header_slack=1024) as w:
        for key, t in tensors.items():
            w.write(key, t)
        w.update_metadata({"hash": "f" * 16, "z_more": "x" * 500})
        with pytest.raises(OutputError, match="does not fit"):
            w.update_metadata({"big": "x" * 4096})
    n = int.from_bytes(out.read_bytes()[:8], "little")
    assert n % 8 == 0 and n >= 1024
    with safe_open(out, "pt") as f:  # safetensors itself accepts the padded header
        assert f.metadata() == {"hash": "f" * 16, "z_more": "x" * 500}
        assert torch.equal(f.get_tensor("a"), tensors["a"])
    assert torch.equal(load_file(out)["b"], tensors["b"])
