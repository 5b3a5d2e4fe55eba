"""Learned scorers on a local CLIP: `aesthetic` (image embedding -> LAION-style head) and `clip` (prompt-image
similarity). Nothing is downloaded: the user names the files, and a missing one is an error naming what to provide.

CLIP: a folder in the transformers layout (`config.json` + `model.safetensors`, e.g. a copy of
openai/clip-vit-large-patch14), or a weights file (`.safetensors`, or `.pt/.pth/.bin` read with
`torch.load(weights_only=True)` only) with its `config.json` beside it. Head: the LAION aesthetic predictor layout
(`layers.0 .. layers.7`, a chain of linear layers on the L2-normalised image embedding, as its reference code does)
or a single linear layer (`weight` [1, D], `bias` [1]).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from mergekit_sdxl.errors import CheckpointError, UsageError
from mergekit_sdxl.search.scoring import ScoredImage, existing_file

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # the CLIP image processor's normalisation (OpenAI)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
WEIGHT_NAMES = ("model.safetensors", "pytorch_model.bin")
CLIP_HINT = ("a CLIP in the transformers layout: a folder with config.json and model.safetensors (e.g. a copy of "
             "openai/clip-vit-large-patch14), given with --clip")
HEAD_HINT = ("the aesthetic head's weights, given with --aesthetic-head (e.g. the LAION predictor "
             "sac+logos+ava1-l14-linearMSE.pth for CLIP ViT-L/14, or a .safetensors of it)")
_LAYER = re.compile(r"^(?:.*\.)?layers\.(\d+)\.(weight|bias)$")


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """A flat state dict from safetensors, or from a torch file through `weights_only` (pickles are refused)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # noqa: BLE001 - any parse failure is an unreadable file
            raise CheckpointError(f"{path}: not a readable safetensors file: {exc}") from exc
    from mergekit_sdxl.io.ckpt import load_state_dict

    return load_state_dict(path)


class ClipModel:
    """A local CLIP's image tower (and text tower when asked), with CLIP's image preprocessing."""

    def __init__(self, location: Path, device: str = "cpu", text: bool = False) -> None:
        from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModelWithProjection

        weights, config_path = _clip_files(location)
        raw = json.loads(config_path.read_text(encoding="utf-8"))
        if raw.get("model_type") == "clip_vision_model":
            if text:
                raise UsageError(f"{config_path}: a vision-only CLIP; the clip scorer needs the text tower too")
            config: Any = CLIPVisionConfig(**raw)
            model: Any = CLIPVisionModelWithProjection(config)
        else:
            config = CLIPConfig(**raw)
            config.vision_config.projection_dim = config.projection_dim  # the image tower alone keeps the width
            model = CLIPModel(config) if text else CLIPVisionModelWithProjection(config.vision_config)
        _load_strict(model, load_weights(weights), weights)
        self.model = model.eval().requires_grad_(False).to(device)
        vision = config if isinstance(config, CLIPVisionConfig) else config.vision_config
        size = vision.image_size
        if size is None or isinstance(size, (list, tuple)):  # CLIP's towers are square: one number
            raise CheckpointError(f"{config_path}: image_size is {size!r}, expected one number")
        self.image_size = int(size)
        self.device = torch.device(device)
        self.text = text

    def preprocess(self, images: Sequence[Any]) -> torch.Tensor:
        """CLIP's preprocessing: shortest side to the input size (bicubic), centre crop, normalise."""
        import numpy as np
        from PIL import Image

        size = self.image_size
        out = []
        for image in images:
            image = image.convert("RGB")
            scale = size / min(image.size)
            resized = image.resize((max(size, round(image.size[0] * scale)), max(size, round(image.size[1] * scale))),
                                   Image.Resampling.BICUBIC)
            left, top = (resized.size[0] - size) // 2, (resized.size[1] - size) // 2
            array = np.asarray(resized.crop((left, top, left + size, top + size)), dtype=np.float32) / 255.0
            out.append((torch.from_numpy(array) - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD))
        return torch.stack(out).permute(0, 3, 1, 2).to(self.device)

    @torch.inference_mode()
    def image_embeds(self, images: Sequence[Any]) -> torch.Tensor:
        """L2-normalised projected image embeddings [N, D] (float32)."""
        pixels = self.preprocess(images)
        if self.text:
            embeds = self.model.get_image_features(pixel_values=pixels)
        else:
            embeds = self.model(pixel_values=pixels).image_embeds
        embeds = getattr(embeds, "pooler_output", embeds).float()
        return embeds / embeds.norm(dim=-1, keepdim=True)

    @torch.inference_mode()
    def text_embeds(self, prompts: Sequence[str]) -> torch.Tensor:
        """L2-normalised projected text embeddings [N, D] of plain prompts (cut to CLIP's 77 tokens)."""
        from mergekit_sdxl.sampler.tokens import MAX_LENGTH, clip_tokenizer

        tokens = clip_tokenizer()(list(prompts), padding="max_length", max_length=MAX_LENGTH, truncation=True,
                                  return_tensors="pt")
        embeds = self.model.get_text_features(input_ids=tokens["input_ids"].to(self.device),
                                              attention_mask=tokens["attention_mask"].to(self.device))
        embeds = getattr(embeds, "pooler_output", embeds).float()
        return embeds / embeds.norm(dim=-1, keepdim=True)


