"""Build diffusers/transformers modules for a single-file SDXL / SD1.5 checkpoint, with no network.

Each module is built on the meta device from a configuration derived from the checkpoint's shapes
(`arch/modelconfig.py`), then filled through the project's LDM -> diffusers key map: the first time with
`load_state_dict(strict=True, assign=True)`, afterwards (same shapes) by copying in place, so a grid over several
checkpoints keeps one set of modules and swaps weights. A key the modules need and the file lacks is an error
before any tensor is read; nothing is ever left randomly initialised. Every tensor is cast on its own to the
compute dtype as it is read (fp8-stored files included; scaled fp8 is dequantized with its `.scale_weight`).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mergekit_sdxl.arch.detect import detect_arch
from mergekit_sdxl.arch.keymap import (
    TEXT_ENCODER,
    TEXT_ENCODER_2,
    UNET,
    VAE,
    KeyMap,
    KeyMapping,
    Layout,
    build_keymap,
)
from mergekit_sdxl.arch.modelconfig import derive_configs, fill_rule
from mergekit_sdxl.arch.registry import arch_spec
from mergekit_sdxl.errors import CheckpointError
from mergekit_sdxl.io.dtypes import dequantize_scaled, is_marker, scaled_key_of, torch_dtype
from mergekit_sdxl.io.keyconvert import clip_l_style_of, to_diffusers_tensor
from mergekit_sdxl.io.reader import open_checkpoint

EDM_MARKERS = ("edm_vpred.sigma_max", "edm_vpred.sigma_min")


class WeightSource:
    """Tensors by LDM/SGM key: a checkpoint file, or a dict produced in memory (a merge variant)."""

    def __init__(self, name: str, keys: Iterable[str], shape: Callable[[str], tuple[int, ...]],
                 read: Callable[[str], torch.Tensor], close: Callable[[], None] = lambda: None,
                 dtype: Callable[[str], torch.dtype] | None = None,
                 read_into: Callable[[str, torch.Tensor], torch.Tensor] | None = None) -> None:
        self.name, self._keys, self.shape, self.read, self.close = name, list(keys), shape, read, close
        self.dtype, self.read_into = dtype, read_into  # read_into(key, uint8 buffer): bytes straight into memory

    def keys(self) -> list[str]:
        """Keys in the cheapest reading order."""
        return self._keys

    @classmethod
    def from_file(cls, path: str | Path) -> WeightSource:
        """A lazily read checkpoint file (safetensors, or a weights-only torch file)."""
        reader = open_checkpoint(path)
        return cls(str(path), reader.keys(), lambda k: tuple(reader.info(k).shape), reader.read, reader.close,
                   dtype=lambda k: torch_dtype(reader.info(k).dtype), read_into=getattr(reader, "read_into", None))

    @classmethod
    def from_tensors(cls, name: str, tensors: Mapping[str, torch.Tensor]) -> WeightSource:
        """Tensors already in memory (e.g. the output of an in-memory merge)."""
        return cls(name, tensors.keys(), lambda k: tuple(tensors[k].shape), tensors.__getitem__)


@dataclass
class Model:
    """A loaded model: its modules (`unet`, `vae`, `text_encoder`, and `text_encoder_2` on SDXL) and traits."""

    arch: str
    configs: dict[str, dict]
    modules: dict[str, torch.nn.Module]
    prediction: str = "eps"  # or "v" (the file has the `v_pred` marker)
    ztsnr: bool = False
    name: str = ""
    markers: tuple[str, ...] = field(default=())

    @property
    def latent_scale(self) -> float:
        """VAE latent scaling factor (SDXL 0.13025, SD1.5 0.18215)."""
        return arch_spec(self.arch).sampler.latent_scale


def build_modules(configs: Mapping[str, dict]) -> dict[str, torch.nn.Module]:
    """Diffusers/transformers modules for `configs`, on the meta device (no memory, no random init)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        modules = {UNET: UNet2DConditionModel.from_config(configs[UNET]),
                   VAE: AutoencoderKL.from_config(configs[VAE]),
                   TEXT_ENCODER: CLIPTextModel(CLIPTextConfig(**configs[TEXT_ENCODER]))}
        if TEXT_ENCODER_2 in configs:
            modules[TEXT_ENCODER_2] = CLIPTextModelWithProjection(CLIPTextConfig(**configs[TEXT_ENCODER_2]))
    return {name: m.eval().requires_grad_(False) for name, m in modules.items()}


