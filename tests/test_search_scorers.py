"""Scorers: learned ones on a random-weight tiny CLIP and head (against a direct computation), weights that need
unpickling refused, missing files named, SSIM against its closed form, Bradley-Terry against the likelihood."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from mergekit_sdxl.errors import CheckpointError, UsageError
from mergekit_sdxl.search.scoring import ScoredImage, parse_scorer


def _tiny_clip(folder: Path, vision_only: bool = False) -> Path:
    """A random-weight CLIP in the transformers layout: config.json + model.safetensors."""
    from safetensors.torch import save_file
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    config = CLIPConfig(text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                     "num_attention_heads": 2, "vocab_size": 49408, "max_position_embeddings": 77},
                        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                       "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
                        projection_dim=16)
    model = CLIPModel(config).eval()
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config.to_dict()))
    return folder


def _laion_head(path: Path, width: int = 16) -> dict[str, torch.Tensor]:
    """The LAION aesthetic predictor's layout (Linear 1024, 128, 64, 16, 1 with dropouts between), scaled down."""
    from safetensors.torch import save_file

    torch.manual_seed(1)
    sizes = [width, 24, 12, 8, 4, 1]
    indices = [0, 2, 4, 6, 7]
    state = {}
    for i, (n_in, n_out) in zip(indices, zip(sizes, sizes[1:])):
        state[f"layers.{i}.weight"] = torch.randn(n_out, n_in)
        state[f"layers.{i}.bias"] = torch.randn(n_out)
    save_file(state, str(path))
    return state


def _images(n: int = 2) -> list[ScoredImage]:
    from PIL import Image

    out = []
    for i in range(n):
        gradient = torch.linspace(0, 255, 48 * 40 * 3).reshape(40, 48, 3).roll(i * 97).to(torch.uint8).numpy()
        out.append(ScoredImage(i, "1girl, (red hair:1.2)", i + 1, Image.fromarray(gradient)))
    return out


def test_aesthetic_scorer_equals_the_direct_computation(tmp_path):
    import numpy as np
    from transformers import CLIPModel

    from mergekit_sdxl.search.clipscore import CLIP_MEAN, CLIP_STD, AestheticScorer

    clip = _tiny_clip(tmp_path / "clip")
    state = _laion_head(tmp_path / "head.safetensors")
    scorer = AestheticScorer({"clip": clip, "aesthetic_head": tmp_path / "head.safetensors"})
    images = _images()
    got = scorer(images, {})
    # the same thing written out: resize shortest side to 32 (bicubic), centre crop, normalise, project, L2, head
    model = CLIPModel.from_pretrained(str(clip), local_files_only=True).eval()
    from PIL import Image

    pixels = []
    for item in images:
        resized = item.image.resize((38, 32), Image.Resampling.BICUBIC)  # 48x40 -> shortest side 32
        crop = torch.from_numpy(np.asarray(resized.crop((3, 0, 35, 32)), dtype=np.float32))
        pixels.append((crop / 255 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD))
    with torch.no_grad():
        embeds = model.get_image_features(pixel_values=torch.stack(pixels).permute(0, 3, 1, 2))
        embeds = getattr(embeds, "pooler_output", embeds)
        x = embeds / embeds.norm(dim=-1, keepdim=True)
        for i in (0, 2, 4, 6, 7):
            x = x @ state[f"layers.{i}.weight"].T + state[f"layers.{i}.bias"]
    assert got == pytest.approx(float(x.mean()), rel=1e-5)


def test_linear_head_and_clip_scorer(tmp_path):
    from safetensors.torch import save_file

    from mergekit_sdxl.search.clipscore import AestheticScorer, ClipScorer

    clip = _tiny_clip(tmp_path / "clip")
    save_file({"weight": torch.zeros(1, 16), "bias": torch.tensor([4.5])}, str(tmp_path / "linear.safetensors"))
    assert AestheticScorer({"clip": clip, "aesthetic_head": tmp_path / "linear.safetensors"})(_images(), {}) == 4.5
    score = ClipScorer({"clip": clip})(_images(), {})
    assert 0.0 <= score <= 100.0 and math.isfinite(score)


