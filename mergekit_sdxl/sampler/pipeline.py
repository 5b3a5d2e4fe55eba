"""Text-to-image with one loaded model: encode prompts, sample latents, decode with the VAE.

An image depends only on its settings and its own seed: each image of a batch has its own CPU generator
(seed + i for a batch rendered from one seed), so image i of a batch equals the single render with seed + i, on
any device.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from mergekit_sdxl.arch.keymap import TEXT_ENCODER, TEXT_ENCODER_2, UNET, VAE
from mergekit_sdxl.sampler.conditioning import Cond, PromptEncoder
from mergekit_sdxl.sampler.denoiser import Denoiser, Guidance, sdxl_time_ids
from mergekit_sdxl.sampler.models import Model
from mergekit_sdxl.sampler.noise import ImageNoise
from mergekit_sdxl.sampler.samplers import SAMPLERS
from mergekit_sdxl.sampler.schedules import SCHEDULES, DiscreteSchedule, get_sigmas

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

    def check(self) -> None:
        """ValueError for settings no sampler can run."""
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}; choose one of {', '.join(SAMPLERS)}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if self.steps < 1 or self.width % LATENT_FACTOR or self.height % LATENT_FACTOR:
            raise ValueError("steps must be >= 1 and both sides multiples of 8")


class Renderer:
    """Renders images with the model currently loaded (`model`); prompts are encoded once per model."""

    def __init__(self, model: Model) -> None:
        self.model = model
        m = model.modules
        self.schedule = DiscreteSchedule(ztsnr=model.ztsnr)
        self.denoiser = Denoiser(m[UNET], self.schedule, model.prediction)
        self._encoders: dict[int, PromptEncoder] = {}
        self._conds: dict[tuple[str, bool, int], Cond] = {}

    @property
    def device(self) -> torch.device:
        """The device the UNet runs on."""
        return next(self.model.modules[UNET].parameters()).device

    def encode(self, prompt: str, negative: bool = False, clip_skip: int = 1) -> Cond:
        """Conditioning of `prompt` (cached for this model)."""
        key = (prompt, negative, clip_skip if self.model.arch == "sd15" else 1)
        if key not in self._conds:
            self._conds[key] = self._encoder(key[2]).encode(prompt, negative=negative)
        return self._conds[key]

    def _encoder(self, clip_skip: int) -> PromptEncoder:
        if clip_skip not in self._encoders:
            m = self.model.modules
            self._encoders[clip_skip] = PromptEncoder(m[TEXT_ENCODER], m.get(TEXT_ENCODER_2), clip_skip)
        return self._encoders[clip_skip]

    @torch.inference_mode()
    def sample(self, params: GenParams, seeds: Sequence[int], callback: StepCallback | None = None,
               ) -> torch.Tensor:
        """Latents [B, 4, h, w] (float32) of one image per seed."""
        params.check()
        cond = self.encode(params.prompt, clip_skip=params.clip_skip)
        uncond = self.encode(params.negative, negative=True, clip_skip=params.clip_skip)
        sdxl = self.model.arch == "sdxl"
        time_ids = sdxl_time_ids(params.height, params.width).to(self.device) if sdxl else None
        guidance = Guidance(cond, uncond, params.cfg, time_ids)
        shape = (self.model.configs[UNET]["in_channels"], params.height // LATENT_FACTOR,
                 params.width // LATENT_FACTOR)
        noise = ImageNoise(list(seeds), shape, self.device)
        sigmas = get_sigmas(params.schedule, params.steps, self.schedule, self.device)
        x = noise.draw() * sigmas[0]
        step = None if callback is None else (lambda i, _x, _d: callback(i + 1, params.steps))
        return SAMPLERS[params.sampler](lambda x_, s_: self.denoiser(x_, s_, guidance), x, sigmas,
                                        noise=noise, callback=step)

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images as float32 [B, 3, H, W] in 0..1, one VAE call per image; NaN output is retried in float32."""
        return torch.cat([self._decode_one(latents[i : i + 1]) for i in range(latents.shape[0])])

    def _decode_one(self, latent: torch.Tensor) -> torch.Tensor:
        vae = self.model.modules[VAE]
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
