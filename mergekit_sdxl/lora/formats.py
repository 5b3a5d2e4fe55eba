"""Read LoRA / LyCORIS adapters: group keys by module, map modules to checkpoint keys, compute ΔW in fp32.

Formats and their ΔW (s = alpha / r; alpha missing or 0 means s = 1), agreed by LyCORIS' module forward pass,
ComfyUI and A1111:

- lora / locon: `lora_down`, `lora_up` (kohya), `lora_A`, `lora_B` (peft), `lora.down`/`lora.up` (diffusers);
  ΔW = s · up @ down, r = down.shape[0].
- locon tucker: + `lora_mid` (r, r, kh, kw); ΔW = s · einsum('mnkl,im,nj->ijkl', mid, up, down).
- loha: `hada_w1_a` (out, r), `hada_w1_b` (r, in·k·k), `hada_w2_a`, `hada_w2_b`;
  ΔW = s · (w1a @ w1b) ⊙ (w2a @ w2b), r = w1b.shape[0].
- loha tucker: + `hada_t1`, `hada_t2` (r, r, kh, kw), with `hada_wX_a` (r, out) and `hada_wX_b` (r, in);
  each side is einsum('ijkl,jr,ip->prkl', t, wb, wa), then multiplied elementwise, times s.
- lokr: `lokr_w1` or `lokr_w1_a` @ `lokr_w1_b`; `lokr_w2` or `lokr_w2_a` @ `lokr_w2_b` (or the tucker
  einsum('ijkl,ip,jr->prkl', lokr_t2, w2a, w2b)); ΔW = s' · kron(w1, w2) with s' = alpha / r, r = w1_b.shape[0]
  or w2_b.shape[0], only when a side is factorised; with both sides full matrices alpha is ignored (s' = 1).
- full: `diff` (and `diff_b` for the bias): ΔW = diff.
- norm: `w_norm`, `b_norm`: the norm layer's weight and bias deltas.

DoRA (`dora_scale`, peft `lora_magnitude_vector`) turns the result into
W' = W + strength · (m ⊙ (W + ΔW) / ‖W + ΔW‖ − W), the norm per output row (or per input column when the scale
has shape (1, in, ...)), as ComfyUI applies it; at strength 1 this equals LyCORIS' forward pass.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mergekit_sdxl.arch.detect import detect_arch
from mergekit_sdxl.arch.lora_names import (
    LoraModule,
    adapter_arch_from_keys,
    lora_modules,
    name_index,
    normalize_name,
)
from mergekit_sdxl.arch.registry import arch_name
from mergekit_sdxl.errors import ArchError, CheckpointError
from mergekit_sdxl.io import jsonio
from mergekit_sdxl.io.reader import open_checkpoint
from mergekit_sdxl.lora.keys import algo_of, split_key
from mergekit_sdxl.lora.svd import small_op_threads


@dataclass
class AdapterLayer:
    """One module's tensors in an adapter file: part name -> file key."""

    module: LoraModule
    keys: dict[str, str] = field(default_factory=dict)

    @property
    def algo(self) -> str:
        """Which formula applies (see the module docstring); "" when the keys make no known combination."""
        return algo_of(self.keys)

    @property
    def has_dora(self) -> bool:
        """True when the layer carries a DoRA magnitude."""
        return "dora_scale" in self.keys


@dataclass
class LayerDelta:
    """What one adapter layer contributes, in the module's own layout (fp32): weight and bias deltas, and the
    DoRA magnitude when the layer is weight-decomposed (then `weight` is the ΔW that goes inside the norm)."""

    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    dora_scale: torch.Tensor | None = None


def refuse_checkpoint(keys: Iterable[str], path: str | os.PathLike[str]) -> None:
    """CheckpointError (exit 4) when `keys` are a checkpoint's (its fingerprint keys), not an adapter's: a user who
    passes a model where a LoRA belongs gets that said, not "N keys match no module"."""
    try:
        arch = detect_arch(keys, str(path))
    except ArchError:
        return
    raise CheckpointError(f"{path}: is a checkpoint ({arch_name(arch)}), not a LoRA/LyCORIS adapter (to make one "
                          "from two checkpoints: mergekit-sdxl extract-lora BASE TUNED)")


