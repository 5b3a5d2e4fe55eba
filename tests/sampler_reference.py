"""Independent reference implementations of every sampler's published update rule, for step-by-step tests.

Written from the papers, in their own variables (sigma ratios rho = sigma_next / sigma, e^-h = rho, VP latents
x / sqrt(1 + sigma^2), divided differences in lambda = -log sigma, phi functions by quadrature), not by calling or
transcribing mergekit_sdxl's code. Each returns the latent after every step; sigmas are Python floats.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import integrate


def ancestral(s, s_next):
    """(sigma_down, sigma_up) with eta = 1: the DDPM posterior split of the step s -> s_next."""
    if s_next == 0:
        return 0.0, 0.0
    up = min(s_next, math.sqrt(s_next**2 * (1 - s_next**2 / s**2)))
    return math.sqrt(s_next**2 - up**2), up


def slope(model, x, s):
    return (x - model(x, s)) / s


def euler(model, x, sigmas, noise):
    out = []
    for s, n in zip(sigmas[:-1], sigmas[1:]):
        x = x + (n - s) * slope(model, x, s)
        out.append(x)
    return out


def euler_a(model, x, sigmas, noise):
    out = []
    for s, n in zip(sigmas[:-1], sigmas[1:]):
        down, up = ancestral(s, n)
        x = x + (down - s) * slope(model, x, s)
        if n > 0:
            x = x + up * noise(s, n)
        out.append(x)
    return out


def heun(model, x, sigmas, noise):
    out = []
    for s, n in zip(sigmas[:-1], sigmas[1:]):
        d = slope(model, x, s)
        if n == 0:
            x = x + (n - s) * d
        else:
            guess = x + (n - s) * d
            x = x + (n - s) * (d + slope(model, guess, n)) / 2
        out.append(x)
    return out


def _midpoint(model, x, d, s, target):
    mid = math.sqrt(s * target)  # geometric mean = midpoint in log sigma
    return x + (target - s) * slope(model, x + (mid - s) * d, mid)


def dpm_2(model, x, sigmas, noise):
    out = []
    for s, n in zip(sigmas[:-1], sigmas[1:]):
        d = slope(model, x, s)
        x = x + (n - s) * d if n == 0 else _midpoint(model, x, d, s, n)
        out.append(x)
    return out


def dpm_2_a(model, x, sigmas, noise):
    out = []
    for s, n in zip(sigmas[:-1], sigmas[1:]):
        down, up = ancestral(s, n)
        d = slope(model, x, s)
        if down == 0:
            x = x + (down - s) * d
        else:
            x = _midpoint(model, x, d, s, down) + up * noise(s, n)
        out.append(x)
    return out


def lms(model, x, sigmas, noise, order=4):
    out, ds = [], []
    for i in range(len(sigmas) - 1):
        ds.insert(0, slope(model, x, sigmas[i]))
        ds = ds[:order]
        k = len(ds)
        nodes = [sigmas[i - j] for j in range(k)]

        def basis(tau, j, nodes=nodes, k=k):
            return math.prod((tau - nodes[m]) / (nodes[j] - nodes[m]) for m in range(k) if m != j)

        coeffs = [integrate.quad(basis, sigmas[i], sigmas[i + 1], args=(j,), epsabs=1e-14, epsrel=1e-13)[0]
                  for j in range(k)]
        x = x + sum(c * d for c, d in zip(coeffs, ds))
        out.append(x)
    return out


def dpmpp_2s_a(model, x, sigmas, noise):
    out = []
    for s, n in zip(sigmas[:-1], sigmas[1:]):
        down, up = ancestral(s, n)
        d0 = model(x, s)
        if down == 0:
            x = x + (down - s) * (x - d0) / s
        else:
            mid = math.sqrt(s * down)
            x_mid = (mid / s) * x + (1 - mid / s) * d0  # first-order DPM-Solver++ to the midpoint
            x = (down / s) * x + (1 - down / s) * model(x_mid, mid)
        if n > 0:
            x = x + up * noise(s, n)
        out.append(x)
    return out


def dpmpp_sde(model, x, sigmas, noise):
    out = []
    for s, n in zip(sigmas[:-1], sigmas[1:]):
        d0 = model(x, s)
        if n == 0:
            x = x + (n - s) * (x - d0) / s
        else:
            mid = math.sqrt(s * n)
            down, up = ancestral(s, mid)
            x_mid = (down / s) * x + (1 - down / s) * d0 + up * noise(s, mid)
            d1 = model(x_mid, mid)
            down, up = ancestral(s, n)
            x = (down / s) * x + (1 - down / s) * d1 + up * noise(s, n)  # r = 1/2: the midpoint prediction only
        out.append(x)
    return out


def dpmpp_2m(model, x, sigmas, noise):
    out, prev = [], None
    for i in range(len(sigmas) - 1):
        s, n = sigmas[i], sigmas[i + 1]
        d = model(x, s)
        target = d
        if prev is not None and n > 0:
            h, h_last = math.log(s / n), math.log(sigmas[i - 1] / s)
            target = d + (d - prev) * h / (2 * h_last)
        x = (n / s) * x + (1 - n / s) * target
        prev = d
        out.append(x)
    return out


def dpmpp_2m_sde(model, x, sigmas, noise, heun=False):
    """SDE-DPM-Solver++(2M), eta = 1: e^-h = rho, so the decay is rho^2 and the noise sigma_next sqrt(1 - rho^2)."""
    out, prev, h_last = [], None, None
    for i in range(len(sigmas) - 1):
        s, n = sigmas[i], sigmas[i + 1]
        d = model(x, s)
        if n == 0:
            x = d
        else:
            rho, h = n / s, math.log(s / n)
            x = rho**2 * x + (1 - rho**2) * d
            if prev is not None:
                if heun:
                    x = x + (1 - (1 - rho**2) / (2 * h)) * (h / h_last) * (d - prev)
                else:
                    x = x + 0.5 * (1 - rho**2) * (h / h_last) * (d - prev)
            x = x + n * math.sqrt(1 - rho**2) * noise(s, n)
            h_last = h
        prev = d
        out.append(x)
    return out


def dpmpp_2m_sde_heun(model, x, sigmas, noise):
    return dpmpp_2m_sde(model, x, sigmas, noise, heun=True)


def dpmpp_3m_sde(model, x, sigmas, noise):
    """DPM-Solver++(3M) SDE, eta = 1, from Newton divided differences of the prediction in lambda = -log sigma."""
    out, hist = [], []  # (lambda, prediction), newest first
    for i in range(len(sigmas) - 1):
        s, n = sigmas[i], sigmas[i + 1]
        d = model(x, s)
        if n == 0:
            x = d
        else:
            rho, h = n / s, math.log(s / n)
            x = rho**2 * x + (1 - rho**2) * d
            phi_2 = 1 - (1 - rho**2) / (2 * h)
            phi_3 = phi_2 / (2 * h) - 0.5
            points = [(-math.log(s), d), *hist[:2]]
            if len(points) >= 2:
                f01 = (points[0][1] - points[1][1]) / (points[0][0] - points[1][0])
                derivative = f01
                if len(points) == 3:
                    f12 = (points[1][1] - points[2][1]) / (points[1][0] - points[2][0])
                    f012 = (f01 - f12) / (points[0][0] - points[2][0])
                    derivative = f01 + f012 * (points[0][0] - points[1][0])
                    x = x - phi_3 * h**2 * f012
                x = x + phi_2 * h * derivative
            x = x + n * math.sqrt(1 - rho**2) * noise(s, n)
        hist.insert(0, (-math.log(s), d))
        out.append(x)
    return out


def ddim(model, x, sigmas, noise):
    """DDIM (eta = 0) on VP latents: x_next = sqrt(a') x0 + sqrt(1 - a') eps with a = 1 / (1 + sigma^2)."""
    out = []
    for s, n in zip(sigmas[:-1], sigmas[1:]):
        a, a_next = 1 / (1 + s * s), 1 / (1 + n * n)
        x0 = model(x, s)
        eps = (x / math.sqrt(1 + s * s) - math.sqrt(a) * x0) / math.sqrt(1 - a)
        x = (math.sqrt(a_next) * x0 + math.sqrt(1 - a_next) * eps) * math.sqrt(1 + n * n)
        out.append(x)
    return out


def lcm(model, x, sigmas, noise):
    """LCM multistep: z = sqrt(a') x0 + sqrt(1 - a') eps with fresh eps, in k-diffusion's latent scale."""
    out = []
    for s, n in zip(sigmas[:-1], sigmas[1:]):
        x0 = model(x, s)
        if n > 0:
            a = 1 / (1 + n * n)
            x = (math.sqrt(a) * x0 + math.sqrt(1 - a) * noise(s, n)) / math.sqrt(a)
        else:
            x = x0
        out.append(x)
    return out


