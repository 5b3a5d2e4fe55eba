"""Bake adapters into a checkpoint, and `AdapterSet`, the per-key ΔW source the merge engine calls.

    adapters = AdapterSet([AdapterSpec("style.safetensors", strength=0.8)], arch, header_shapes)
    adapters.check_consumed()                     # unknown / unmatched adapter keys -> CheckpointError
    delta = adapters.delta(key, shape, weight=w)  # fp32 sum over adapters of factor · ΔW, or None

Each adapter's factor for a module is `strength` (or `te_strength` for text-encoder modules) times the block
weight of the checkpoint key (`blocks`: a LoRA Block Weight vector of 12 / 17 values or preset, see `arch.lbw`, or
the same 20 / 26-value vector as checkpoint MBW; text encoders use BASE).
Several adapters add up; a DoRA adapter's change is computed against the original weight.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mergekit_sdxl import __version__
from mergekit_sdxl.arch.blocks import DEFAULT_CONVENTION
from mergekit_sdxl.arch.detect import detect_arch
from mergekit_sdxl.arch.lbw import BlockScale, adapter_blocks
from mergekit_sdxl.arch.lora_names import LoraModule, lora_modules
from mergekit_sdxl.dtypes import WEIGHTS, parse_dtype
from mergekit_sdxl.errors import CheckpointError
from mergekit_sdxl.io.dtypes import cast, code_of, torch_dtype
from mergekit_sdxl.io.metadata import a1111_safe, json_value
from mergekit_sdxl.io.reader import open_checkpoint
from mergekit_sdxl.io.writer import SafetensorsWriter, TensorSpec
from mergekit_sdxl.lora.formats import Adapter, AdapterLayer, apply_dora
from mergekit_sdxl.lora.svd import small_op_threads
from mergekit_sdxl.platform.text import file_name


@dataclass(frozen=True)
class AdapterSpec:
    """One adapter to apply: its file, strength, optional text-encoder strength and block weights."""

    path: str
    strength: float = 1.0
    te_strength: float | None = None
    blocks: Any = None  # an LBW or MBW vector in any form arch.lbw.adapter_blocks accepts


@dataclass
class _Use:
    adapter: int
    layer: AdapterLayer
    role: str  # "weight" or "bias"
    factor: float


def step_adapters(step: Any, arch: str, shapes: Mapping[str, Sequence[int]]) -> AdapterSet:
    """The engine's `AdapterFactory`: open a recipe LoRA step's adapters (`merge`, searches, previews)."""
    specs = [AdapterSpec(a.path, a.strength, a.te_strength, a.blocks) for a in step.adapters]
    return AdapterSet(specs, arch, shapes, convention=step.convention)


class AdapterSet:
    """Adapters opened and mapped to checkpoint keys up front.

    Args:
        specs: the adapters and their strengths.
        arch: the checkpoint's architecture.
        shapes: the checkpoint's key -> shape (its header); modules are derived from it.
        ignore_unknown: keep going when adapter keys match nothing (they are still listed in `unconsumed`).
        convention: block convention for `blocks` vectors.

    Raises:
        ArchError: an adapter is for another architecture.
        CheckpointError: unknown adapter keys (unless ignore_unknown), bad shapes.
    """

    def __init__(self, specs: Sequence[AdapterSpec], arch: str, shapes: Mapping[str, Sequence[int]], *,
                 ignore_unknown: bool = False, convention: str = DEFAULT_CONVENTION) -> None:
        self.arch, self.specs = arch, list(specs)
        self.modules = lora_modules(arch, shapes)
        self.shapes = {k: tuple(int(d) for d in s) for k, s in shapes.items()}
        self.adapters: list[Adapter] = []
        self._by_key: dict[str, list[_Use]] = {}
        self.unconsumed: list[tuple[str, str]] = []
        try:
            for i, spec in enumerate(self.specs):
                adapter = Adapter(spec.path, arch, self.modules)
                self.adapters.append(adapter)
                scale = adapter_blocks(spec.blocks, arch, convention, where=f"{spec.path}: blocks") \
                    if spec.blocks is not None else None
                self._map(i, adapter, spec, scale)
            if self.unconsumed and not ignore_unknown:
                raise CheckpointError(self._unconsumed_message())
        except BaseException:
            self.close()
            raise

    def _map(self, index: int, adapter: Adapter, spec: AdapterSpec, scale: BlockScale | None) -> None:
        self.unconsumed += [(str(adapter.path), key) for key in adapter.unknown]
        for layer in adapter.layers.values():
            module = layer.module
            factor = _factor(module, spec, scale)
            has_weight = any(p in layer.keys for p in ("down", "hada_w1_a", "lokr_w1", "lokr_w1_a", "diff", "w_norm"))
            if has_weight:
                self._by_key.setdefault(module.key, []).append(_Use(index, layer, "weight", factor))
            bias_part = next((p for p in ("diff_b", "b_norm") if p in layer.keys), None)
            if bias_part is not None:
                if module.bias_key is None:
                    self.unconsumed.append((str(adapter.path), layer.keys[bias_part]))
                else:
                    self._by_key.setdefault(module.bias_key, []).append(_Use(index, layer, "bias", factor))

    def _unconsumed_message(self) -> str:
        shown = ", ".join(f"{key} ({Path(path).name})" for path, key in self.unconsumed[:5])
        more = f" and {len(self.unconsumed) - 5} more" if len(self.unconsumed) > 5 else ""
        return (f"{len(self.unconsumed)} adapter key(s) match no {self.arch} checkpoint module or known format: "
                f"{shown}{more}; check the adapter is for this model, or pass --ignore-unknown")

    def keys(self) -> list[str]:
        """The checkpoint keys some adapter changes, sorted."""
        return sorted(self._by_key)

    def needs_weight(self, key: str) -> bool:
        """True when computing `key`'s delta needs the original weight (a DoRA layer touches it)."""
        return any(use.layer.has_dora for use in self._by_key.get(key, ()))

    def delta(self, key: str, shape: Sequence[int] | None = None, weight: torch.Tensor | None = None,
              device: torch.device | str = "cpu") -> torch.Tensor | None:
        """The summed fp32 change of checkpoint tensor `key` (None when no adapter touches it).

        Args:
            key: LDM/SGM checkpoint key.
            shape: the checkpoint tensor's shape (checked; default: the header's).
            weight: the original tensor; required when `needs_weight(key)` (DoRA).
            device: where to compute.
        """
        uses = self._by_key.get(key)
        if not uses:
            return None
        target = tuple(int(d) for d in shape) if shape is not None else self.shapes[key]
        if target != self.shapes.get(key, target):
            raise CheckpointError(f"{key}: asked for shape {list(target)} but the checkpoint has "
                                  f"{list(self.shapes[key])}")
        total = torch.zeros(target, dtype=torch.float32, device=device)
        base = weight.to(device, torch.float32) if weight is not None else None
        for use in uses:
            self._add(total, use, base, key)
        return total

    def _add(self, total: torch.Tensor, use: _Use, base: torch.Tensor | None, key: str) -> None:
        if use.factor == 0:
            return
        adapter, module = self.adapters[use.adapter], use.layer.module
        result = adapter.layer_delta(use.layer)
        part = result.bias if use.role == "bias" else result.weight
        if part is None:
            return
        part = part.to(total.device)
        rows = module.rows()
        if use.role == "weight" and result.dora_scale is not None:
            if base is None:
                raise CheckpointError(f"{key}: adapter {adapter.path.name} uses DoRA, which needs the original "
                                      "weight; pass weight=")
            w = base if rows is None else base[rows[0]:rows[1]]
            w = w.T if module.transpose else w
            part = apply_dora(w, part, result.dora_scale.to(total.device), use.factor)
        else:
            part = part * use.factor
        if module.transpose:
            part = part.T
        view = total if rows is None else total[rows[0]:rows[1]]
        if tuple(part.shape) != tuple(view.shape):
            part = part.reshape(view.shape)
        view.add_(part)

    def close(self) -> None:
        """Close every adapter file."""
        for adapter in self.adapters:
            adapter.close()

    def __enter__(self) -> AdapterSet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _factor(module: LoraModule, spec: AdapterSpec, scale: BlockScale | None) -> float:
    strength = spec.te_strength if module.is_text and spec.te_strength is not None else spec.strength
    return strength if scale is None else strength * scale.factor(module.key, module.is_text)