def test_weights_needing_unpickling_are_refused(tmp_path):
    from mergekit_sdxl.search.clipscore import AestheticScorer

    clip = _tiny_clip(tmp_path / "clip")
    head = tmp_path / "head.pth"
    torch.save({"layers.0.weight": torch.zeros(1, 16), "meta": _Pickled()}, head)  # a pickled object inside
    with pytest.raises(CheckpointError, match="refused"):
        AestheticScorer({"clip": clip, "aesthetic_head": head})
    # the same weights saved as plain tensors load through weights_only
    torch.save({"weight": torch.zeros(1, 16), "bias": torch.tensor([2.0])}, head)
    assert AestheticScorer({"clip": clip, "aesthetic_head": head})(_images(1), {}) == 2.0


class _Pickled:
    pass


def test_missing_weights_name_the_files_to_provide(tmp_path):
    from mergekit_sdxl.search.clipscore import AestheticScorer

    empty = tmp_path / "clip"
    empty.mkdir()
    _laion_head(tmp_path / "head.safetensors")
    with pytest.raises(UsageError, match=r"model\.safetensors and .*config\.json"):
        AestheticScorer({"clip": empty, "aesthetic_head": tmp_path / "head.safetensors"})
    with pytest.raises(UsageError, match="--aesthetic-head"):
        AestheticScorer({"clip": _tiny_clip(tmp_path / "c2")})
    with pytest.raises(UsageError, match="--clip"):
        AestheticScorer({})


def test_ssim_closed_form_and_identity():
    from mergekit_sdxl.search.reference import ssim

    a, b = 0.3, 0.7
    x, y = torch.full((3, 16, 16), a, dtype=torch.float64), torch.full((3, 16, 16), b, dtype=torch.float64)
    c1 = 0.01**2
    assert ssim(x, y) == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), rel=1e-9)
    noise = torch.rand(3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert ssim(noise, noise) == pytest.approx(1.0)
    assert ssim(noise, noise.flip(-1)) < 0.2
    with pytest.raises(UsageError, match="payload's size"):
        ssim(noise, torch.rand(3, 16, 16, dtype=torch.float64))


def test_bradley_terry_matches_the_regularised_likelihood():
    from mergekit_sdxl.search.manual import bradley_terry

    comparisons = [(1, 0), (1, 0), (0, 1), (2, 1), (2, 0)]
    got = bradley_terry(comparisons)

    def nll(theta: torch.Tensor) -> torch.Tensor:  # each player also won and lost once against log-strength 0
        total = torch.zeros((), dtype=torch.float64)
        for w, loser in comparisons:
            total = total - torch.nn.functional.logsigmoid(theta[w] - theta[loser])
        return total - torch.nn.functional.logsigmoid(theta).sum() - torch.nn.functional.logsigmoid(-theta).sum()

    theta = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([theta], max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-14)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = nll(theta)
        loss.backward()
        return loss

    optimizer.step(closure)
    assert [got[i] for i in range(3)] == pytest.approx(theta.detach().tolist(), abs=1e-6)
    assert got[2] > got[1] > got[0]


@pytest.mark.parametrize(("text", "name", "weight"), [
    ("aesthetic", "aesthetic", 1.0), ("clip:0.5", "clip", 0.5), ("python:my.mod:fn", "python:my.mod:fn", 1.0),
    ("python:my.mod:fn:-2", "python:my.mod:fn", -2.0)])
def test_parse_scorer(text, name, weight):
    spec = parse_scorer(text)
    assert (spec.name, spec.weight) == (name, weight)


@pytest.mark.parametrize("text", ["beauty", "clip:0", "python:nomodule", "clip:nan"])
def test_parse_scorer_errors(text):
    with pytest.raises(UsageError):
        parse_scorer(text)
