"""A diffusers pipeline folder read as one LDM/SGM single-file checkpoint.

`unet/`, `vae/`, `text_encoder/` and (SDXL) `text_encoder_2/` hold safetensors files, single or sharded with an
`*.safetensors.index.json`. Keys are presented under their LDM/SGM names (arch/keymap.py): most map 1:1 to a
stored tensor; text encoder 2's q/k/v are concatenated into `in_proj_*` on read, `text_projection` is transposed
and the VAE attention weights get their 1x1 conv dimensions back. Pickle-only folders (`*.bin`) are refused.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import torch

from mergekit_sdxl.arch.keymap import PREFIXES, TEXT_ENCODER_2, KeyMapping, build_reverse_keymap
from mergekit_sdxl.arch.registry import ARCH_NAMES, SPECS
from mergekit_sdxl.arch.spec import ArchSpec
from mergekit_sdxl.errors import ArchError, CheckpointError
from mergekit_sdxl.io import jsonio
from mergekit_sdxl.io.keyconvert import to_ldm_tensor
from mergekit_sdxl.io.reader import SafetensorsReader, TensorInfo

WEIGHT_STEMS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model"}


def folder_arch(path: Path) -> str:
    """The architecture id from `model_index.json` (or, without one, from which text-encoder folders exist)."""
    index = path / "model_index.json"
    if index.is_file():
        data = jsonio.load_file(index)  # size- and depth-limited: a 2 GB or 10000-deep file is refused unread
        name = data.get("_class_name") if isinstance(data, dict) else None
        if not isinstance(name, str):
            raise CheckpointError(f"{index}: not a valid model_index.json (no _class_name string)")
        candidates = [spec for spec in SPECS.values() if name in spec.detection.pipelines]
        if not candidates:
            raise ArchError(f"{path}: pipeline {name!r} is not an {' or '.join(ARCH_NAMES.values())} text-to-image "
                            "pipeline")
        return candidates[0].id if len(candidates) == 1 else _by_prediction(path, name, candidates)
    if not (path / "unet").is_dir():
        raise CheckpointError(f"{path}: not a diffusers folder (no model_index.json, no unet/)")
    dual = (path / TEXT_ENCODER_2).is_dir()
    return next(spec.id for spec in SPECS.values() if spec.dual_text_encoder == dual)


def _by_prediction(path: Path, pipeline: str, candidates: list[ArchSpec]) -> str:
    """The one of several architectures sharing a pipeline class (e.g. SDXL and a v-prediction SDXL) whose
    prediction type the folder's scheduler config names (diffusers' default: epsilon)."""
    config_path = path / "scheduler" / "scheduler_config.json"
    config = jsonio.load_file(config_path) if config_path.is_file() else {}
    prediction = config.get("prediction_type", "epsilon") if isinstance(config, dict) else None
    found = [spec.id for spec in candidates if spec.sampler.prediction_type == prediction]
    if len(found) != 1:
        raise ArchError(f"{path}: pipeline {pipeline!r} with prediction type {prediction!r} fits "
                        f"{len(found) or 'none'} of {', '.join(spec.name for spec in candidates)}")
    return found[0]


def weight_files(folder: Path, stem: str, variant: str | None = None) -> list[Path]:
    """The safetensors files holding one component's weights (several for a sharded save).

    Looks for `<stem>.<variant>.safetensors` (when `variant` is given), then `<stem>.safetensors`, each also as a
    sharded `*.safetensors.index.json`, then for the only variant present.

    Raises:
        CheckpointError: the folder is missing, holds only pickle (`.bin`) weights, or several variants and
            `variant` does not pick one.
    """
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: missing; a diffusers folder of this architecture needs it")
    for single, index in ([_names(stem, variant)] if variant else []) + [_names(stem, None)]:
        if (folder / single).is_file():
            return [folder / single]
        if (folder / index).is_file():
            return _shards(folder / index)
    variants = _variants(folder, stem)
    if variant is None and len(variants) == 1:
        return weight_files(folder, stem, variants[0])
    if variants:
        raise CheckpointError(f"{folder}: several weight variants {variants}; choose one with variant=...")
    if any(folder.glob("*.bin")):
        raise CheckpointError(
            f"{folder}: only pickle (.bin) weights; they are refused because unpickling can run code. "
            "Convert the folder to safetensors (diffusers: pipe.save_pretrained(..., safe_serialization=True))"
        )
    raise CheckpointError(f"{folder}: no {stem}.safetensors weights")


def _names(stem: str, variant: str | None) -> tuple[str, str]:
    """diffusers' file names: `<stem>[.<variant>].safetensors`, `<stem>.safetensors.index[.<variant>].json`."""
    if variant:
        return f"{stem}.{variant}.safetensors", f"{stem}.safetensors.index.{variant}.json"
    return f"{stem}.safetensors", f"{stem}.safetensors.index.json"


def _variants(folder: Path, stem: str) -> list[str]:
    found = {
        re.sub(r"-\d+-of-\d+$", "", p.name[len(stem) + 1 : -len(".safetensors")])
        for p in folder.glob(f"{stem}.*.safetensors")
    }
    found |= {
        p.name[len(stem) + len(".safetensors.index.") : -len(".json")]
        for p in folder.glob(f"{stem}.safetensors.index.*.json")
    }
    return sorted(found)