class ModelSlot:
    """Holds at most one model in memory; loading another reuses the modules when the shapes allow.

    `dtype` is the UNet's and text encoders' compute dtype, `vae_dtype` the VAE's (fp32 or bf16: the SDXL VAE
    overflows in fp16).
    """

    def __init__(self, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 vae_dtype: torch.dtype = torch.float32) -> None:
        self.device, self.dtype, self.vae_dtype = torch.device(device), dtype, vae_dtype
        self.model: Model | None = None
        self._plan: _LoadPlan | None = None

    def component_dtype(self, component: str) -> torch.dtype:
        """The dtype `component` is kept in."""
        return self.vae_dtype if component == VAE else self.dtype

    def load(self, source: WeightSource) -> Model:
        """Load `source` (swapping weights in place when its configuration equals the loaded one's)."""
        keys = source.keys()
        arch = detect_arch(keys, source.name)
        if any(k in keys for k in EDM_MARKERS):
            raise CheckpointError(f"{source.name}: EDM v-prediction checkpoints (edm_vpred.*) are not supported by "
                                  "the preview sampler")
        scales = {scale: k for k in keys if (scale := scaled_key_of(k))}
        weights = [k for k in keys if scaled_key_of(k) is None and not is_marker(k)]
        configs = derive_configs(arch, {k: source.shape(k) for k in weights})
        loaded = self.model
        reuse = loaded is not None and loaded.arch == arch and loaded.configs == configs
        modules = loaded.modules if loaded is not None and reuse else build_modules(configs)
        self.model = None  # a failed load leaves no half-loaded model behind
        signature = (arch, tuple(weights), tuple(sorted(scales.items())))
        plan = self._plan if reuse and self._plan is not None and self._plan.signature == signature else None
        if plan is None:
            keymap = build_keymap(arch, weights, layout=Layout.from_configs(configs[UNET], configs[VAE]),
                                  clip_l_style=clip_l_style_of(modules[TEXT_ENCODER]))
            fills = _check_coverage(arch, source.name, keymap, modules)
            plan = _LoadPlan(signature, [(k, ms) for k, ms in keymap.by_ldm().items() if ms[0].component in modules],
                             fills, {k: tuple(source.shape(k)) for k in weights})
        self._plan = None
        _fill(source, plan, scales, modules, self, assign=not reuse)
        self._plan = plan
        v_pred = "v_pred" in keys or arch_spec(arch).sampler.prediction_type == "v_prediction"
        self.model = Model(arch, configs, modules, prediction="v" if v_pred else "eps",
                           ztsnr="ztsnr" in keys, name=source.name,
                           markers=tuple(k for k in ("v_pred", "ztsnr") if k in keys))
        return self.model

    def unload(self) -> None:
        """Drop the loaded model and its modules."""
        self.model, self._plan = None, None

    def ldm_targets(self) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[KeyMapping, ...]],
                                   dict[str, dict[str, torch.Tensor]]]:
        """(LDM key -> shape, LDM key -> its diffusers mappings, component -> diffusers key -> loaded tensor) of the
        loaded model, for changing weights in place (prompt LoRAs)."""
        if self.model is None or self._plan is None or self._plan.targets is None:
            raise CheckpointError("no model is loaded")
        return self._plan.shapes, dict(self._plan.by_ldm), self._plan.targets


@dataclass
class _LoadPlan:
    """What loading a given key set into given modules takes; reused while files keep the same keys."""

    signature: tuple
    by_ldm: list[tuple[str, tuple[KeyMapping, ...]]]
    fills: dict[str, dict[str, str]]
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    targets: dict[str, dict[str, torch.Tensor]] | None = None  # the loaded modules' tensors, by diffusers key