def phi(k, z):
    """phi_k(z) = integral over [0, 1] of e^((1 - t) z) t^(k-1) / (k-1)! (the exponential-integrator functions)."""
    return integrate.quad(lambda t: math.exp((1 - t) * z) * t ** (k - 1) / math.factorial(k - 1), 0, 1,
                          epsabs=1e-15, epsrel=1e-13)[0]


def _unipc_step(model, x, hist, s_t, order, bh2, corrector):
    """One UniPC step (Zhao et al. 2023, UniP-p then UniC-p, data prediction) from hist[0] to s_t."""
    s0, m0 = hist[0]
    h = math.log(s0 / s_t)
    b_h = math.expm1(-h) if bh2 else -h
    rks = [(math.log(s0) - math.log(hist[k][0])) / h for k in range(1, order)] + [1.0]
    g = np.array([(-h) * phi(i + 1, -h) * math.factorial(i) / b_h for i in range(1, order + 1)])
    r_mat = np.array([[r ** (i - 1) for r in rks] for i in range(1, order + 1)])
    d1 = [(hist[k][1] - m0) / rks[k - 1] for k in range(1, order)]
    base = (s_t / s0) * x + (1 - s_t / s0) * m0
    x_t = base
    if d1:
        a_p = [0.5] if order == 2 else np.linalg.solve(r_mat[:-1, :-1], g[:-1])
        x_t = base - b_h * sum(a * dk for a, dk in zip(a_p, d1))
    if not corrector:
        return x_t, None
    a_c = [0.5] if order == 1 else np.linalg.solve(r_mat, g)
    m_t = model(x_t, s_t)
    return base - b_h * (sum(a * dk for a, dk in zip(a_c[:-1], d1)) + a_c[-1] * (m_t - m0)), m_t