def _shards(index: Path) -> list[Path]:
    data = jsonio.load_file(index)
    try:
        weight_map = data["weight_map"]
        names = sorted(set(weight_map.values()))
    except (KeyError, TypeError, AttributeError):
        raise CheckpointError(f"{index}: not a valid safetensors index (needs a weight_map)") from None
    for name in names:
        if not isinstance(name, str) or Path(name).name != name or not (index.parent / name).is_file():
            raise CheckpointError(f"{index}: shard {name!r} is missing or not a file name in this folder")
    return [index.parent / name for name in names]


class DiffusersFolderReader:
    """A diffusers SDXL / SD1.x folder presented with LDM/SGM keys (implements io.reader.CheckpointReader).

    `info(key)` reports offsets 0..nbytes (like every non-safetensors source): the bytes of one LDM key may come
    from several stored tensors. `source(key)` names the stored tensors behind a key.
    """

    def __init__(self, path: str | os.PathLike[str], *, arch: str | None = None, variant: str | None = None) -> None:
        self.path = Path(path)
        self.arch = arch or folder_arch(self.path)
        self.metadata: dict[str, str] = {}
        self._readers: list[SafetensorsReader] = []
        try:
            stored = self._open_components(variant)
            keymap = build_reverse_keymap(self.arch, {c: list(s) for c, s in stored.items()})
            self._stored = stored
            self._sources = keymap.by_ldm()
            self._infos = {ldm: self._ldm_info(ms) for ldm, ms in self._sources.items()}
        except ArchError as exc:
            self.close()
            raise ArchError(f"{self.path}: {exc}") from exc
        except BaseException:
            self.close()
            raise

    def _open_components(self, variant: str | None) -> dict[str, dict[str, SafetensorsReader]]:
        stored: dict[str, dict[str, SafetensorsReader]] = {}
        for component in PREFIXES[self.arch]:
            files = weight_files(self.path / component, WEIGHT_STEMS.get(component, "model"), variant)
            where: dict[str, SafetensorsReader] = {}
            for f in files:
                reader = SafetensorsReader(f)
                self._readers.append(reader)
                for key in reader.keys():
                    if key in where:
                        raise CheckpointError(f"{f}: tensor {key!r} is also stored in {where[key].path}")
                    where[key] = reader
            stored[component] = where
        return stored

    def _stored_info(self, m: KeyMapping) -> TensorInfo:
        return self._stored[m.component][m.diffusers].info(m.diffusers)

    def _ldm_info(self, mappings: tuple[KeyMapping, ...]) -> TensorInfo:
        parts = [self._stored_info(m) for m in mappings]
        first, op, ldm = parts[0], mappings[0].op, mappings[0].ldm
        if len({(p.dtype, p.shape) for p in parts}) != 1:
            names = ", ".join(f"{m.diffusers} {p.dtype}{list(p.shape)}" for m, p in zip(mappings, parts))
            raise CheckpointError(f"{self.path}: {ldm}: its parts differ in dtype or shape ({names})")
        shape = first.shape
        if op.startswith("qkv") and shape:
            shape = (3 * shape[0], *shape[1:])
        elif op == "transpose":
            shape = shape[::-1]
        elif op == "conv1x1_to_linear" and len(shape) == 2:
            shape = (*shape, 1, 1)
        nbytes = sum(p.nbytes for p in parts)
        return TensorInfo(ldm, first.dtype, tuple(shape), 0, nbytes)

    def keys(self) -> list[str]:
        """LDM/SGM keys, component by component, each in its stored file order."""
        return list(self._infos)

    def __contains__(self, key: object) -> bool:
        return key in self._infos

    def __len__(self) -> int:
        return len(self._infos)

    def __iter__(self) -> Iterator[str]:
        return iter(self._infos)

    def info(self, key: str) -> TensorInfo:
        """Dtype and LDM shape of `key`; offsets are 0..nbytes."""
        try:
            return self._infos[key]
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor {key!r}") from None

    def source(self, key: str) -> list[tuple[Path, str, str]]:
        """(file, stored key, op) for each stored tensor behind LDM `key` (three for a fused in_proj)."""
        self.info(key)
        return [(self._stored[m.component][m.diffusers].path, m.diffusers, m.op) for m in self._sources[key]]

    def read(self, key: str) -> torch.Tensor:
        """The tensor `key` under its LDM name and shape, in its stored dtype (a fresh CPU tensor)."""
        self.info(key)
        mappings = self._sources[key]
        stored = {m.diffusers: self._stored[m.component][m.diffusers].read(m.diffusers) for m in mappings}
        return to_ldm_tensor(mappings, stored)

    def close(self) -> None:
        """Close every open file (idempotent)."""
        for reader in self._readers:
            reader.close()

    def __enter__(self) -> DiffusersFolderReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"DiffusersFolderReader({str(self.path)!r}, {self.arch}, {len(self._infos)} tensors)"


def open_diffusers_folder(path: str | os.PathLike[str]) -> DiffusersFolderReader:
    """Open a diffusers folder as a CheckpointReader (the entry point `io.reader.open_checkpoint` uses)."""
    return DiffusersFolderReader(path)
