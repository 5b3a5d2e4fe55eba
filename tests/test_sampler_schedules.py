"""Noise schedules and samplers (k-diffusion conventions) against diffusers' Euler schedulers."""

from __future__ import annotations

import pytest
import torch

from mergekit_sdxl.sampler import samplers
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
    with pytest.raises(ValueError, match="unknown schedule"):
        get_sigmas("bogus", 10, SCHED)


@pytest.mark.parametrize("name", sorted(samplers.SAMPLERS))
def test_samplers_reach_a_constant_prediction(name):
    target = torch.full((2, 4, 8, 8), 0.25)

    def model(x, sigma):
        assert sigma.shape == (2,)
        return target

    noise = ImageNoise([1, 2], (4, 8, 8))
    sigmas = get_sigmas("karras", 6, SCHED)
    steps = []
    out = samplers.SAMPLERS[name](model, noise.draw() * sigmas[0], sigmas, noise=noise,
                                  callback=lambda i, x, d: steps.append(i))
    torch.testing.assert_close(out, target, rtol=1e-5, atol=1e-5)
    assert steps == list(range(6))


def test_noise_is_per_image():
    a = ImageNoise([5, 6], (4, 8, 8))
    b = ImageNoise([6], (4, 8, 8))
    first_a, first_b = a.draw(), b.draw()
    torch.testing.assert_close(first_a[1:], first_b, rtol=0, atol=0)
    torch.testing.assert_close(first_b[0], torch.randn((4, 8, 8), generator=torch.Generator().manual_seed(6)))
    torch.testing.assert_close(a.draw()[1:], b.draw(), rtol=0, atol=0)
