"""Noise sources (A1111's CPU / GPU / NV) and the Brownian-tree noise of the SDE samplers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mergekit_sdxl.sampler import philox
from mergekit_sdxl.sampler.noise import BrownianNoise, ImageNoise, check_rng, randn_local

# Random123's known-answer vectors for Philox-4x32-10 (counter, key) -> output
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]
# torch.randn((3, 4), device="cuda") after seeding 0, as A1111's rng_philox documents it
CUDA_SEED0 = [[-0.92466259, -0.42534415, -2.6438457, 0.14518388],
              [-0.12086647, -0.57972564, -0.62285122, -0.32838709],
              [-1.07454231, -0.36314407, -1.67105067, 2.26550497]]


@pytest.mark.parametrize(("counter", "key", "expected"), KAT)
def test_philox_known_answers(counter, key, expected):
    out = philox.philox4x32(np.array(counter, dtype=np.uint32).reshape(4, 1), key)
    assert [int(v) for v in out[:, 0]] == list(expected)


def test_nv_noise_equals_cuda_reference_values():
    g = philox.PhiloxGenerator(0)
    first = g.randn((3, 4))
    assert first.dtype == np.float32
    # A1111's emulation uses cuRAND's float32 Box-Muller constants; the documented CUDA values agree within 3e-7
    np.testing.assert_allclose(first, CUDA_SEED0, rtol=0, atol=3e-7)
    # and bit for bit with A1111's implementation (the float32 values it returns)
    assert first[0, :2].tolist() == [np.float32(-0.9246624).item(), np.float32(-0.42534396).item()]
    second = g.randn((3, 4))  # the next draw advances the Philox offset
    assert not np.allclose(first, second) and g.offset == 2


def test_nv_seed_uses_both_key_words():
    a = philox.PhiloxGenerator(5).randn((8,))
    b = philox.PhiloxGenerator(5 + 2**32).randn((8,))
    assert not np.array_equal(a, b)


def test_image_noise_sources():
    cpu = ImageNoise([7, 8], (4, 2, 2), rng="cpu")
    torch.testing.assert_close(cpu.draw()[1], torch.randn((4, 2, 2), generator=torch.Generator().manual_seed(8)))
    nv = ImageNoise([0], (3, 2, 2), rng="nv")
    torch.testing.assert_close(nv.draw()[0].reshape(3, 4), torch.tensor(CUDA_SEED0, dtype=torch.float32),
                               rtol=0, atol=3e-7)
    torch.testing.assert_close(randn_local(0, (3, 4), "nv", "cpu"),
                               torch.from_numpy(philox.PhiloxGenerator(0).randn((3, 4))))
    with pytest.raises(ValueError, match="CUDA"):
        check_rng("gpu", "cpu")
    with pytest.raises(ValueError, match="unknown RNG"):
        ImageNoise([1], (1, 1, 1), rng="mt")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_nv_equals_torch_cuda_randn():
    for seed in (0, 1, 123456789, 2**40 + 7):
        g = torch.Generator("cuda").manual_seed(seed)
        nv = philox.PhiloxGenerator(seed)
        for shape in ((4, 128, 128), (4, 64, 96)):
            cuda = torch.randn(shape, generator=g, device="cuda").cpu().numpy()
            np.testing.assert_allclose(nv.randn(shape), cuda, rtol=0, atol=1e-5)


def _k_diffusion_brownian(seeds, shape, sigmas, sigma, sigma_next):
    """k-diffusion's BrownianTreeNoiseSampler with a list of seeds, written out against torchsde directly."""
    import torchsde

    lo, hi = sigmas[sigmas > 0].min(), sigmas.max()
    trees = [torchsde.BrownianTree(lo, torch.zeros(shape), hi, entropy=s) for s in seeds]
    a, b, sign = (sigma, sigma_next, 1) if sigma < sigma_next else (sigma_next, sigma, -1)
    return torch.stack([tree(a, b) for tree in trees]) * sign / (sigma_next - sigma).abs().sqrt()


def test_brownian_noise_matches_k_diffusion_and_is_per_image():
    sigmas = torch.tensor([14.6, 7.0, 3.0, 1.0, 0.2, 0.0])
    noise = BrownianNoise([3, 9], (4, 3, 3), sigmas, rng="cpu")
    for s, n in zip(sigmas[:-2], sigmas[1:-1]):
        torch.testing.assert_close(noise(s, n), _k_diffusion_brownian([3, 9], (4, 3, 3), sigmas, s, n))
    single = BrownianNoise([9], (4, 3, 3), sigmas, rng="cpu")
    torch.testing.assert_close(single(sigmas[1], sigmas[2])[0], noise(sigmas[1], sigmas[2])[1])
    # unit variance over an interval, and the same interval gives the same value (a tree, not a stream)
    draws = BrownianNoise(list(range(64)), (16, 8, 8), sigmas, rng="cpu")(sigmas[2], sigmas[3])
    assert abs(float(draws.std()) - 1) < 0.05
    torch.testing.assert_close(noise(sigmas[1], sigmas[2]), noise(sigmas[1], sigmas[2]))


def test_brownian_tree_draws_come_from_the_chosen_rng():
    sigmas = torch.tensor([10.0, 1.0, 0.0])
    cpu = BrownianNoise([5], (2, 2, 2), sigmas, rng="cpu")(sigmas[0], sigmas[1])
    nv = BrownianNoise([5], (2, 2, 2), sigmas, rng="nv")(sigmas[0], sigmas[1])
    assert not torch.allclose(cpu, nv)
    # outside a sampler torchsde keeps its own generator
    import torchsde

    plain = torchsde.BrownianTree(0.0, torch.zeros(3), 1.0, entropy=1)(0.0, 1.0)
    assert torch.isfinite(plain).all()


class NotATensor:
    """A class torch.load(weights_only=True) refuses to build."""


def test_embedding_files_that_need_unpickling_are_skipped(tmp_path):
    from mergekit_sdxl.sampler.embeddings import EmbeddingSet, read_embedding

    torch.save({"string_to_param": {"*": torch.ones(2, 8)}, "name": "ok", "step": 3}, tmp_path / "ok.pt")
    torch.save({"string_to_param": {"*": NotATensor()}}, tmp_path / "pickled.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("not an embedding")
    assert read_embedding(tmp_path / "ok.pt").vectors == 2
    found = EmbeddingSet.load(tmp_path, width=8)
    assert set(found.embeddings) == {"ok"}
    assert "unpickling" in found.skipped["pickled"]
