"""The UNet as a k-diffusion denoiser: `denoised = D(x, sigma)`, with classifier-free guidance.

Preconditioning follows k-diffusion's `CompVisDenoiser` (eps) and `CompVisVDenoiser` (v, sigma_data = 1):
the UNet sees `x / sqrt(sigma^2 + 1)` and the fractional timestep of `sigma`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mergekit_sdxl.sampler.conditioning import Cond
from mergekit_sdxl.sampler.schedules import DiscreteSchedule


@dataclass
class Guidance:
    """Everything the UNet needs besides x and sigma for one batch: both conditionings, CFG scale, SDXL ids."""

    cond: Cond
    uncond: Cond
    scale: float
    time_ids: torch.Tensor | None = None  # [6]: orig h, w, crop top, left, target h, w (SDXL)


def sdxl_time_ids(height: int, width: int) -> torch.Tensor:
    """SDXL size/crop conditioning with original = target = (height, width) and crop (0, 0), as A1111 sends."""
    return torch.tensor([height, width, 0, 0, height, width], dtype=torch.float32)


class Denoiser:
    """Wraps a diffusers `UNet2DConditionModel`; `prediction` is "eps" or "v"."""

    def __init__(self, unet: torch.nn.Module, schedule: DiscreteSchedule, prediction: str = "eps") -> None:
        if prediction not in ("eps", "v"):
            raise ValueError(f"prediction must be 'eps' or 'v', not {prediction!r}")
        self.unet, self.schedule, self.prediction = unet, schedule, prediction
        self.dtype = next(unet.parameters()).dtype

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, guidance: Guidance) -> torch.Tensor:
        """Guided denoised prediction for latents `x` [B, 4, h, w] at per-image `sigma` [B]."""
        out = self._guided_output(x, sigma, guidance)
        s = sigma.float()[:, None, None, None]
        if self.prediction == "eps":
            return x - out * s
        return x / (s**2 + 1) - out * s / (s**2 + 1) ** 0.5

    def _guided_output(self, x: torch.Tensor, sigma: torch.Tensor, g: Guidance) -> torch.Tensor:
        x_in = (x / (sigma.float()[:, None, None, None] ** 2 + 1) ** 0.5).to(self.dtype)
        t = self.schedule.sigma_to_t(sigma)
        n = x.shape[0]
        if g.scale == 1.0:
            return self.unet_output(x_in, t, *_rows(g.cond, n), g.time_ids)
        if g.cond.context.shape == g.uncond.context.shape:
            (uc, up), (cc, cp) = _rows(g.uncond, n), _rows(g.cond, n)
            pooled = None if up is None else torch.cat([up, cp])
            out = self.unet_output(torch.cat([x_in, x_in]), torch.cat([t, t]), torch.cat([uc, cc]), pooled, g.time_ids)
            uncond, cond = out.chunk(2)
        else:  # different chunk counts: two calls (A1111 does the same unless told to pad)
            uncond = self.unet_output(x_in, t, *_rows(g.uncond, n), g.time_ids)
            cond = self.unet_output(x_in, t, *_rows(g.cond, n), g.time_ids)
        return uncond + (cond - uncond) * g.scale

    def unet_output(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor | None,
                    time_ids: torch.Tensor | None) -> torch.Tensor:
        """One UNet call on a batch (context and pooled have one row per image); returns float32."""
        added = None
        if pooled is not None:
            ids = time_ids.to(x.device, self.dtype)[None].expand(x.shape[0], -1)
            added = {"text_embeds": pooled.to(self.dtype), "time_ids": ids}
        out = self.unet(x, t.to(x.device), encoder_hidden_states=context.to(self.dtype), added_cond_kwargs=added,
                        return_dict=False)[0]
        return out.float()


def _rows(cond: Cond, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(context, pooled) of `cond` expanded to `n` rows."""
    context = cond.context.expand(n, *cond.context.shape[1:])
    pooled = None if cond.pooled is None else cond.pooled.expand(n, *cond.pooled.shape[1:])
    return context, pooled
