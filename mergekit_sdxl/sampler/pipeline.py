"""Text-to-image with one loaded model: encode prompts, sample latents, decode with the VAE.

An image depends only on its settings and its own seed: each image of a batch has its own CPU generator
(seed + i for a batch rendered from one seed), so image i of a batch equals the single render with seed + i, on
any device.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mergekit_sdxl.arch.keymap import TEXT_ENCODER, TEXT_ENCODER_2, UNET, VAE
from mergekit_sdxl.arch.registry import arch_spec
from mergekit_sdxl.errors import UsageError
from mergekit_sdxl.sampler.catalog import sampler_name, schedule_name
from mergekit_sdxl.sampler.conditioning import Cond, PromptEncoder
from mergekit_sdxl.sampler.denoiser import Denoiser, Guidance, Schedule, sdxl_time_ids
from mergekit_sdxl.sampler.embeddings import EmbeddingSet
from mergekit_sdxl.sampler.lora_apply import AppliedAdapters
from mergekit_sdxl.sampler.models import Model, ModelSlot
from mergekit_sdxl.sampler.noise import ImageNoise, check_rng
from mergekit_sdxl.sampler.prompt_loras import LoraTag, adapter_specs, extract_lora_tags, lora_hashes
from mergekit_sdxl.sampler.prompt_schedule import prompt_schedule, split_and
from mergekit_sdxl.sampler.samplers import sampler_function
from mergekit_sdxl.sampler.schedules import DiscreteSchedule, get_sigmas

LATENT_FACTOR = 8
StepCallback = Callable[[int, int], None]  # (step done, total steps)


@dataclass(frozen=True)
class GenParams:
    """Generation settings of one image (A1111's names in comments)."""

    prompt: str
    negative: str = ""
    steps: int = 28  # Steps
    cfg: float = 6.0  # CFG scale
    sampler: str = "euler_a"  # Sampler
    schedule: str = "normal"  # Schedule type
    width: int = 1024
    height: int = 1024
    clip_skip: int = 1  # SD1.5 only ("Clip skip")
    rng: str = "cpu"  # RNG: cpu, gpu (CUDA generator) or nv (CUDA's stream emulated on the CPU)

    def check(self) -> None:
        """ValueError for settings no sampler can run."""
        sampler_name(self.sampler)
        schedule_name(self.schedule)
        if self.steps < 1 or self.width % LATENT_FACTOR or self.height % LATENT_FACTOR:
            raise ValueError("steps must be >= 1 and both sides multiples of 8")


class Renderer:
    """Renders images with the model currently loaded (`model`); prompts are encoded once per model and text.

    `slot` (the `ModelSlot` holding `model`) is needed for `<lora:...>` in prompts, found under `lora_dir`;
    `embeddings_dir` holds textual-inversion embeddings used by name.
    """

    def __init__(self, model: Model, slot: ModelSlot | None = None, lora_dir: str | Path | None = None,
                 embeddings_dir: str | Path | None = None) -> None:
        self.model, self.slot, self.lora_dir = model, slot, lora_dir
        m = model.modules
        self.schedule = DiscreteSchedule(ztsnr=model.ztsnr)
        self.denoiser = Denoiser(m[UNET], self.schedule, model.prediction)
        width = sum(_hidden_size(m) for k, m in model.modules.items() if k in (TEXT_ENCODER, TEXT_ENCODER_2))
        self.embeddings = EmbeddingSet.load(embeddings_dir, width) if embeddings_dir else None
        self._encoders: dict[int, PromptEncoder] = {}
        self._conds: dict[tuple[str, bool, int], Cond] = {}
        self._adapters: AppliedAdapters | None = None
        self._lora_key: tuple = ()
        self._lora_hashes = ""

    @property
    def device(self) -> torch.device:
        """The device the UNet runs on."""
        return next(self.model.modules[UNET].parameters()).device

    def encode(self, prompt: str, negative: bool = False, clip_skip: int = 1) -> Cond:
        """Conditioning of `prompt` (cached for this model and its current adapters)."""
        key = (prompt, negative, clip_skip if arch_spec(self.model.arch).sampler.clip_skip else 1)
        if key not in self._conds:
            self._conds[key] = self._encoder(key[2]).encode(prompt, negative=negative)
        return self._conds[key]

    def schedule_conds(self, prompt: str, total_steps: int, clip_skip: int = 1, negative: bool = False) -> Schedule:
        """[(last model call, Cond), ...] of `prompt`'s editing/alternation schedule; each text encoded once."""
        return [(end, self.encode(text, negative, clip_skip)) for end, text in prompt_schedule(prompt, total_steps)]

    def _encoder(self, clip_skip: int) -> PromptEncoder:
        if clip_skip not in self._encoders:
            m = self.model.modules
            self._encoders[clip_skip] = PromptEncoder(m[TEXT_ENCODER], m.get(TEXT_ENCODER_2), clip_skip,
                                                      self.embeddings)
        return self._encoders[clip_skip]

    def set_loras(self, tags: Sequence[LoraTag]) -> None:
        """Apply the adapters of `tags` to the loaded model (taking off the previous ones); cached conds reset."""
        specs = adapter_specs(tags, self.lora_dir) if tags else []
        key = tuple((s.path, s.strength, s.te_strength, s.blocks) for s in specs)  # lbw= changes re-apply
        if key == self._lora_key:
            return
        if self.slot is None and specs:
            raise UsageError("<lora:...> in a prompt needs the model slot the renderer was built from")
        if self._adapters is not None:
            self._adapters.restore()
            self._adapters = None
        self._conds.clear()
        self._lora_key, self._lora_hashes = (), ""
        if specs:
            assert self.slot is not None  # refused above
            self._adapters = AppliedAdapters(self.slot, specs)
            self._lora_key, self._lora_hashes = key, lora_hashes(tags, specs)

    def cell_fields(self, params: GenParams) -> dict[str, str]:
        """A1111 `parameters` fields of a cell rendered with `params`: `TI hashes` and `Lora hashes`."""
        text, tags, _ = extract_lora_tags(params.prompt)
        fields = {}
        used = [name for t in (text, params.negative) for name in self._encoder(1).embedding_names(t)]
        if used and self.embeddings is not None:
            fields["TI hashes"] = ", ".join(f"{n.replace(':', '').replace(',', '')}: "
                                            f"{self.embeddings.embeddings[n].shorthash}" for n in dict.fromkeys(used))
        if tags:
            self.set_loras(tags)
            fields["Lora hashes"] = self._lora_hashes
        return fields

    @torch.inference_mode()
    def sample(self, params: GenParams, seeds: Sequence[int], callback: StepCallback | None = None,
               ) -> torch.Tensor:
        """Latents [B, 4, h, w] (float32) of one image per seed."""
        params.check()
        info = sampler_name(params.sampler)
        prompt, tags, ignored = extract_lora_tags(params.prompt)
        if ignored:
            warnings.warn(f"extra-network tags other than <lora:...> are ignored: {', '.join(ignored)}",
                          stacklevel=2)
        self.set_loras(tags)
        # A1111 counts prompt-editing steps over twice the steps for samplers that call the model twice a step
        total_steps = params.steps * (2 if info.second_order else 1)
        conds = [(self.schedule_conds(text, total_steps, params.clip_skip), weight)
                 for text, weight in split_and(prompt)]
        uncond = self.schedule_conds(params.negative, total_steps, params.clip_skip, negative=True)
        sized = arch_spec(self.model.arch).sampler.size_conditioning
        time_ids = sdxl_time_ids(params.height, params.width).to(self.device) if sized else None
        guidance = Guidance(conds, uncond, params.cfg, time_ids)
        shape = (self.model.configs[UNET]["in_channels"], params.height // LATENT_FACTOR,
                 params.width // LATENT_FACTOR)
        check_rng(params.rng, self.device)
        noise = ImageNoise(list(seeds), shape, self.device, params.rng)
        sigmas = get_sigmas(params.schedule, params.steps, self.schedule, self.device, self.model.arch,
                            discard_penultimate=info.discard_penultimate)
        x = noise.draw() * sigmas[0]
        total = len(sigmas) - 1
        step = None if callback is None else (lambda i, _x, _d: callback(i + 1, total))
        sampler_noise = noise.brownian(sigmas) if info.brownian else noise
        return sampler_function(info.name)(lambda x_, s_: self.denoiser(x_, s_, guidance), x, sigmas,
                                           noise=sampler_noise, callback=step)

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images as float32 [B, 3, H, W] in 0..1, one VAE call per image; NaN output is retried in float32."""
        return torch.cat([self._decode_one(latents[i : i + 1]) for i in range(latents.shape[0])])

    def _decode_one(self, latent: torch.Tensor) -> torch.Tensor:
        vae: Any = self.model.modules[VAE]  # a diffusers AutoencoderKL: torch's Module typing hides `decode`
        dtype = next(vae.parameters()).dtype
        z = (latent / self.model.latent_scale).to(dtype)
        image = vae.decode(z, return_dict=False)[0].float()
        if not torch.isfinite(image).all() and dtype != torch.float32:
            warnings.warn(f"VAE decode in {dtype} gave NaN/inf; decoding in float32 from now on", stacklevel=2)
            vae.to(torch.float32)
            image = vae.decode(latent / self.model.latent_scale, return_dict=False)[0].float()
        return ((image + 1) / 2).clamp(0, 1)

    def render(self, params: GenParams, seeds: Sequence[int], callback: StepCallback | None = None) -> list:
        """PIL images, one per seed."""
        return [to_pil(img) for img in self.decode(self.sample(params, seeds, callback))]


def to_pil(image: torch.Tensor) -> object:
    """A PIL image from float [3, H, W] in 0..1; truncates to 8 bits as A1111 does."""
    from PIL import Image

    array = (image.permute(1, 2, 0).cpu().float().numpy() * 255.0).astype("uint8")
    return Image.fromarray(array)


def _hidden_size(encoder: Any) -> int:
    """A transformers text encoder's width (torch's Module typing hides `config`)."""
    return int(encoder.config.hidden_size)