def bake(checkpoint: str | os.PathLike[str], specs: Sequence[AdapterSpec], output: str | os.PathLike[str], *,
         overwrite: bool = False, ignore_unknown: bool = False, dtype: str | None = None,
         device: str = "cpu", progress: Callable[[int, int], None] | None = None,
         extra_metadata: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Stream `checkpoint` to `output`, adding every adapter's change to the keys it touches.

    Untouched tensors are copied byte for byte; changed ones are computed in fp32 and stored in their original
    dtype (or `dtype`). Returns a small summary (arch, changed_keys, total_keys, unconsumed adapter keys).
    """
    out_code = parse_dtype(dtype, WEIGHTS, "--dtype") if dtype else None
    with open_checkpoint(checkpoint) as reader:
        keys = reader.keys()
        arch = detect_arch(keys, str(checkpoint))
        infos = {k: reader.info(k) for k in keys}
        with AdapterSet(specs, arch, {k: i.shape for k, i in infos.items()}, ignore_unknown=ignore_unknown) as aset:
            touched = set(aset.keys())
            out_specs = [TensorSpec(k, _out_dtype(infos[k].dtype, out_code), infos[k].shape) for k in keys]
            # kohya's hashes describe the input's bytes; they would be wrong for the output
            metadata = {k: v for k, v in reader.metadata.items() if k not in ("sshs_model_hash", "sshs_legacy_hash")}
            metadata["mergekit_sdxl.bake"] = json_value({
                "tool": f"mergekit-sdxl {__version__}",
                "adapters": [{"name": file_name(s.path), "strength": s.strength, "te_strength": s.te_strength,
                              "blocks": s.blocks if s.blocks is None or isinstance(s.blocks, (str, list)) else
                              str(s.blocks)} for s in specs],
                "changed_keys": len(touched)})
            metadata.update(extra_metadata or {})
            metadata = a1111_safe(metadata)  # A1111's merger must be able to re-save the output (io/metadata.py)
            inputs = [checkpoint, *(s.path for s in specs)]
            with SafetensorsWriter(output, out_specs, metadata, overwrite=overwrite, inputs=inputs) as writer:
                for done, spec in enumerate(out_specs, start=1):
                    _bake_key(reader, writer, aset, spec, infos[spec.key].dtype, touched, device)
                    if progress is not None:
                        progress(done, len(out_specs))
    return {"arch": arch, "changed_keys": len(touched), "total_keys": len(keys), "unconsumed": len(aset.unconsumed)}


def _out_dtype(stored: str, wanted: str | None) -> str:
    from mergekit_sdxl.io.dtypes import is_float

    return wanted if wanted is not None and is_float(stored) else stored


def _bake_key(reader: Any, writer: SafetensorsWriter, aset: AdapterSet, spec: TensorSpec, stored: str,
              touched: set[str], device: str) -> None:
    if spec.key not in touched:
        if spec.dtype == stored:
            writer.write_bytes(spec.key, reader.read_bytes(spec.key) if hasattr(reader, "read_bytes")
                               else reader.read(spec.key).contiguous().view(torch.uint8).numpy().tobytes())
        else:
            writer.write(spec.key, cast(reader.read(spec.key).float(), spec.dtype)[0])
        return
    with small_op_threads(math.prod(spec.shape), torch.device(device).type):
        _bake_changed(reader, writer, aset, spec, device)


def _bake_changed(reader: Any, writer: SafetensorsWriter, aset: AdapterSet, spec: TensorSpec, device: str) -> None:
    weight = reader.read(spec.key)
    value = weight.to(device, torch.float32)
    delta = aset.delta(spec.key, spec.shape, weight=value if aset.needs_weight(spec.key) else None, device=device)
    assert delta is not None
    value = value + delta
    if not bool(torch.isfinite(value).all()):
        raise CheckpointError(f"{spec.key}: baking produced non-finite values; check the adapters' strengths")
    stored_value, _ = cast(value.cpu(), spec.dtype)
    if code_of(stored_value.dtype) != spec.dtype:
        stored_value = stored_value.to(torch_dtype(spec.dtype))
    writer.write(spec.key, stored_value)


def open_adapters(paths: Iterable[str], arch: str, shapes: Mapping[str, Sequence[int]],
                  **kwargs: Any) -> AdapterSet:
    """Convenience: an AdapterSet of `paths` at strength 1."""
    return AdapterSet([AdapterSpec(str(p)) for p in paths], arch, shapes, **kwargs)