def uni_pc(model, x, sigmas, noise, bh2=False):
    """ComfyUI's schedule of orders: warm-up at orders 1, 2, then 3; lower orders at the end; no final corrector;
    the final sigma 0 becomes 0.001; step 0 only evaluates the model."""
    times = [*sigmas[:-1], 0.001 if sigmas[-1] == 0 else sigmas[-1]]
    steps = len(times) - 1
    order = min(3, steps - 1)
    hist = [(times[0], model(x, times[0]))]
    out = [x]
    for index in range(1, steps):
        targets = [index] if index < steps - 1 else [index, index + 1]
        for step in targets:
            step_order = index if index < order else min(order, steps + 1 - step)
            x, m = _unipc_step(model, x, hist, times[step], step_order, bh2, corrector=step != steps)
            if m is not None:
                hist = [(times[step], m), *hist][:max(order, 1)]
        out.append(x)
    return out


def uni_pc_bh2(model, x, sigmas, noise):
    return uni_pc(model, x, sigmas, noise, bh2=True)


REFERENCES = {
    "euler": euler, "euler_a": euler_a, "heun": heun, "dpm_2": dpm_2, "dpm_2_a": dpm_2_a, "lms": lms,
    "dpmpp_2s_a": dpmpp_2s_a, "dpmpp_sde": dpmpp_sde, "dpmpp_2m": dpmpp_2m, "dpmpp_2m_sde": dpmpp_2m_sde,
    "dpmpp_2m_sde_heun": dpmpp_2m_sde_heun, "dpmpp_3m_sde": dpmpp_3m_sde, "ddim": ddim, "lcm": lcm,
    "uni_pc": uni_pc, "uni_pc_bh2": uni_pc_bh2,
}
