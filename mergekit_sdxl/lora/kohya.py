"""Write adapters: kohya LoRA/LoCon keys (default) or diffusers/peft keys, with `ss_*` and `modelspec.*` metadata.

Files are reproducible: sorted metadata (the writer's), no dates, tensors in safetensors' canonical order.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from mergekit_sdxl.arch.lora_names import LoraModule
from mergekit_sdxl.arch.registry import arch_spec
from mergekit_sdxl.io.dtypes import torch_dtype
from mergekit_sdxl.io.writer import SafetensorsWriter, TensorSpec, build_header, safetensors_order

FORMATS = ("kohya", "peft")


@dataclass
class LayerFactors:
    """One module's factors: ΔW ≈ (alpha / rank) · up @ down, up (out, r), down (r, in·k·k), fp32."""

    module: LoraModule
    up: torch.Tensor
    down: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        """The layer's rank."""
        return self.down.shape[0]


def with_alpha(module: LoraModule, up: torch.Tensor, down: torch.Tensor, alpha: float | None) -> LayerFactors:
    """Factors of ΔW = up @ down stored with `alpha` (None: alpha = rank, scale 1); up absorbs rank / alpha."""
    rank = down.shape[0]
    if alpha is None or alpha == rank:
        return LayerFactors(module, up, down, float(rank))
    return LayerFactors(module, up * (rank / alpha), down, float(alpha))


def layer_tensors(layer: LayerFactors, dtype: str, fmt: str = "kohya") -> dict[str, torch.Tensor]:
    """The file tensors of one layer in safetensors dtype `dtype` (alpha always 0-d float32)."""
    module, rank = layer.module, layer.rank
    up, down = layer.up, layer.down
    if module.is_conv:
        up = up.reshape(module.shape[0], rank, 1, 1)
        down = down.reshape(rank, *module.shape[1:])
    target = torch_dtype(dtype)
    if fmt == "peft":
        up = up * (layer.alpha / rank)  # peft/diffusers: the scale is folded in (alpha = r)
        return {f"{module.diffusers}.lora_A.weight": down.to(target).contiguous(),
                f"{module.diffusers}.lora_B.weight": up.to(target).contiguous()}
    return {f"{module.name}.lora_down.weight": down.to(target).contiguous(),
            f"{module.name}.lora_up.weight": up.to(target).contiguous(),
            f"{module.name}.alpha": torch.tensor(layer.alpha, dtype=torch.float32)}


def adapter_tensors(layers: list[LayerFactors], dtype: str, fmt: str = "kohya") -> dict[str, torch.Tensor]:
    """Every file tensor of the adapter, keyed and sorted."""
    tensors: dict[str, torch.Tensor] = {}
    for layer in sorted(layers, key=lambda lf: lf.module.name):
        tensors.update(layer_tensors(layer, dtype, fmt))
    return dict(sorted(tensors.items()))


def kohya_metadata(arch: str, layers: list[LayerFactors], *, rank: int, conv_rank: int | None, title: str,
                   extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """kohya `ss_*` and `modelspec.*` metadata (strings); alpha is "Dynamic" when layers differ."""
    linear_alphas = {lf.alpha for lf in layers if not _is_kxk(lf.module)}
    conv_alphas = {lf.alpha for lf in layers if _is_kxk(lf.module)}
    ranks = {lf.rank for lf in layers if not _is_kxk(lf.module)}
    spec = arch_spec(arch)
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank) if len(ranks) <= 1 and (not ranks or ranks == {rank}) else "Dynamic",
        "ss_network_alpha": _num(next(iter(linear_alphas))) if len(linear_alphas) == 1 else "Dynamic",
        "ss_base_model_version": spec.modelspec.kohya_base_version,
        "ss_v2": "False",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": spec.modelspec.lora_architecture,
        "modelspec.implementation": spec.modelspec.lora_implementation,
        "modelspec.resolution": spec.sampler.resolution,
        "modelspec.title": title,
    }
    if conv_alphas or conv_rank is not None:
        conv_alpha = _num(next(iter(conv_alphas))) if len(conv_alphas) == 1 else "Dynamic"
        meta["ss_network_args"] = json.dumps({"conv_dim": str(conv_rank), "conv_alpha": conv_alpha}, sort_keys=True)
    if extra:
        meta.update(extra)
    return meta


def _is_kxk(module: LoraModule) -> bool:
    return module.is_conv and module.shape[2:] != (1, 1)


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def kohya_hashes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> dict[str, str]:
    """kohya's `sshs_model_hash` (sha256 of the tensor data) and `sshs_legacy_hash` (A1111 legacy hash of the
    file saved with only the `ss_*` metadata), computed on our canonical layout without writing a file."""
    specs = safetensors_order(TensorSpec.of(k, t) for k, t in tensors.items())
    ss_only = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    header, _ = build_header(specs, ss_only)
    data = hashlib.sha256()
    legacy_window = io.BytesIO()
    position = len(header)
    lo, hi = 0x100000, 0x110000
    if position > lo:
        legacy_window.write(header[lo:hi])
    for spec in specs:
        raw = memoryview(tensors[spec.key].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
        data.update(raw)
        end = position + len(raw)
        if end > lo and position < hi:
            legacy_window.write(raw[max(lo, position) - position: min(hi, end) - position])
        position = end
    return {"sshs_model_hash": data.hexdigest(),
            "sshs_legacy_hash": hashlib.sha256(legacy_window.getvalue()).hexdigest()[:8]}


def write_adapter(path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str],
                  *, overwrite: bool = False, inputs: tuple[str | os.PathLike[str], ...] = ()) -> None:
    """Write the adapter atomically (temporary file + rename; nothing is left behind on failure)."""
    specs = [TensorSpec.of(k, t) for k, t in tensors.items()]
    with SafetensorsWriter(path, specs, metadata, overwrite=overwrite, inputs=inputs) as writer:
        for key, tensor in tensors.items():
            writer.write(key, tensor)