def _check_coverage(arch: str, name: str, keymap: KeyMap, modules: Mapping[str, torch.nn.Module]
                    ) -> dict[str, dict[str, str]]:
    """Raise CheckpointError for module keys the file cannot provide; return the keys filled by rule.

    Filled by rule: CLIP `position_ids` (0..76), and CLIP-L's final LayerNorm on SDXL when the file was pruned
    of it (SDXL reads CLIP-L's penultimate layer, so that LayerNorm never runs).
    """
    fills: dict[str, dict[str, str]] = {}
    missing: list[str] = []
    for component, module in modules.items():
        provided = set(keymap.diffusers_keys(component))
        for key in module.state_dict().keys() - provided:
            rule = fill_rule(arch, component, key)
            if rule is None:
                missing.append(f"{component}/{key}")
            else:
                fills.setdefault(component, {})[key] = rule
    if missing:
        shown = ", ".join(sorted(missing)[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(f"{name}: {len(missing)} weight(s) the model needs are missing: {shown}")
    return fills



def _fill(source: WeightSource, plan: _LoadPlan, scales: Mapping[str, str], modules: dict[str, torch.nn.Module],
          slot: ModelSlot, assign: bool) -> None:
    """Assign fresh tensors to meta-built modules (`assign`), or copy into the loaded ones in place."""
    targets = plan.targets if not assign and plan.targets else {c: m.state_dict(keep_vars=True)
                                                                 for c, m in modules.items()}
    new_state: dict[str, dict[str, torch.Tensor]] = {c: {} for c in modules}
    direct = {} if assign else _direct_targets(source, plan, scales, targets)
    for ldm, mappings, stored in _read_ahead(source, plan.by_ldm, scales, direct):
        if stored is None:  # read straight into the parameter's memory
            continue
        for m in mappings:
            target = targets[m.component][m.diffusers]
            value = to_diffusers_tensor(m.op, stored, ldm)
            if tuple(value.shape) != tuple(target.shape):
                raise CheckpointError(f"{source.name}: {ldm} has shape {list(value.shape)}, the model needs "
                                      f"{list(target.shape)} for {m.component}/{m.diffusers}")
            if assign:
                new_state[m.component][m.diffusers] = _cast(value, slot.component_dtype(m.component), slot.device)
            else:
                target.data.copy_(value)  # converts dtype and device in one pass
    if not assign:
        return
    for component, rules in plan.fills.items():
        for key, rule in rules.items():
            new_state[component][key] = _rule_value(rule, targets[component][key], slot.device,
                                                    slot.component_dtype(component))
    for component, module in modules.items():
        module.load_state_dict(new_state[component], strict=True, assign=True)
        _restore_position_ids(module, slot.device)
        _check_materialised(source.name, component, module)
    plan.targets = {c: m.state_dict(keep_vars=True) for c, m in modules.items()}


Mappings = tuple[KeyMapping, ...]
READ_AHEAD_MIN_ELEMENTS = 50_000_000  # below this (tiny test models) a reader thread costs more than it hides


def _direct_targets(source: WeightSource, plan: _LoadPlan, scales: Mapping[str, str],
                    targets: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """LDM key -> the uint8 view of the CPU parameter its bytes can be read into unchanged (same dtype, plain copy)."""
    if source.read_into is None or source.dtype is None:
        return {}
    out = {}
    for ldm, mappings in plan.by_ldm:
        m = mappings[0]
        target = targets[m.component][m.diffusers].data
        if (len(mappings) == 1 and m.op == "copy" and ldm not in scales and target.device.type == "cpu"
                and target.is_contiguous() and target.dtype == source.dtype(ldm)
                and tuple(target.shape) == tuple(source.shape(ldm))):
            out[ldm] = target.view(-1).view(torch.uint8)
    return out


def _read_ahead(source: WeightSource, items: list[tuple[str, Mappings]], scales: Mapping[str, str],
                direct: Mapping[str, torch.Tensor], window: int = 4,
                ) -> Iterator[tuple[str, Mappings, torch.Tensor | None]]:
    """Yield (key, mappings, tensor) in order (None: read into its parameter already); for large models a thread
    reads the next few tensors meanwhile."""

    def read(ldm: str) -> torch.Tensor | None:
        if source.read_into is not None and ldm in direct:  # `direct` is empty without read_into
            source.read_into(ldm, direct[ldm])
            return None
        stored = source.read(ldm)
        return dequantize_scaled(stored, source.read(scales[ldm]), "F32") if ldm in scales else stored

    if sum(math.prod(source.shape(ldm)) for ldm, _ in items) < READ_AHEAD_MIN_ELEMENTS:
        yield from ((ldm, mappings, read(ldm)) for ldm, mappings in items)
        return
    with ThreadPoolExecutor(1, thread_name_prefix="mergekit-load") as pool:
        pending: deque = deque()
        for ldm, mappings in items:
            pending.append((ldm, mappings, pool.submit(read, ldm)))
            if len(pending) > window:
                key, maps, future = pending.popleft()
                yield key, maps, future.result()
        while pending:
            key, maps, future = pending.popleft()
            yield key, maps, future.result()


def _cast(value: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if device.type != "cpu":
        value = value.to(device)  # cast on the accelerator: less to transfer, faster to convert
    return value.to(dtype) if value.is_floating_point() and value.dtype != dtype else value


def _rule_value(rule: str, like: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    if rule == "arange":
        return torch.arange(like.shape[-1], device=device).expand(like.shape).clone()
    return (torch.ones if rule == "ones" else torch.zeros)(like.shape, device=device, dtype=dtype)


def _restore_position_ids(module: torch.nn.Module, device: torch.device) -> None:
    """CLIP's non-persistent `position_ids` buffer stays on meta after a meta build: re-create it."""
    for sub in module.modules():
        ids = getattr(sub, "position_ids", None)
        if isinstance(ids, torch.Tensor) and ids.is_meta:
            sub.register_buffer("position_ids", torch.arange(ids.shape[-1], device=device).expand(ids.shape),
                                persistent=False)


def _check_materialised(name: str, component: str, module: torch.nn.Module) -> None:
    left = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if left:
        raise CheckpointError(f"{name}: {component} tensors were not loaded: {', '.join(left[:5])}")
