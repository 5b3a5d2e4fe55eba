"""UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of Diffusion
Models"), multistep, data prediction, B(h) = h ("bh1", `uni_pc`) or e^h - 1 ("bh2", `uni_pc_bh2`).

Runs as ComfyUI runs it on a sigma schedule: order min(3, steps - 1), lower orders for the first and the last
steps, a corrector after every step but the last, and the final 0 sigma replaced by 0.001 (the result is that
latent, undivided noise and all). Written here for the scaled latent x / sqrt(alpha_bar), where
lambda = -log(sigma) and the data prediction is the denoiser's output, so the update reads like DPM-Solver++:

    x_t = (sigma_t / sigma_0) x - (e^-h - 1) m_0 - B(h) sum_k rho_k D_k,    D_k = (m_k - m_0) / r_k

with r_k = (lambda_k - lambda_0) / h and rho solving R rho = b, R[i][k] = r_k^i, b_i = i! phi_(i+1)(-h) / B(h).
"""

from __future__ import annotations

import torch

from mergekit_sdxl.sampler.kdiff import Callback, Model, Noise, report, sigma_batch

FINAL_SIGMA = 0.001  # ComfyUI replaces the last sigma 0 by this


def _coefficients(rks: torch.Tensor, hh: torch.Tensor, variant: str) -> tuple[torch.Tensor, torch.Tensor,
                                                                                 torch.Tensor]:
    """(R, b, B(h)) of the UniPC linear system for ratios `rks` and hh = -h."""
    b_h = hh if variant == "bh1" else hh.expm1()
    h_phi = hh.expm1() / hh - 1  # h phi_2
    factorial = 1
    rows, rhs = [], []
    for i in range(1, len(rks) + 1):
        rows.append(rks ** (i - 1))
        rhs.append(h_phi * factorial / b_h)
        factorial *= i + 1
        h_phi = h_phi / hh - 1 / factorial
    return torch.stack(rows), torch.stack(rhs), b_h


def _update(model: Model, x: torch.Tensor, ms: list[torch.Tensor], sigmas_prev: list[torch.Tensor],
            sigma_t: torch.Tensor, order: int, variant: str, corrector: bool,
            ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One multistep UniPC step from sigmas_prev[-1] to sigma_t; returns (x_t, model output at x_t or None)."""
    m0, s0 = ms[-1], sigmas_prev[-1]
    h = s0.log() - sigma_t.log()
    ratios = [(s0.log() - sigmas_prev[-(k + 1)].log()) / h for k in range(1, order)]
    d1s = [(ms[-(k + 1)] - m0) / r for k, r in zip(range(1, order), ratios)]
    rks = torch.stack([*ratios, torch.ones_like(h)]).to(torch.float64)
    hh = (-h).to(torch.float64)
    r_matrix, b, b_h = _coefficients(rks, hh, variant)
    x_first = (sigma_t / s0) * x - hh.expm1().to(x.dtype) * m0
    x_t = x_first
    if d1s:
        rhos_p = torch.tensor([0.5], dtype=torch.float64) if order == 2 else \
            torch.linalg.solve(r_matrix[:-1, :-1], b[:-1])
        x_t = x_first - b_h.to(x.dtype) * sum(rho.to(x.dtype) * d for rho, d in zip(rhos_p, d1s))
    if not corrector:
        return x_t, None
    rhos_c = torch.tensor([0.5], dtype=torch.float64) if order == 1 else torch.linalg.solve(r_matrix, b)
    model_t = model(x_t, sigma_batch(sigma_t, x))
    correction = sum(rho.to(x.dtype) * d for rho, d in zip(rhos_c[:-1], d1s)) + rhos_c[-1].to(x.dtype) * (model_t - m0)
    return x_first - b_h.to(x.dtype) * correction, model_t


def sample_uni_pc(model: Model, x: torch.Tensor, sigmas: torch.Tensor, noise: Noise | None = None,
                  callback: Callback = None, variant: str = "bh1") -> torch.Tensor:
    """UniPC-p with UniC (order up to 3) over `sigmas`, as ComfyUI's `uni_pc` (bh1) / `uni_pc_bh2`."""
    if variant not in ("bh1", "bh2"):
        raise ValueError(f"variant must be 'bh1' or 'bh2', not {variant!r}")
    times = sigmas.clone()
    if times[-1] == 0:
        times[-1] = FINAL_SIGMA
    steps = len(times) - 1
    order = min(3, steps - 1)
    ms: list[torch.Tensor] = []
    prev: list[torch.Tensor] = []
    for index in range(steps):
        if index == 0:
            ms, prev = [model(x, sigma_batch(times[0], x))], [times[0]]
        elif index < order:
            x, m = _update(model, x, ms, prev, times[index], index, variant, corrector=True)
            assert m is not None  # the corrector ran: it returns the model output at x
            ms.append(m)
            prev.append(times[index])
        else:
            for step in range(index, index + 1 + (index == steps - 1)):
                step_order = min(order, steps + 1 - step)
                x, m = _update(model, x, ms, prev, times[step], step_order, variant, corrector=step != steps)
                ms, prev = ms[1:] + ms[-1:], prev[1:] + [times[step]]  # shift; the last is replaced below
                if step < steps:
                    assert m is not None  # corrector=True for every step before the last
                    ms[-1] = m
        report(callback, index, x, ms[-1])
    return x


def sample_uni_pc_bh2(model: Model, x: torch.Tensor, sigmas: torch.Tensor, noise: Noise | None = None,
                      callback: Callback = None) -> torch.Tensor:
    """UniPC with B(h) = e^h - 1."""
    return sample_uni_pc(model, x, sigmas, noise, callback, variant="bh2")
