"""The non-weight files of an exported pipeline folder and the atomic folder commit.

- `model_index.json`, `scheduler/scheduler_config.json`: the shipped configs of the architecture (published
  `stabilityai/stable-diffusion-xl-base-1.0` / `runwayml/stable-diffusion-v1-5` files); `v_pred` / `ztsnr`
  markers switch the scheduler to v-prediction / zero terminal SNR (Euler, trailing spacing).
- `tokenizer/`, `tokenizer_2/`: the shipped CLIP BPE files (`sampler/tokenizer/`); `tokenizer_2` pads with `!`
  as the official SDXL repository does.
- A folder is written under `.<name>.<pid>.mergekit-tmp` next to the target and renamed into place at the end
  (io/commit.py): an error or a stop signal leaves nothing under the target name. `overwrite` replaces only a
  folder this tool wrote (its manifest lists every file in it) and that holds no input.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path

from mergekit_sdxl.arch.configs import load_config, ztsnr_scheduler_config
from mergekit_sdxl.arch.registry import DEFAULT_ARCH, arch_spec
from mergekit_sdxl.io import commit
from mergekit_sdxl.sampler.tokens import TOKENIZER_DIR

TOKENIZER_FILES = ("vocab.json", "merges.txt", "LICENSE")
SPECIAL = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}


def write_json(path: Path, data: Mapping) -> None:
    """`data` as indented JSON (keys in the given order) plus a final newline."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def diffusers_version() -> str:
    """The installed diffusers version (written as `_diffusers_version`), or the shipped configs' one."""
    try:
        return metadata.version("diffusers")
    except metadata.PackageNotFoundError:  # pragma: no cover - diffusers is needed to export anyway
        return load_config(DEFAULT_ARCH, "unet").get("_diffusers_version", "0.19.0")


def model_index(arch: str, scheduler_class: str) -> dict:
    """The pipeline's `model_index.json`."""
    index = load_config(arch, "model_index")
    index["_diffusers_version"] = diffusers_version()
    index["scheduler"] = ["diffusers", scheduler_class]
    return index


def scheduler_config(arch: str, markers: tuple[str, ...]) -> dict:
    """The shipped scheduler config, adapted to the architecture's prediction type and to the `v_pred` / `ztsnr`
    markers of the checkpoint."""
    config = load_config(arch, "scheduler")
    if "ztsnr" in markers:
        config = ztsnr_scheduler_config()
        config.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    prediction = arch_spec(arch).sampler.prediction_type
    if "v_pred" in markers:
        config["prediction_type"] = "v_prediction"
    elif prediction != "epsilon":  # a v-prediction architecture needs no marker (shipped configs say epsilon)
        config["prediction_type"] = prediction
    config["_diffusers_version"] = diffusers_version()
    return config


def write_tokenizer(folder: Path, pad_token: str) -> None:
    """The shipped CLIP tokenizer files, padding with `pad_token`."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        shutil.copyfile(TOKENIZER_DIR / name, folder / name)
    config = json.loads((TOKENIZER_DIR / "tokenizer_config.json").read_text("utf-8"))
    config["pad_token"] = pad_token
    write_json(folder / "tokenizer_config.json", config)
    write_json(folder / "special_tokens_map.json", {**SPECIAL, "pad_token": pad_token})


def write_common(folder: Path, arch: str, markers: tuple[str, ...]) -> None:
    """model_index.json, scheduler/ and tokenizer folders of an `arch` pipeline."""
    scheduler = scheduler_config(arch, markers)
    write_json(folder / "model_index.json", model_index(arch, scheduler["_class_name"]))
    write_json(folder / "scheduler" / "scheduler_config.json", scheduler)
    write_tokenizer(folder / "tokenizer", SPECIAL["eos_token"])
    if arch_spec(arch).dual_text_encoder:
        write_tokenizer(folder / "tokenizer_2", "!")


def check_output(out: str | os.PathLike[str], overwrite: bool, src: str | os.PathLike[str]) -> None:
    """Refuse an unusable output folder before any work (the commit applies the same rules again): not an input,
    not holding or inside one, absent or (with `overwrite`) an earlier output folder of this tool."""
    commit.check_target(out, overwrite=overwrite, folder=True, inputs=[src])


def staged_folder(out: str | os.PathLike[str], overwrite: bool = False) -> contextlib.AbstractContextManager[Path]:
    """A fresh temporary folder next to `out` that becomes `out` on success and is removed on any error or signal
    (io/commit.py: `overwrite` replaces only a folder this tool wrote that holds no input)."""
    return commit.staged_folder(out, overwrite=overwrite)
