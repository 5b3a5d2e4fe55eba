"""CPU vs CUDA merges (run only where a GPU exists: `pytest -m gpu`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from mergekit_sdxl.cli.main import main

REV2 = Path(__file__).resolve().parents[1] / "recipes" / "kohaku_xl_gamma_rev2.yaml"


@pytest.mark.gpu
def test_cuda_merge_matches_cpu_to_the_last_bit_mostly(tiny_sdxl_family: dict[str, Path], tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    models = [x for alias, p in tiny_sdxl_family.items() for x in ("-m", f"{alias}={p}")]
    outs = {}
    for device in ("cpu", "cuda"):
        (tmp_path / device).mkdir()
        outs[device] = tmp_path / device / "out.safetensors"
        with pytest.raises(SystemExit) as done:
            main(["--quiet", "merge", str(REV2), *models, "-o", str(outs[device]), "--device", device])
        assert done.value.code == 0
    cpu, gpu = load_file(outs["cpu"]), load_file(outs["cuda"])
    differing = total = 0
    for key, value in cpu.items():
        total += value.size
        differing += int(np.count_nonzero(value.view(np.uint8) != gpu[key].view(np.uint8)))
        if value.dtype.kind == "f":
            np.testing.assert_allclose(value.astype(np.float32), gpu[key].astype(np.float32), rtol=2**-9, atol=1e-6)
    print(f"bytes differing CPU vs CUDA: {differing} of {total}")