def guess_arch(keys: Iterable[str]) -> str | None:
    """The architecture id from adapter key names (te1/te2 vs te prefixes), None when only the UNet is present."""
    return adapter_arch_from_keys(keys)


class Adapter:
    """An opened adapter file whose layers are mapped to the modules of a checkpoint layout.

    Args:
        path: the adapter (.safetensors, or a weights-only .pt).
        arch: the checkpoint's architecture.
        modules: the checkpoint's LoRA-addressable modules (`lora_modules(arch, header shapes)`).

    After construction, `layers` maps module name -> AdapterLayer and `unknown` lists keys that matched no module
    (or no format). Nothing but the header and the small `alpha` tensors is read until `layer_delta`.
    """

    def __init__(self, path: str | os.PathLike[str], arch: str, modules: Iterable[LoraModule] | None = None) -> None:
        self.path = Path(path)
        self.arch = arch
        self.reader = open_checkpoint(self.path)
        self.metadata = dict(self.reader.metadata)
        keys = self.reader.keys()
        try:
            refuse_checkpoint(keys, self.path)
        except CheckpointError:
            self.close()
            raise
        guessed = guess_arch(keys)
        if guessed is not None and guessed != arch:
            self.close()
            raise ArchError(f"{self.path}: is an adapter for {arch_name(guessed)} (key names), but the checkpoint "
                            f"is {arch_name(arch)}")
        index = name_index(modules if modules is not None else lora_modules(arch))
        self.layers: dict[str, AdapterLayer] = {}
        self.unknown: list[str] = []
        for key in keys:
            split = split_key(key)
            module = index.get(normalize_name(split[0], arch)) if split else None
            if split is None or module is None:
                self.unknown.append(key)
                continue
            layer = self.layers.setdefault(module.name, AdapterLayer(module))
            if split[1] in layer.keys:
                raise CheckpointError(f"{self.path}: keys {layer.keys[split[1]]!r} and {key!r} both give "
                                      f"{split[1]} of module {module.name}")
            layer.keys[split[1]] = key
        for name, layer in list(self.layers.items()):
            if not layer.algo:
                self.unknown.extend(layer.keys.values())
                del self.layers[name]
        self._peft_alphas = _peft_alphas(self.metadata, str(self.path))

    def close(self) -> None:
        """Close the file."""
        self.reader.close()

    def read(self, key: str) -> torch.Tensor:
        """One tensor of the file as fp32."""
        return self.reader.read(key).float()

    def alpha(self, layer: AdapterLayer) -> float | None:
        """The layer's alpha (0-d, [1], int or fp16 tensors all work), or None when the file has none."""
        if "alpha" in layer.keys:
            tensor = self.reader.read(layer.keys["alpha"])
            if tensor.numel() != 1:
                raise CheckpointError(f"{self.path}: {layer.keys['alpha']!r} has {tensor.numel()} values, "
                                      "expected one alpha")
            return float(tensor.reshape(()).double())
        return self._peft_alphas(layer.module) if self._peft_alphas else None

    def layer_delta(self, layer: AdapterLayer) -> LayerDelta:
        """The layer's ΔW (module layout, fp32, before strength) and bias delta; CheckpointError on bad shapes.

        The factors' shapes are checked against the layer from the header before anything is read or multiplied:
        a tiny file cannot make the product (or a DoRA scale) huge."""
        self.check_shapes(layer)
        try:
            with small_op_threads(_numel(layer.module.shape)):
                result = _DELTAS[layer.algo](self, layer)
        except (RuntimeError, ValueError, IndexError) as exc:
            shapes = {part: list(self.reader.info(key).shape) for part, key in layer.keys.items()}
            raise CheckpointError(f"{self.path}: module {layer.module.name} ({layer.algo}): tensors {shapes} do not "
                                  f"fit the layer's weight {list(layer.module.shape)}: {exc}") from exc
        for part in (result.weight, result.bias, result.dora_scale):  # NaN/Inf in a file: named here, not by an SVD
            if part is not None and not bool(torch.isfinite(part).all()):
                raise CheckpointError(f"{self.path}: module {layer.module.name} ({layer.algo}): the adapter holds "
                                      "non-finite values (NaN or Inf)")
        return result

    def check_shapes(self, layer: AdapterLayer) -> None:
        """CheckpointError unless the layer's factors (header shapes only) multiply out to the layer's weight."""
        shapes = {part: tuple(self.reader.info(key).shape) for part, key in layer.keys.items()}
        target = _numel(layer.module.shape)
        try:
            produced = _PRODUCTS[layer.algo](shapes)
        except (KeyError, IndexError, ZeroDivisionError):
            produced = None
        if produced is not None and produced != target:
            raise CheckpointError(f"{self.path}: module {layer.module.name} ({layer.algo}): tensors "
                                  f"{ {k: list(v) for k, v in shapes.items()} } do not fit the layer's weight "
                                  f"{list(layer.module.shape)}")
        if produced is None and layer.algo in ("lora", "loha", "lokr"):
            raise CheckpointError(f"{self.path}: module {layer.module.name} ({layer.algo}): tensors "
                                  f"{ {k: list(v) for k, v in shapes.items()} } are not a valid factorisation")
        if "dora_scale" in shapes:
            out_dim = layer.module.shape[0]
            in_dim = layer.module.shape[1] if len(layer.module.shape) > 1 else -1
            if _numel(shapes["dora_scale"]) not in (out_dim, in_dim):
                raise CheckpointError(f"{self.path}: module {layer.module.name}: dora_scale of shape "
                                      f"{list(shapes['dora_scale'])} does not fit a weight of "
                                      f"{list(layer.module.shape)}")


