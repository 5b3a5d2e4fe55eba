"""Noise schedules and samplers (k-diffusion conventions) against diffusers' Euler schedulers."""

from __future__ import annotations

import math

import pytest
import torch

from mergekit_sdxl.sampler import catalog, samplers
from mergekit_sdxl.sampler.noise import ImageNoise
from mergekit_sdxl.sampler.schedules import DiscreteSchedule, get_sigmas

SCHED = DiscreteSchedule()


def _diffusers_sigmas(steps, **kwargs):
    from diffusers import EulerDiscreteScheduler

    s = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                               timestep_spacing="linspace", **kwargs)
    s.set_timesteps(steps)
    return s.sigmas.float()


def test_training_sigmas():
    assert SCHED.sigma_min == pytest.approx(0.0291675, rel=1e-5)
    assert SCHED.sigma_max == pytest.approx(14.614642, rel=1e-5)
    t = torch.tensor([0.0, 1.5, 250.25, 998.9, 999.0])
    torch.testing.assert_close(SCHED.sigma_to_t(SCHED.t_to_sigma(t)), t, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("steps", [4, 10, 28, 30])
def test_normal_matches_diffusers_linspace(steps):
    # diffusers interpolates sigma linearly between training steps, k-diffusion log-linearly: equal within 1e-4
    torch.testing.assert_close(get_sigmas("normal", steps, SCHED), _diffusers_sigmas(steps), rtol=1e-4, atol=0)


@pytest.mark.parametrize("steps", [10, 28])
def test_karras_and_exponential_match_diffusers(steps):
    torch.testing.assert_close(get_sigmas("karras", steps, SCHED), _diffusers_sigmas(steps, use_karras_sigmas=True),
                               rtol=1e-4, atol=0)
    torch.testing.assert_close(get_sigmas("exponential", steps, SCHED),
                               _diffusers_sigmas(steps, use_exponential_sigmas=True), rtol=1e-4, atol=0)


def test_sgm_uniform():
    sigmas = get_sigmas("sgm_uniform", 10, SCHED)
    assert len(sigmas) == 11 and sigmas[-1] == 0
    expected_t = torch.linspace(999, 0, 11)[:-1]
    torch.testing.assert_close(sigmas[:-1], SCHED.t_to_sigma(expected_t), rtol=1e-5, atol=0)
    assert sigmas[0] == pytest.approx(SCHED.sigma_max, rel=1e-5) and sigmas[-2] > SCHED.sigma_min


def test_ztsnr_schedule():
    z = DiscreteSchedule(ztsnr=True)
    assert z.sigma_max == pytest.approx(((1 - 4.8973451890853435e-08) / 4.8973451890853435e-08) ** 0.5, rel=1e-4)
    assert z.sigma_min == pytest.approx(SCHED.sigma_min, rel=1e-3)


def test_unknown_schedule():
    from mergekit_sdxl.errors import UsageError

    with pytest.raises(UsageError, match="unknown schedule"):
        get_sigmas("bogus", 10, SCHED)


@pytest.mark.parametrize("name", sorted(catalog.SAMPLER_NAMES))
def test_samplers_reach_a_constant_prediction(name):
    target = torch.full((2, 4, 8, 8), 0.25)

    def model(x, sigma):
        assert sigma.shape == (2,)
        return target

    noise = ImageNoise([1, 2], (4, 8, 8))
    sigmas = get_sigmas("karras", 6, SCHED)
    steps = []
    out = samplers.sampler_function(name)(model, noise.draw() * sigmas[0], sigmas, noise=noise,
                                          callback=lambda i, x, d: steps.append(i))
    # UniPC stops at sigma 0.001 (ComfyUI), so its result keeps that much of the noise
    tol = 6e-3 if name.startswith("uni_pc") else 1e-5
    torch.testing.assert_close(out, target, rtol=tol, atol=tol)
    assert steps == list(range(6))


def test_noise_is_per_image():
    a = ImageNoise([5, 6], (4, 8, 8))
    b = ImageNoise([6], (4, 8, 8))
    first_a, first_b = a.draw(), b.draw()
    torch.testing.assert_close(first_a[1:], first_b, rtol=0, atol=0)
    torch.testing.assert_close(first_b[0], torch.randn((4, 8, 8), generator=torch.Generator().manual_seed(6)))
    torch.testing.assert_close(a.draw()[1:], b.draw(), rtol=0, atol=0)


def test_a1111_schedules_by_formula():
    lo, hi = SCHED.sigma_min, SCHED.sigma_max
    # polyexponential with rho = 1 is the exponential schedule
    torch.testing.assert_close(get_sigmas("polyexponential", 9, SCHED), get_sigmas("exponential", 9, SCHED))
    # simple: the training sigma at index 999 - int(k * 1000 / n)
    simple = get_sigmas("simple", 7, SCHED)
    assert simple.tolist() == [float(SCHED.sigmas[999 - int(k * 1000 / 7)]) for k in range(7)] + [0.0]
    # A1111 "DDIM": timesteps 1 + 35 k for 28 steps gives 29 sigmas before the 0
    ddim = get_sigmas("ddim", 28, SCHED)
    assert len(ddim) == 30 and ddim[0] == SCHED.sigmas[981] and ddim[-2] == SCHED.sigmas[1] and ddim[-1] == 0
    # kl_optimal: even in arctan, ending at sigma_min (no 0)
    kl = get_sigmas("kl_optimal", 4, SCHED)
    expected = [math.tan(k / 4 * math.atan(lo) + (1 - k / 4) * math.atan(hi)) for k in range(5)]
    assert kl.tolist() == pytest.approx(expected, rel=1e-6) and kl[-1] > 0
    # beta: sigma_max .. sigma_min with Beta(0.6, 0.6) quantiles, then 0; symmetric around the middle
    beta = get_sigmas("beta", 5, SCHED)
    assert beta[0] == pytest.approx(hi) and beta[4] == pytest.approx(lo) and beta[5] == 0
    assert beta[2] == pytest.approx((lo + hi) / 2, rel=1e-6)
    from scipy import stats

    assert beta[1] == pytest.approx(lo + stats.beta.ppf(0.75, 0.6, 0.6) * (hi - lo), rel=1e-6)


def test_align_your_steps_tables():
    sdxl = [14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029]
    sd15 = [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029]
    assert get_sigmas("align_your_steps", 11, SCHED, arch="sdxl").tolist() == pytest.approx(sdxl + [0.0])
    assert get_sigmas("align_your_steps", 11, SCHED, arch="sd15").tolist() == pytest.approx(sd15 + [0.0])
    # other step counts: log-linear resampling of the table (endpoints kept)
    ten = get_sigmas("align_your_steps", 10, SCHED, arch="sdxl")
    assert len(ten) == 11 and ten[0] == pytest.approx(14.615) and ten[9] == pytest.approx(0.029)
    # 21 points: every other one is a table value, the ones between are geometric means of their neighbours
    fine = get_sigmas("align_your_steps", 21, SCHED, arch="sdxl")
    assert float(fine[2]) == pytest.approx(6.315, rel=1e-6)
    assert float(fine[1]) == pytest.approx(math.sqrt(14.615 * 6.315), rel=1e-6)


def test_discard_penultimate_sigma():
    full = get_sigmas("karras", 11, SCHED)
    cut = get_sigmas("karras", 10, SCHED, discard_penultimate=True)
    assert len(cut) == 11 and torch.equal(cut[:-1], full[:-2]) and cut[-1] == 0
