"""The UNet as a k-diffusion denoiser: `denoised = D(x, sigma)`, with classifier-free guidance.

Preconditioning follows k-diffusion's `CompVisDenoiser` (eps) and `CompVisVDenoiser` (v, sigma_data = 1):
the UNet sees `x / sqrt(sigma^2 + 1)` and the fractional timestep of `sigma`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from mergekit_sdxl.sampler.conditioning import Cond
from mergekit_sdxl.sampler.schedules import DiscreteSchedule

if TYPE_CHECKING:
    from typing_extensions import TypeIs

Schedule = list[tuple[int, Cond]]  # (last model call it is used for, conditioning), as A1111's prompt schedules


@dataclass
class Guidance:
    """Everything the UNet needs besides x and sigma for one batch: the conditionings, CFG scale, SDXL ids.

    `conds` holds one (schedule, weight) per `AND` sub-prompt; `uncond` the negative prompt's schedule. Each
    call of the denoiser uses the entries in force at its call index (counted in `calls`), as A1111 counts steps.
    A plain `Cond` stands for a schedule of one entry.
    """

    cond: Cond | Schedule | list[tuple[Schedule, float]]
    uncond: Cond | Schedule
    scale: float
    time_ids: torch.Tensor | None = None  # [6]: orig h, w, crop top, left, target h, w (SDXL)
    calls: int = 0

    def __post_init__(self) -> None:
        self.conds = _as_parts(self.cond)
        self.uncond_schedule = _as_schedule(self.uncond)

    def at_call(self) -> tuple[list[tuple[Cond, float]], Cond]:
        """The (cond, weight) pairs and the uncond for the current call; advances the call count."""
        k = self.calls
        self.calls += 1
        return [(_pick(s, k), w) for s, w in self.conds], _pick(self.uncond_schedule, k)


def _as_schedule(value: Cond | Schedule) -> Schedule:
    return [(1 << 30, value)] if isinstance(value, Cond) else value


def _as_parts(value: Cond | Schedule | list[tuple[Schedule, float]]) -> list[tuple[Schedule, float]]:
    if isinstance(value, Cond) or _is_schedule(value):
        return [(_as_schedule(value), 1.0)]
    return value


def _is_schedule(value: Schedule | list[tuple[Schedule, float]]) -> TypeIs[Schedule]:
    """A schedule's entries start with a step number; weighted parts start with a schedule."""
    return bool(value) and isinstance(value[0][0], int)


def _pick(schedule: Schedule, call: int) -> Cond:
    """A1111's `reconstruct_cond_batch`: the first entry lasting to `call`, else the first entry."""
    return next((cond for end, cond in schedule if call <= end), schedule[0][1])


def _pad_to(context: torch.Tensor, length: int) -> torch.Tensor:
    """A1111's `stack_conds`: a shorter AND sub-prompt repeats its last vector up to the longest one's length."""
    if context.shape[1] == length:
        return context
    return torch.cat([context, context[:, -1:].expand(-1, length - context.shape[1], -1)], dim=1)


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
        conds, uncond_cond = g.at_call()
        if g.scale == 1.0 and len(conds) == 1 and conds[0][1] == 1.0:
            return self.unet_output(x_in, t, *_rows(conds[0][0], n), g.time_ids)
        length = max(c.context.shape[1] for c, _ in conds)
        rows = [(_pad_to(c.context, length), c.pooled) for c, _ in conds]
        rows = [_rows(Cond(ctx, pooled), n) for ctx, pooled in rows]
        outs = self._batched(x_in, t, rows, _rows(uncond_cond, n), g.time_ids)
        uncond = outs[-1]
        result = uncond.clone()
        for out, (_, weight) in zip(outs[:-1], conds):
            result += (out - uncond) * (weight * g.scale)
        return result

    def _batched(self, x_in: torch.Tensor, t: torch.Tensor, rows: list, uncond_rows: tuple,
                 time_ids: torch.Tensor | None) -> list[torch.Tensor]:
        """UNet outputs for each cond row set and the uncond (last): one call when all contexts have the same
        length, else the conds together and the uncond alone (as A1111 without its pad option)."""
        groups = [rows + [uncond_rows]] if rows[0][0].shape[1] == uncond_rows[0].shape[1] else [rows, [uncond_rows]]
        outs: list[torch.Tensor] = []
        for group in groups:
            k = len(group)
            pooled = None if group[0][1] is None else torch.cat([p for _, p in group])
            out = self.unet_output(torch.cat([x_in] * k), torch.cat([t] * k), torch.cat([c for c, _ in group]),
                                   pooled, time_ids)
            outs += list(out.chunk(k))
        return outs

    def unet_output(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor | None,
                    time_ids: torch.Tensor | None) -> torch.Tensor:
        """One UNet call on a batch (context and pooled have one row per image); returns float32."""
        added = None
        if pooled is not None:
            if time_ids is None:
                raise ValueError("SDXL conditioning (a pooled embedding) needs time_ids")
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
