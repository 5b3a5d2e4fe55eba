"""Shipped configs build the real models; our map agrees with the models and with diffusers' own converters."""

from __future__ import annotations

import math

import pytest
import torch

from mergekit_sdxl.arch.configs import load_config
from mergekit_sdxl.arch.keymap import PREFIXES, TABLE_COMPONENTS, build_keymap
from mergekit_sdxl.arch.tables import key_table
from mergekit_sdxl.io.keyconvert import installed_clip_l_style, ldm_to_diffusers

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
from diffusers.loaders import single_file_utils as sfu  # noqa: E402

ARCHS = ("sdxl", "sd15")
# parameters of the real models (the key tables add SDXL's two edm_vpred scalars and CLIP-G's logit_scale)
PARAMS = {
    ("sdxl", "unet"): 2_567_463_684,
    ("sdxl", "vae"): 83_653_863,
    ("sdxl", "text_encoder"): 123_060_480,
    ("sdxl", "text_encoder_2"): 694_659_840,
    ("sd15", "unet"): 859_520_964,
    ("sd15", "vae"): 83_653_863,
    ("sd15", "text_encoder"): 123_060_480,
}
TABLE_PARAMS = {("sdxl", "unet"): 2_567_463_686, ("sdxl", "text_encoder_2"): 694_659_841}