class AestheticHead(torch.nn.Module):
    """A chain of linear layers (LAION predictor layout: no activations between them) or a single linear layer."""

    def __init__(self, state: Mapping[str, torch.Tensor], where: Path) -> None:
        super().__init__()
        linears = [_linear(w, b) for w, b in _head_layers(state, where)]
        for before, after in zip(linears, linears[1:]):
            if after.in_features != before.out_features:
                raise CheckpointError(f"{where}: head layers do not chain ({before.out_features} outputs feed a "
                                      f"layer taking {after.in_features})")
        if linears[-1].out_features != 1:
            raise CheckpointError(f"{where}: the head's last layer has {linears[-1].out_features} outputs, not 1")
        self.layers = torch.nn.ModuleList(linears)
        self.in_features: int = linears[0].in_features

    @property
    def dtype(self) -> torch.dtype:
        """The weights' dtype: inputs are cast to it."""
        return next(self.parameters()).dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x.squeeze(-1)


class AestheticScorer:
    """Mean predicted aesthetic score of the trial's images."""

    def __init__(self, options: Mapping[str, Any], device: str = "cpu") -> None:
        clip_path = existing_file(options, "clip", "aesthetic", CLIP_HINT)
        head_path = existing_file(options, "aesthetic_head", "aesthetic", HEAD_HINT)
        self.clip = ClipModel(clip_path, device)
        self.head = AestheticHead(load_weights(head_path), head_path).to(device)
        width = int(self.clip.model.config.projection_dim)
        if self.head.in_features != width:
            raise UsageError(f"{head_path}: the head takes {self.head.in_features}-value embeddings, the CLIP at "
                             f"{clip_path} gives {width}; use the head made for that CLIP (ViT-L/14: 768)")

    @torch.inference_mode()
    def __call__(self, images: Sequence[ScoredImage], context: Mapping[str, Any]) -> float:
        embeds = self.clip.image_embeds([i.image for i in images])
        return float(self.head(embeds.to(self.head.dtype)).mean())


class ClipScorer:
    """Mean CLIP similarity (100 x cosine, as CLIPScore reports it) of each image to its prompt."""

    def __init__(self, options: Mapping[str, Any], device: str = "cpu") -> None:
        self.clip = ClipModel(existing_file(options, "clip", "clip", CLIP_HINT), device, text=True)

    def __call__(self, images: Sequence[ScoredImage], context: Mapping[str, Any]) -> float:
        from mergekit_sdxl.sampler.prompt import parse_prompt_attention

        prompts = ["".join(str(part[0]) for part in parse_prompt_attention(i.prompt)) for i in images]
        cosine = (self.clip.image_embeds([i.image for i in images]) * self.clip.text_embeds(prompts)).sum(-1)
        return float(100.0 * cosine.clamp(min=0).mean())


def _clip_files(location: Path) -> tuple[Path, Path]:
    """(weights file, config.json) of a CLIP folder or file; UsageError naming the files to provide."""
    if location.is_dir():
        config = location / "config.json"
        weights = next((location / n for n in WEIGHT_NAMES if (location / n).exists()), None)
        if weights is None or not config.exists():
            lacking = [str(p) for p in (location / WEIGHT_NAMES[0], config) if not p.exists()]
            raise UsageError(f"{location}: missing {' and '.join(lacking)}; provide {CLIP_HINT}")
        return weights, config
    config = location.with_name("config.json")
    if not config.exists():
        raise UsageError(f"{location}: no {config} beside it; provide the CLIP's config.json ({CLIP_HINT})")
    return location, config


def _load_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], where: Path) -> None:
    """Load every weight the model needs; extra keys are allowed only for the other tower of a full CLIP."""
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches: the weights are of another CLIP than the config says
        raise CheckpointError(f"{where}: weights do not fit the CLIP of its config.json: "
                              f"{str(exc).splitlines()[-1].strip()}") from exc
    missing = [k for k in result.missing_keys if not k.endswith("position_ids")]
    other = ("text_model.", "text_projection.", "logit_scale", "vision_model.", "visual_projection.")
    unexpected = [k for k in result.unexpected_keys if not k.startswith(other) and not k.endswith("position_ids")]
    if missing or unexpected:
        shown = ", ".join((missing + unexpected)[:5])
        raise CheckpointError(f"{where}: not a CLIP of the configured shape ({len(missing)} missing, {len(unexpected)} "
                              f"unexpected weights, e.g. {shown}); give a transformers-layout CLIP and its config.json")


def _head_layers(state: Mapping[str, torch.Tensor], where: Path) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    if set(state) <= {"weight", "bias"} and "weight" in state:
        return [(state["weight"], state.get("bias"))]
    layers: dict[int, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        match = _LAYER.match(key)
        if match is None:
            raise CheckpointError(f"{where}: unexpected key {key!r}; an aesthetic head has `layers.N.weight/bias` "
                                  "(LAION predictor) or a single `weight`/`bias`")
        layers.setdefault(int(match.group(1)), {})[match.group(2)] = tensor
    if not layers or any("weight" not in layer for layer in layers.values()):
        raise CheckpointError(f"{where}: no linear layers found (expected `layers.N.weight`)")
    return [(layers[i]["weight"], layers[i].get("bias")) for i in sorted(layers)]


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> torch.nn.Linear:
    if weight.ndim != 2:
        raise CheckpointError(f"a head layer's weight has shape {list(weight.shape)}, expected [out, in]")
    layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        layer.weight.copy_(weight.float())
        if bias is not None:
            layer.bias.copy_(bias.float().reshape(-1))
    return layer.eval().requires_grad_(False)
