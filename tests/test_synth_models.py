"""Tiny synthetic checkpoints are real (smaller) models: diffusers/transformers modules built from the shipped
configs plus `tiny_hparams` have the same parameter counts, load them strictly, and give finite outputs."""

from __future__ import annotations

import math

import pytest
import torch

from mergekit_sdxl.arch.configs import load_config
from mergekit_sdxl.arch.keymap import TABLE_COMPONENTS
from mergekit_sdxl.arch.tables import key_table
from mergekit_sdxl.arch.tiny import tiny_hparams
from mergekit_sdxl.io.keyconvert import ldm_to_diffusers
from mergekit_sdxl.io.reader import SafetensorsReader
from mergekit_sdxl.synth import plan_test_checkpoint

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

ARCHS = ("sdxl", "sd15")
# the key tables hold bigG's logit_scale, which CLIPTextModelWithProjection has no parameter for
EXTRA_TABLE_PARAMS = {"text_encoder_2": 1}


def build_tiny(arch: str, component: str) -> torch.nn.Module:
    cfg = {k: v for k, v in load_config(arch, component).items() if not k.startswith("_")}
    cfg.update(tiny_hparams(arch)[component])
    with torch.device("meta"):
        if component == "unet":
            return diffusers.UNet2DConditionModel(**cfg)
        if component == "vae":
            return diffusers.AutoencoderKL(**cfg)
        cls = transformers.CLIPTextModelWithProjection if component == "text_encoder_2" else transformers.CLIPTextModel
        return cls(transformers.CLIPTextConfig(**cfg))


def load_tiny(arch: str, path) -> dict[str, torch.nn.Module]:
    with SafetensorsReader(path) as r:
        tensors = {k: r.read(k).float() if r.info(k).dtype != "I64" else r.read(k) for k in r.keys()}
    converted = ldm_to_diffusers(arch, tensors)
    modules = {}
    for component in tiny_hparams(arch):
        module = build_tiny(arch, component)
        module.load_state_dict(converted[component], strict=True, assign=True)
        for sub in module.modules():  # CLIP's non-persistent position_ids buffer stays on meta
            ids = getattr(sub, "position_ids", None)
            if isinstance(ids, torch.Tensor) and ids.is_meta:
                sub.register_buffer("position_ids", torch.arange(ids.shape[-1]).expand(ids.shape), persistent=False)
        assert not any(t.is_meta for t in [*module.parameters(), *module.buffers()]), component
        modules[component] = module.eval()
    return modules


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_checkpoint_loads_and_runs(arch, make_ckpt):
    modules = load_tiny(arch, make_ckpt(arch))
    specs, table = plan_test_checkpoint(arch, "tiny"), key_table(arch)
    for component, module in modules.items():  # per-component parameter counts agree
        mine = sum(math.prod(s.shape) for s in specs
                   if table[s.key].component == TABLE_COMPONENTS[component] and s.dtype == "F16")
        assert mine == sum(p.numel() for p in module.parameters()) + EXTRA_TABLE_PARAMS.get(component, 0)
    ids = torch.full((1, 77), 49407)
    ids[0, :7] = torch.tensor([49406, 320, 1125, 539, 320, 2368, 49407])
    with torch.no_grad():
        te1 = modules["text_encoder"](ids, output_hidden_states=True)
        context = te1.hidden_states[-2]
        added = None
        if arch == "sdxl":
            te2 = modules["text_encoder_2"](ids, output_hidden_states=True)
            context = torch.cat([context, te2.hidden_states[-2]], dim=-1)
            assert te2.text_embeds.shape == (1, 64) and torch.isfinite(te2.text_embeds).all()
            added = {"text_embeds": te2.text_embeds, "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
        assert torch.isfinite(context).all()
        assert context.shape[-1] == modules["unet"].config.cross_attention_dim
        latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        eps = modules["unet"](latent, 500, encoder_hidden_states=context, added_cond_kwargs=added).sample
        assert eps.shape == latent.shape and torch.isfinite(eps).all() and eps.abs().max() < 1e3
        image = modules["vae"].decode(latent).sample
        assert image.shape == (1, 3, 64, 64) and torch.isfinite(image).all()