def _diffusers_kwargs(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def build_meta(arch: str, component: str, overrides: dict | None = None) -> torch.nn.Module:
    cfg = {**load_config(arch, component), **(overrides or {})}
    with torch.device("meta"):
        if component == "unet":
            return diffusers.UNet2DConditionModel(**_diffusers_kwargs(cfg))
        if component == "vae":
            return diffusers.AutoencoderKL(**_diffusers_kwargs(cfg))
        cls = transformers.CLIPTextModelWithProjection if component == "text_encoder_2" else transformers.CLIPTextModel
        return cls(transformers.CLIPTextConfig(**cfg))


def diffusers_shape(op: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    if op == "conv1x1_to_linear":
        return shape[:2]
    if op == "transpose":
        return shape[::-1]
    if op.startswith("qkv"):
        return (shape[0] // 3, *shape[1:])
    return shape


COMPONENTS = [(a, c) for a in ARCHS for c in PREFIXES[a]]


@pytest.mark.parametrize(("arch", "component"), COMPONENTS, ids=[f"{a}-{c}" for a, c in COMPONENTS])
def test_meta_model_matches_key_table(arch, component):
    table = key_table(arch)
    model = build_meta(arch, component)
    km = build_keymap(arch, table, clip_l_style=installed_clip_l_style())
    mine = {m.diffusers: diffusers_shape(m.op, table[m.ldm].shape) for m in km.for_component(component)}
    theirs = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert theirs == mine
    count = sum(p.numel() for p in model.parameters())
    assert count == PARAMS[arch, component]
    floats = [i for i in table.values() if i.component == TABLE_COMPONENTS[component] and i.dtype.startswith("float")]
    assert sum(math.prod(i.shape) for i in floats) == TABLE_PARAMS.get((arch, component), count)


def test_installed_clip_style_matches_transformers():
    assert installed_clip_l_style() in ("flat", "text_model")
    te1 = build_meta("sd15", "text_encoder")
    assert any(k.startswith("text_model.") for k in te1.state_dict()) == (installed_clip_l_style() == "text_model")


def _shrink(d: int) -> int:
    return d // 128 if d >= 128 else d  # keeps [3w, w] fused q/k/v ratios exact (3840 -> 30, 1280 -> 10)


FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def fake_state_dict(arch: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Every key of the real table, shapes shrunk, random values, dtypes varying across keys."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for n, (key, info) in enumerate(key_table(arch).items()):
        shape = tuple(_shrink(d) for d in info.shape)
        if info.dtype.startswith("int"):
            out[key] = torch.randint(0, 1000, shape, generator=gen, dtype=getattr(torch, info.dtype))
        else:
            out[key] = torch.randn(shape, generator=gen).to(FLOATS[n % 3])
    return out


def _assert_same(ours: dict, theirs: dict) -> None:
    assert set(ours) == set(theirs)
    for k, v in theirs.items():
        assert ours[k].dtype == v.dtype and torch.equal(ours[k], v), k


@pytest.mark.parametrize("arch", ARCHS)
def test_matches_diffusers_converters(arch):
    sd = fake_state_dict(arch)
    ours = ldm_to_diffusers(arch, sd, clip_l_style="text_model")
    _assert_same(ours["unet"], sfu.convert_ldm_unet_checkpoint(sd, load_config(arch, "unet")))
    _assert_same(ours["vae"], sfu.convert_ldm_vae_checkpoint(sd, load_config(arch, "vae")))
    clip = sfu.convert_ldm_clip_checkpoint(sd)
    clip.pop("text_model.embeddings.position_ids")  # a non-persistent buffer in current transformers
    _assert_same(ours["text_encoder"], clip)
    flat = ldm_to_diffusers(arch, sd, clip_l_style="flat")["text_encoder"]
    _assert_same(flat, {k.removeprefix("text_model."): v for k, v in clip.items()})
    if arch == "sdxl":
        te2 = build_meta("sdxl", "text_encoder_2")
        theirs = sfu.convert_open_clip_checkpoint(te2, sd, prefix=PREFIXES["sdxl"]["text_encoder_2"])
        _assert_same(ours["text_encoder_2"], theirs)


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_models_load_strictly(arch):
    """The sampler's route: shipped config + tiny overrides, built on meta, strict load of our converted keys."""
    from mergekit_sdxl.arch.tiny import tiny_hparams, tiny_shape

    table = key_table(arch)
    sd = {k: torch.empty(tiny_shape(arch, k), dtype=getattr(torch, i.dtype), device="meta") for k, i in table.items()}
    converted = ldm_to_diffusers(arch, sd, clip_l_style=installed_clip_l_style())
    for component, overrides in tiny_hparams(arch).items():
        model = build_meta(arch, component, overrides)
        model.load_state_dict(converted[component], strict=True, assign=True)


@pytest.mark.parametrize("arch", ARCHS)
def test_shipped_schedulers_build(arch):
    cfg = load_config(arch, "scheduler")
    scheduler = getattr(diffusers, cfg["_class_name"]).from_config(cfg)
    sigmas = ((1 - scheduler.alphas_cumprod) / scheduler.alphas_cumprod) ** 0.5
    assert float(sigmas[-1]) == pytest.approx(14.614642, abs=1e-4)
    assert float(sigmas[0]) == pytest.approx(0.0291675, abs=1e-6)


def test_other_layouts_match_diffusers_converter():
    """Rules hold for any depth: a 1-layer-per-block, 3-level UNet and a 2-level VAE against diffusers' converters."""
    from mergekit_sdxl.arch.keymap import Layout
    from mergekit_sdxl.io.keyconvert import diffusers_to_ldm

    unet_cfg = {
        "block_out_channels": [8, 16, 16],
        "layers_per_block": 1,
        "norm_num_groups": 4,
        "cross_attention_dim": 8,
        "attention_head_dim": 2,
        "sample_size": 8,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    }
    vae_cfg = {
        "block_out_channels": [8, 16],
        "layers_per_block": 1,
        "norm_num_groups": 4,
        "down_block_types": ["DownEncoderBlock2D"] * 2,
        "up_block_types": ["UpDecoderBlock2D"] * 2,
    }
    torch.manual_seed(0)
    unet, vae = diffusers.UNet2DConditionModel(**unet_cfg), diffusers.AutoencoderKL(**vae_cfg)
    layout = Layout.from_configs(unet_cfg, vae_cfg)
    components = {"unet": unet.state_dict(), "vae": vae.state_dict()}
    ldm = diffusers_to_ldm("sd15", components, layout=layout)
    _assert_same(sfu.convert_ldm_unet_checkpoint(ldm, unet_cfg), components["unet"])
    _assert_same(sfu.convert_ldm_vae_checkpoint(ldm, vae_cfg), components["vae"])
