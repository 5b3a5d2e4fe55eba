"""A single-file checkpoint seen as per-component diffusers tensors, read lazily one LDM key at a time.

Shared by the diffusers and ONNX exports. Everything is decided from the header before a tensor is read: the
architecture, the model configs (derived from the shapes, `arch/modelconfig.py`), the key map (block numbering
from those configs), and a check against the modules diffusers/transformers would build (every weight they need is
provided or filled by rule, every shape equals theirs), so a bad file fails before any output is written.

Text-encoder keys are produced in the `text_model.*` style of the published diffusers repositories, which every
transformers release loads (5.6+ maps the prefix away for the flat `CLIPTextModel`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mergekit_sdxl.arch.detect import detect_arch
from mergekit_sdxl.arch.keymap import PREFIXES, TEXT_ENCODER, UNET, VAE, KeyMap, Layout, build_keymap
from mergekit_sdxl.arch.modelconfig import derive_configs, fill_rule
from mergekit_sdxl.dtypes import WEIGHTS, parse_dtype
from mergekit_sdxl.errors import CheckpointError, UsageError
from mergekit_sdxl.io.dtypes import (
    cast,
    dequantize_scaled,
    is_float,
    is_fp8,
    is_marker,
    scaled_key_of,
    torch_dtype,
)
from mergekit_sdxl.io.keyconvert import to_diffusers_tensor
from mergekit_sdxl.io.reader import CheckpointReader, open_checkpoint

EDM_MARKERS = ("edm_vpred.sigma_max", "edm_vpred.sigma_min")
TEXT_MODEL = "text_model."


@dataclass(frozen=True)
class Target:
    """One diffusers tensor the export produces: from LDM key `ldm` through `op`, or filled by `fill`."""

    component: str
    key: str
    shape: tuple[int, ...]
    ldm: str | None = None
    op: str = "copy"
    fill: str | None = None  # "ones" / "zeros" / "arange" when the file lacks a tensor a rule can supply


@dataclass
class ExportStats:
    """What was written: tensors and bytes per component, values clamped by a narrowing cast."""

    tensors: dict[str, int] = field(default_factory=dict)
    bytes: dict[str, int] = field(default_factory=dict)
    clamped: int = 0


def export_dtype(name: str) -> str:
    """The safetensors code of an export dtype (fp16, bf16, fp32); fp8 is refused (no pipeline loads it)."""
    return parse_dtype(name, WEIGHTS, "--dtype")  # fp8: diffusers and ONNX Runtime pipelines cannot compute in it


def diffusers_shape(op: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape the key-map `op` gives an LDM tensor of `shape` (without reading it)."""
    if op == "conv1x1_to_linear" and len(shape) == 4:
        return shape[:2]
    if op == "transpose":
        return shape[::-1]
    if op.startswith("qkv"):
        return (shape[0] // 3, *shape[1:])
    return shape


def text_model_key(component: str, key: str) -> str:
    """`key` of a text encoder in the `text_model.*` style (other components unchanged)."""
    if component.startswith(TEXT_ENCODER) and not key.startswith(TEXT_MODEL) and key != "text_projection.weight":
        return TEXT_MODEL + key
    return key


class ExportSource:
    """An opened checkpoint with everything needed to write its diffusers tensors (use as a context manager)."""

    def __init__(self, path: str | os.PathLike[str], dtype: str = "F16") -> None:
        self.path = Path(path)
        self.code = export_dtype(dtype)
        self.reader: CheckpointReader = open_checkpoint(self.path)
        try:
            self._prepare()
        except BaseException:
            self.reader.close()
            raise

    def _prepare(self) -> None:
        keys = self.reader.keys()
        self.arch = detect_arch(keys, str(self.path))
        if any(k in keys for k in EDM_MARKERS):
            raise CheckpointError(f"{self.path}: EDM v-prediction checkpoints (edm_vpred.*) have no diffusers "
                                  "pipeline equivalent; not exported")
        self.markers = tuple(k for k in ("v_pred", "ztsnr") if k in keys)
        self.scales = {scaled_key_of(k): k for k in keys if scaled_key_of(k)}
        weights = [k for k in keys if scaled_key_of(k) is None and not is_marker(k)]
        self.configs = derive_configs(self.arch, {k: tuple(self.reader.info(k).shape) for k in weights})
        layout = Layout.from_configs(self.configs[UNET], self.configs[VAE])
        self.keymap: KeyMap = build_keymap(self.arch, weights, layout=layout, clip_l_style="text_model")
        self.targets = self._targets()

    @property
    def components(self) -> tuple[str, ...]:
        """The pipeline components in order: unet, vae, text_encoder(, text_encoder_2)."""
        return tuple(PREFIXES[self.arch])

    @property
    def unmapped_keys(self) -> tuple[str, ...]:
        """Checkpoint keys with no diffusers equivalent (left out of the export)."""
        return self.keymap.unmapped_keys + tuple(self.scales.values()) + \
            tuple(k for k in self.reader.keys() if is_marker(k))

    def _targets(self) -> dict[str, list[Target]]:
        targets: dict[str, list[Target]] = {c: [] for c in self.components}
        for m in self.keymap.mappings:
            shape = diffusers_shape(m.op, tuple(self.reader.info(m.ldm).shape))
            targets[m.component].append(Target(m.component, m.diffusers, shape, m.ldm, m.op))
        expected = module_shapes(self.configs)
        for component in self.components:
            have = {t.key: t for t in targets[component]}
            missing = []
            for key, shape in expected[component].items():
                if key in have:
                    if have[key].shape != shape:
                        raise CheckpointError(f"{self.path}: {have[key].ldm} gives {component}/{key} shape "
                                              f"{list(have[key].shape)}, the model needs {list(shape)}")
                    continue
                rule = fill_rule(self.arch, component, key)
                if rule is None:
                    missing.append(f"{component}/{key}")
                else:
                    targets[component].append(Target(component, key, shape, fill=rule))
            extra = sorted(set(have) - set(expected[component]))
            if missing or extra:
                shown = ", ".join((missing + extra)[:5])
                raise CheckpointError(f"{self.path}: {len(missing)} weight(s) the {self.arch} pipeline needs are "
                                      f"missing and {len(extra)} are not part of it: {shown}")
        return targets

    @property
    def filled(self) -> list[str]:
        """`component/key` of the tensors filled by rule (the file lacks them)."""
        return [f"{t.component}/{t.key}" for ts in self.targets.values() for t in ts if t.fill]

    def iter_tensors(self, components: tuple[str, ...] | None = None, stats: ExportStats | None = None,
                     progress: Callable[[int], None] | None = None) -> Iterator[tuple[Target, torch.Tensor]]:
        """(target, tensor in the export dtype) in the file's storage order, one LDM key read at a time."""
        wanted = set(components or self.components)
        by_ldm: dict[str, list[Target]] = {}
        for component in wanted:
            for t in self.targets[component]:
                if t.ldm is not None:
                    by_ldm.setdefault(t.ldm, []).append(t)
        for ldm in self.reader.keys():
            if ldm not in by_ldm:
                continue
            stored = self.reader.read(ldm)
            if ldm in self.scales:
                stored = dequantize_scaled(stored, self.reader.read(self.scales[ldm]), "F32",
                                           f"{self.reader.path}: tensor {ldm!r}")
            if progress is not None:
                progress(self.reader.info(ldm).nbytes)
            for t in by_ldm[ldm]:
                yield t, self._cast(to_diffusers_tensor(t.op, stored, ldm).contiguous(), stats)
            del stored
        for component in self.components:
            for t in self.targets[component] if component in wanted else ():
                if t.fill:
                    yield t, _fill_value(t, torch_dtype(self.code))

    def _cast(self, tensor: torch.Tensor, stats: ExportStats | None) -> torch.Tensor:
        if not tensor.is_floating_point():
            return tensor
        out, clamped = cast(tensor, self.code)
        if stats is not None:
            stats.clamped += clamped
        return out

    def dtype_of(self, target: Target) -> str:
        """The safetensors code `target` is written in (the export dtype for floats)."""
        if target.fill == "arange":
            return "I64"
        if target.ldm is None:
            return self.code
        stored = self.reader.info(target.ldm).dtype
        return self.code if is_float(stored) or is_fp8(stored) else stored

    def close(self) -> None:
        """Close the checkpoint."""
        self.reader.close()

    def __enter__(self) -> ExportSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def module_shapes(configs: dict[str, dict]) -> dict[str, dict[str, tuple[int, ...]]]:
    """component -> {state-dict key (text encoders in `text_model.*` style): shape} of the modules diffusers and
    transformers build for `configs` (built on the meta device: no memory, no random init)."""
    modules = build_modules(configs)
    return {c: {text_model_key(c, k): tuple(v.shape) for k, v in m.state_dict().items()} for c, m in modules.items()}


def build_modules(configs: dict[str, dict]) -> dict[str, torch.nn.Module]:
    """The pipeline's modules on the meta device (needs diffusers and transformers: the `[sampler]` extra)."""
    try:
        from mergekit_sdxl.sampler.models import build_modules as build
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise UsageError(f"export needs diffusers and transformers (pip install 'mergekit-sdxl[sampler]'): {exc}") \
            from exc
    try:
        return build(configs)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise UsageError(f"export needs diffusers and transformers (pip install 'mergekit-sdxl[sampler]'): {exc}") \
            from exc



def _fill_value(target: Target, dtype: torch.dtype) -> torch.Tensor:
    if target.fill == "arange":
        return torch.arange(target.shape[-1], dtype=torch.int64).expand(target.shape).contiguous()
    return (torch.ones if target.fill == "ones" else torch.zeros)(target.shape, dtype=dtype)


def load_module(source: ExportSource, component: str, module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Fill a meta-built `module` of `component` from `source` (strict), computing in `dtype`."""
    flat = not hasattr(module, "text_model") and component.startswith(TEXT_ENCODER)
    state: dict[str, torch.Tensor] = {}
    for target, tensor in source.iter_tensors((component,)):
        key = target.key[len(TEXT_MODEL):] if flat and target.key.startswith(TEXT_MODEL) else target.key
        state[key] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    module.load_state_dict(state, strict=True, assign=True)
    for sub in module.modules():
        ids = getattr(sub, "position_ids", None)
        if isinstance(ids, torch.Tensor) and ids.is_meta:
            sub.register_buffer("position_ids", torch.arange(ids.shape[-1]).expand(ids.shape), persistent=False)
    left = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if left:
        raise CheckpointError(f"{source.path}: {component} tensors were not loaded: {', '.join(left[:5])}")
    return module.eval().requires_grad_(False)
