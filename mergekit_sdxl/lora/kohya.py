"""Write adapters: kohya LoRA/LoCon keys (default) or diffusers/peft keys, with `ss_*` and `modelspec.*` metadata.

Metadata as kohya sd-scripts writes it (`networks/extract_lora_from_models.py`, `networks/resize_lora.py`,
`library/sai_model_spec.py`): `ss_network_dim` an int, alphas as floats ("16.0"), both "Dynamic" when ranks vary
per layer, `ss_network_args` JSON ("{}" without conv layers), ModelSpec 1.0.1 with `modelspec.date` and
`modelspec.prediction_type`.

Files are reproducible: sorted metadata (the writer's), tensors in safetensors' canonical order, and a date that
depends only on the inputs (`modelspec_date`).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone

import torch

from mergekit_sdxl.arch.lora_names import LoraModule
from mergekit_sdxl.arch.registry import arch_spec
from mergekit_sdxl.errors import UsageError
from mergekit_sdxl.io.dtypes import torch_dtype
from mergekit_sdxl.io.posio import tensor_memory
from mergekit_sdxl.io.writer import SafetensorsWriter, TensorSpec, build_header, safetensors_order
from mergekit_sdxl.lora import clients

FORMATS = clients.FORMATS


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
                   sources: Sequence[tuple[str | os.PathLike[str], Mapping[str, str]]], dynamic: bool = False,
                   extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """kohya `ss_*` and ModelSpec 1.0.1 `modelspec.*` metadata (strings), as sd-scripts writes them.

    Args:
        rank / conv_rank: the requested ranks (conv_rank None: no 3x3 conv layers, `ss_network_args` "{}").
        sources: the input files and their metadata (the date is taken from them, see `modelspec_date`).
        dynamic: ranks were chosen per layer: dim and alpha are "Dynamic", as kohya's dynamic resize writes them.
    """
    linear_alphas = {lf.alpha for lf in layers if not _is_kxk(lf.module)}
    conv_alphas = {lf.alpha for lf in layers if _is_kxk(lf.module)}
    ranks = {lf.rank for lf in layers if not _is_kxk(lf.module)}
    dynamic = dynamic or len(ranks) > 1 or bool(ranks and ranks != {rank})
    spec = arch_spec(arch)
    args: dict[str, str] = {}  # kohya: conv_dim an int, conv_alpha a float, in this order
    if conv_alphas or conv_rank is not None:
        args["conv_dim"] = str(conv_rank)
        args["conv_alpha"] = _alpha_text(conv_alphas, conv_rank or 0)
    return {
        "ss_network_module": "networks.lora",
        "ss_network_dim": "Dynamic" if dynamic else str(rank),
        "ss_network_alpha": "Dynamic" if dynamic else _alpha_text(linear_alphas, rank),
        "ss_network_args": json.dumps(args),
        "ss_base_model_version": spec.modelspec.kohya_base_version,
        "ss_v2": "False",
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": spec.modelspec.lora_architecture,
        "modelspec.implementation": spec.modelspec.lora_implementation,
        "modelspec.resolution": spec.sampler.resolution,
        "modelspec.prediction_type": spec.sampler.prediction_type,
        "modelspec.date": modelspec_date(sources),
        "modelspec.title": title,
        **(extra or {}),
    }


def _alpha_text(alphas: set[float], rank: int) -> str:
    """kohya writes alphas as Python floats ("16.0"); "Dynamic" when layers differ; alpha = rank when none."""
    if len(alphas) > 1:
        return "Dynamic"
    return str(float(next(iter(alphas)) if alphas else rank))


def modelspec_date(sources: Sequence[tuple[str | os.PathLike[str], Mapping[str, str]]]) -> str:
    """`modelspec.date` (ISO-8601, UTC) of an adapter made from `sources` (path, its metadata): $SOURCE_DATE_EPOCH
    when set, else the newest input date, each input's own `modelspec.date` where it records one, else its
    modification time.

    An adapter is a function of its inputs, so it is dated by them: the same inputs give the same bytes (a clock
    date would make every run's file differ), and re-running on a copy of an input dated inside gives the same file.

    Raises:
        UsageError: SOURCE_DATE_EPOCH is set but not an integer.
    """
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if epoch is not None:
        try:
            stamp = float(int(epoch))
        except ValueError:
            raise UsageError(f"SOURCE_DATE_EPOCH={epoch!r} is not an integer number of seconds") from None
    else:
        stamp = max((_recorded_date(meta) or os.stat(path).st_mtime for path, meta in sources), default=0.0)
    return datetime.fromtimestamp(int(stamp), timezone.utc).isoformat()


def _recorded_date(metadata: Mapping[str, str]) -> float | None:
    """The timestamp of a `modelspec.date` (ISO-8601; without a zone read as UTC), None when absent or unreadable."""
    try:
        when = datetime.fromisoformat(metadata.get("modelspec.date", ""))
    except ValueError:
        return None
    return (when if when.tzinfo else when.replace(tzinfo=timezone.utc)).timestamp()


def _is_kxk(module: LoraModule) -> bool:
    return module.is_conv and module.shape[2:] != (1, 1)


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
        raw = tensor_memory(tensors[spec.key].detach().cpu().contiguous().reshape(-1).view(torch.uint8))
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