def _lora_numel(s: dict[str, tuple[int, ...]]) -> int | None:
    down, up = s["down"], s["up"]
    rank = down[0]
    if not rank or _numel(up) != up[0] * rank:
        return None
    inner = _numel(down) // rank
    if "mid" in s:
        mid = s["mid"]
        if len(mid) < 2 or mid[0] != rank or mid[1] != rank:
            return None
        return up[0] * inner * _numel(mid[2:])
    return up[0] * inner


def _loha_numel(s: dict[str, tuple[int, ...]]) -> int | None:
    sides = []
    for w in ("1", "2"):
        a, b = s[f"hada_w{w}_a"], s[f"hada_w{w}_b"]
        t = s.get(f"hada_t{w}")
        if t is not None:  # Tucker: (p, r, k...) from t (i, j, k...), b (j, r), a (i, p)
            if len(t) < 2 or len(a) != 2 or len(b) != 2 or t[0] != a[0] or t[1] != b[0]:
                return None
            sides.append(a[1] * b[1] * _numel(t[2:]))
        elif len(a) != 2 or not b or a[1] != b[0]:
            return None
        else:
            sides.append(a[0] * _numel(b) // b[0])
    return sides[0] if sides[0] == sides[1] else None


def _lokr_numel(s: dict[str, tuple[int, ...]]) -> int | None:
    def side(w: str) -> int | None:
        if f"lokr_w{w}" in s:
            return _numel(s[f"lokr_w{w}"])
        a, b = s[f"lokr_w{w}_a"], s[f"lokr_w{w}_b"]
        t = s.get(f"lokr_t{w}")
        if t is not None:  # Tucker: (p, r, k...) from t (i, j, k...), a (i, p), b (j, r)
            if len(t) < 2 or len(a) != 2 or len(b) != 2 or t[0] != a[0] or t[1] != b[0]:
                return None
            return a[1] * b[1] * _numel(t[2:])
        if len(a) != 2 or not b or a[1] != b[0]:
            return None
        return a[0] * _numel(b) // b[0]
    one, two = side("1"), side("2")
    return None if one is None or two is None else one * two


_PRODUCTS: dict[str, Callable[[dict[str, tuple[int, ...]]], int | None]] = {
    "lora": _lora_numel, "loha": _loha_numel, "lokr": _lokr_numel,
    "full": lambda s: _numel(s["diff"]) if "diff" in s else None,
    "norm": lambda s: _numel(s["w_norm"]) if "w_norm" in s else None,
}


def _scale(alpha: float | None, rank: int) -> float:
    return 1.0 if alpha is None or alpha == 0 or rank == 0 else alpha / rank


def _fit(delta: torch.Tensor, module: LoraModule) -> torch.Tensor:
    """Reshape to the module's weight shape (conv 1x1 <-> linear factors); the element count must match."""
    if tuple(delta.shape) == module.shape:
        return delta
    if delta.numel() != _numel(module.shape):
        raise ValueError(f"ΔW has shape {list(delta.shape)}")
    return delta.reshape(module.shape)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _dora(adapter: Adapter, layer: AdapterLayer) -> torch.Tensor | None:
    return adapter.read(layer.keys["dora_scale"]) if layer.has_dora else None


def _lora_delta(adapter: Adapter, layer: AdapterLayer) -> LayerDelta:
    down, up = adapter.read(layer.keys["down"]), adapter.read(layer.keys["up"])
    rank = down.shape[0]
    scale = _scale(adapter.alpha(layer), rank)
    out = up.shape[0]
    if "mid" in layer.keys:
        mid = adapter.read(layer.keys["mid"])
        delta = torch.einsum("mnkl,im,nj->ijkl", mid, up.reshape(out, -1), down.reshape(rank, -1))
    else:
        delta = up.reshape(out, -1) @ down.reshape(rank, -1)
    return LayerDelta(_fit(delta * scale, layer.module), dora_scale=_dora(adapter, layer))


def _loha_delta(adapter: Adapter, layer: AdapterLayer) -> LayerDelta:
    k = layer.keys
    w1a, w1b, w2a, w2b = (adapter.read(k[p]) for p in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"))
    rank = w1b.shape[0]
    scale = _scale(adapter.alpha(layer), rank)
    if "hada_t1" in k and "hada_t2" in k:
        t1, t2 = adapter.read(k["hada_t1"]), adapter.read(k["hada_t2"])
        side1 = torch.einsum("ij...,jr,ip->pr...", t1, w1b, w1a)
        side2 = torch.einsum("ij...,jr,ip->pr...", t2, w2b, w2a)
        delta = side1 * side2
    else:
        delta = (w1a @ w1b.reshape(rank, -1)) * (w2a @ w2b.reshape(w2b.shape[0], -1))
    return LayerDelta(_fit(delta * scale, layer.module), dora_scale=_dora(adapter, layer))


def _lokr_delta(adapter: Adapter, layer: AdapterLayer) -> LayerDelta:
    k = layer.keys
    rank = None
    if "lokr_w1" in k:
        w1 = adapter.read(k["lokr_w1"])
    else:
        w1a, w1b = adapter.read(k["lokr_w1_a"]), adapter.read(k["lokr_w1_b"])
        rank = w1b.shape[0]
        w1 = w1a @ w1b
    if "lokr_w2" in k:
        w2 = adapter.read(k["lokr_w2"])
    else:
        w2a, w2b = adapter.read(k["lokr_w2_a"]), adapter.read(k["lokr_w2_b"])
        rank = w2b.shape[0] if rank is None else rank
        if "lokr_t2" in k:
            w2 = torch.einsum("ij...,ip,jr->pr...", adapter.read(k["lokr_t2"]), w2a, w2b)
        else:
            w2 = w2a @ w2b.reshape(w2b.shape[0], -1)
            if layer.module.is_conv:
                kernel = layer.module.shape[2:]
                w2 = w2.reshape(w2.shape[0], -1, *kernel)
    scale = 1.0 if rank is None else _scale(adapter.alpha(layer), rank)
    while w1.dim() < w2.dim():
        w1 = w1.unsqueeze(-1)
    delta = torch.kron(w1.contiguous(), w2.contiguous())
    return LayerDelta(_fit(delta * scale, layer.module), dora_scale=_dora(adapter, layer))


def _full_delta(adapter: Adapter, layer: AdapterLayer) -> LayerDelta:
    weight = _fit(adapter.read(layer.keys["diff"]), layer.module) if "diff" in layer.keys else None
    bias = adapter.read(layer.keys["diff_b"]) if "diff_b" in layer.keys else None
    return LayerDelta(weight, bias)


def _norm_delta(adapter: Adapter, layer: AdapterLayer) -> LayerDelta:
    weight = _fit(adapter.read(layer.keys["w_norm"]), layer.module) if "w_norm" in layer.keys else None
    bias = adapter.read(layer.keys["b_norm"]) if "b_norm" in layer.keys else None
    return LayerDelta(weight, bias)


_DELTAS: dict[str, Callable[[Adapter, AdapterLayer], LayerDelta]] = {
    "lora": _lora_delta, "loha": _loha_delta, "lokr": _lokr_delta, "full": _full_delta, "norm": _norm_delta,
}


def apply_dora(weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor, strength: float) -> torch.Tensor:
    """The DoRA change W' − W = strength · (m ⊙ (W + ΔW) / ‖W + ΔW‖ − W), all fp32, module layout.

    The norm runs over every axis but the output one, unless `magnitude` has shape (1, in, ...) (LyCORIS'
    `wd_on_out=False`), which normalises per input column.
    """
    merged = weight + delta
    m = magnitude
    if m.dim() == 1 or (m.dim() >= 2 and m.shape[0] == weight.shape[0] and m.numel() == weight.shape[0]):
        m = m.reshape(weight.shape[0], *[1] * (weight.dim() - 1))
        norm = merged.reshape(weight.shape[0], -1).norm(dim=1).reshape(m.shape)
    elif m.dim() >= 2 and m.shape[0] == 1 and m.numel() == weight.shape[1]:
        m = m.reshape(1, weight.shape[1], *[1] * (weight.dim() - 2))
        norm = merged.transpose(0, 1).reshape(weight.shape[1], -1).norm(dim=1).reshape(m.shape)
    else:
        raise ValueError(f"DoRA scale of shape {list(magnitude.shape)} does not fit a weight of {list(weight.shape)}")
    norm = norm + torch.finfo(torch.float32).eps
    return strength * (merged * (m / norm) - weight)


def _peft_alphas(metadata: Mapping[str, str], path: str) -> Callable[[LoraModule], float | None] | None:
    """Alpha per module from diffusers' `lora_adapter_metadata` (peft LoraConfig per component), if present."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return None
    config = jsonio.loads(raw, f"{path}: lora_adapter_metadata", max_bytes=16 << 20, max_depth=16)
    if not isinstance(config, dict):
        return None

    def number(value: object, what: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise CheckpointError(f"{path}: lora_adapter_metadata: {what} is {value!r}, not a number")
        try:
            out = float(value)
        except ValueError:
            raise CheckpointError(f"{path}: lora_adapter_metadata: {what} is {value!r}, not a number") from None
        if not math.isfinite(out):
            raise CheckpointError(f"{path}: lora_adapter_metadata: {what} is {value!r}, not a finite number")
        return out

    def lookup(module: LoraModule) -> float | None:
        component, _, path = module.diffusers.partition(".")
        patterns = config.get(f"{component}.alpha_pattern") or {}
        if not isinstance(patterns, dict):
            raise CheckpointError(f"{path}: lora_adapter_metadata: {component}.alpha_pattern is not a mapping")
        for pattern, value in patterns.items():
            if path == pattern or path.endswith("." + pattern):
                return number(value, f"{component}.alpha_pattern[{pattern!r}]")
        alpha = config.get(f"{component}.lora_alpha")
        return None if alpha is None else number(alpha, f"{component}.lora_alpha")

    return lookup
