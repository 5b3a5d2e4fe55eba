"""Model building, conditioning and full sampling runs on tiny real-layout checkpoints, against diffusers."""

from __future__ import annotations

import pytest
import torch

from mergekit_sdxl.errors import CheckpointError
from mergekit_sdxl.sampler.models import ModelSlot, WeightSource

SDXL_TE1 = "conditioner.embedders.0.transformer."
SDXL_TE2 = "conditioner.embedders.1.model."


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (and do not fight other test processes for cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl):
    torch.set_num_threads(1)
    return ModelSlot().load(WeightSource.from_file(tiny_sdxl))


@pytest.fixture(scope="module")
def sd15(tiny_sd15):
    torch.set_num_threads(1)
    return ModelSlot().load(WeightSource.from_file(tiny_sd15))


def _file_tensors(path):
    from mergekit_sdxl.io.reader import open_checkpoint

    with open_checkpoint(path) as reader:
        return {k: reader.read(k) for k in reader.keys()}


def _assert_state_equal(module, expected, strip=""):
    state = module.state_dict()
    expected = {k[len(strip):] if strip and k.startswith(strip) else k: v for k, v in expected.items()}
    expected = {k: v for k, v in expected.items() if not k.endswith("position_ids")}
    assert set(state) == set(expected)
    for key, value in expected.items():
        assert torch.equal(state[key], value.to(state[key].dtype)), key


# ---------------------------------------------------------------------------------------------- loading


def test_sdxl_modules_equal_diffusers_converters(sdxl, tiny_sdxl):
    from diffusers.loaders import single_file_utils as su

    ckpt = _file_tensors(tiny_sdxl)
    m = sdxl.modules
    _assert_state_equal(m["unet"], su.convert_ldm_unet_checkpoint(ckpt, sdxl.configs["unet"]))
    _assert_state_equal(m["vae"], su.convert_ldm_vae_checkpoint(ckpt, sdxl.configs["vae"]))
    te1 = su.convert_ldm_clip_checkpoint(ckpt)
    _assert_state_equal(m["text_encoder"], te1, strip="" if hasattr(m["text_encoder"], "text_model") else "text_model.")
    te2 = su.convert_open_clip_checkpoint(m["text_encoder_2"], ckpt, prefix=SDXL_TE2)
    _assert_state_equal(m["text_encoder_2"], te2)
    for module in m.values():
        assert all(not t.is_meta for t in [*module.parameters(), *module.buffers()])
    assert m["text_encoder"].get_input_embeddings().weight.shape == (49408, 32)
    assert m["text_encoder_2"].get_input_embeddings().weight.shape == (49408, 64)


def test_sd15_modules_equal_diffusers_converters(sd15, tiny_sd15):
    from diffusers.loaders import single_file_utils as su

    ckpt = _file_tensors(tiny_sd15)
    m = sd15.modules
    _assert_state_equal(m["unet"], su.convert_ldm_unet_checkpoint(ckpt, sd15.configs["unet"]))
    _assert_state_equal(m["vae"], su.convert_ldm_vae_checkpoint(ckpt, sd15.configs["vae"]))
    te1 = su.convert_ldm_clip_checkpoint(ckpt)
    _assert_state_equal(m["text_encoder"], te1, strip="" if hasattr(m["text_encoder"], "text_model") else "text_model.")
    ids = m["text_encoder"].get_input_embeddings()
    assert ids.weight.shape == (49408, 32)


def test_real_shapes_give_the_shipped_configs():
    from mergekit_sdxl.arch.configs import load_config
    from mergekit_sdxl.arch.modelconfig import derive_configs
    from mergekit_sdxl.arch.tables import key_table

    for arch in ("sdxl", "sd15"):
        configs = derive_configs(arch, {k: i.shape for k, i in key_table(arch).items()})
        for component, config in configs.items():
            reference = {k: v for k, v in load_config(arch, component).items() if not k.startswith("_")}
            for key, value in reference.items():
                assert config[key] == value, (arch, component, key)


def test_missing_key_is_an_error(tiny_sdxl):
    tensors = _file_tensors(tiny_sdxl)
    del tensors["model.diffusion_model.input_blocks.1.0.in_layers.0.weight"]
    with pytest.raises(CheckpointError, match="missing"):
        ModelSlot().load(WeightSource.from_tensors("broken", tensors))


def test_swap_in_place_and_fp8(tiny_sdxl, make_ckpt):
    other = make_ckpt(seed=5, like=tiny_sdxl, delta="noise:0.2")
    fp8 = make_ckpt("sdxl", seed=0, dtype="fp8_e4m3fn")
    slot = ModelSlot()
    first = slot.load(WeightSource.from_file(tiny_sdxl))
    unet = first.modules["unet"]
    weight = unet.conv_in.weight
    before = weight.clone()
    second = slot.load(WeightSource.from_file(other))
    assert second.modules["unet"] is unet and unet.conv_in.weight is weight  # same modules, weights swapped
    assert not torch.equal(before, weight)
    expected = _file_tensors(other)["model.diffusion_model.input_blocks.0.0.weight"].float()
    assert torch.equal(weight, expected)
    third = slot.load(WeightSource.from_file(fp8))
    stored = _file_tensors(fp8)["model.diffusion_model.input_blocks.0.0.weight"]
    assert stored.dtype == torch.float8_e4m3fn
    assert third.modules["unet"].conv_in.weight.dtype == torch.float32
    assert torch.equal(third.modules["unet"].conv_in.weight, stored.float())


def test_markers_set_prediction(tiny_sdxl):
    tensors = _file_tensors(tiny_sdxl)
    tensors["v_pred"] = torch.zeros(0)
    tensors["ztsnr"] = torch.zeros(0)
    model = ModelSlot().load(WeightSource.from_tensors("vpred", tensors))
    assert model.prediction == "v" and model.ztsnr


def test_architecture_sets_prediction(tiny_sdxl, monkeypatch):
    """A v-prediction architecture (its ArchSpec says so) predicts v without the `v_pred` marker key."""
    import dataclasses
    from types import MappingProxyType

    from mergekit_sdxl.arch import registry

    vpred = dataclasses.replace(registry.SDXL, sampler=dataclasses.replace(registry.SDXL.sampler,
                                                                           prediction_type="v_prediction"))
    monkeypatch.setattr(registry, "SPECS", MappingProxyType({**registry.SPECS, "sdxl": vpred}))
    model = ModelSlot().load(WeightSource.from_file(tiny_sdxl))
    assert model.prediction == "v" and not model.ztsnr


# ---------------------------------------------------------------------------------------------- conditioning


def _sdxl_pipe(model, scheduler=None):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    from mergekit_sdxl.sampler import tokens

    m = model.modules
    scheduler = scheduler or EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                                    beta_end=0.012, timestep_spacing="linspace")
    return StableDiffusionXLPipeline(vae=m["vae"], text_encoder=m["text_encoder"],
                                     text_encoder_2=m["text_encoder_2"], tokenizer=tokens.clip_tokenizer(),
                                     tokenizer_2=tokens.clip_tokenizer_2(), unet=m["unet"], scheduler=scheduler,
                                     force_zeros_for_empty_prompt=True, add_watermarker=False)


@pytest.mark.parametrize("text", ["a photo of a cat", "masterpiece, best quality, 1girl, solo, looking at viewer"])
def test_sdxl_conditioning_equals_diffusers_encode_prompt(sdxl, text):
    from mergekit_sdxl.sampler.conditioning import PromptEncoder

    m = sdxl.modules
    enc = PromptEncoder(m["text_encoder"], m["text_encoder_2"])
    cond, uncond = enc.encode(text), enc.encode("", negative=True)
    pe, npe, pooled, npooled = _sdxl_pipe(sdxl).encode_prompt(text, device="cpu", negative_prompt=None)
    torch.testing.assert_close(cond.context, pe, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cond.pooled, pooled, rtol=1e-5, atol=1e-6)
    assert torch.count_nonzero(uncond.context) == 0 and torch.count_nonzero(uncond.pooled) == 0
    assert uncond.context.shape == npe.shape and uncond.pooled.shape == npooled.shape


def test_sd15_conditioning_equals_diffusers_encode_prompt(sd15):
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    from mergekit_sdxl.sampler import tokens
    from mergekit_sdxl.sampler.conditioning import PromptEncoder

    m = sd15.modules
    pipe = StableDiffusionPipeline(vae=m["vae"], text_encoder=m["text_encoder"], tokenizer=tokens.clip_tokenizer(),
                                   unet=m["unet"], scheduler=EulerDiscreteScheduler(), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    enc = PromptEncoder(m["text_encoder"])
    pe, npe = pipe.encode_prompt("a photo of a cat", "cpu", 1, True, negative_prompt="")
    torch.testing.assert_close(enc.encode("a photo of a cat").context, pe, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(enc.encode("", negative=True).context, npe, rtol=1e-5, atol=1e-6)  # SD1.5: ""


def test_sd15_clip_skip(sd15):
    from mergekit_sdxl.sampler import tokens
    from mergekit_sdxl.sampler.conditioning import PromptEncoder

    te = sd15.modules["text_encoder"]
    ids = tokens.clip_tokenizer()("a photo of a cat", padding="max_length", max_length=77,
                                  return_tensors="pt").input_ids
    hidden = te(ids, output_hidden_states=True).hidden_states[-2]
    expected = getattr(te, "text_model", te).final_layer_norm(hidden)  # A1111 clip skip 2
    torch.testing.assert_close(PromptEncoder(te, clip_skip=2).encode("a photo of a cat").context, expected)


def test_emphasis_and_long_prompts(sdxl):
    from mergekit_sdxl.sampler.conditioning import PromptEncoder, chunks_for

    m = sdxl.modules
    enc = PromptEncoder(m["text_encoder"], m["text_encoder_2"])
    plain, weighted = enc.encode("a cat"), enc.encode("a (cat:1.5)")
    assert plain.context.shape == weighted.context.shape == (1, 77, 96)
    torch.testing.assert_close(plain.pooled, weighted.pooled)  # pooled is taken before emphasis
    for lo, hi in ((0, 32), (32, 96)):  # the mean of each encoder's part is restored
        torch.testing.assert_close(weighted.context[..., lo:hi].mean(), plain.context[..., lo:hi].mean(),
                                   rtol=1e-4, atol=1e-6)
    # the weighted position changes by 1.5x before mean restoration
    ratio = weighted.context[0, 2, :32] / plain.context[0, 2, :32]
    assert torch.allclose(ratio, ratio[0].expand_as(ratio), rtol=1e-3)
    long = enc.encode(" ".join(["cat"] * 119))
    assert long.context.shape == (1, 154, 96)
    chunk0 = enc.encode(" ".join(["cat"] * 75))
    torch.testing.assert_close(long.pooled, chunk0.pooled)  # pooled from chunk 0
    assert len(chunks_for("a BREAK b")) == 2


# ---------------------------------------------------------------------------------------------- sampling


def _gens(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


@pytest.mark.parametrize("sampler", ["euler", "euler_a"])
def test_sdxl_sampling_equals_diffusers_pipeline(sdxl, sampler):
    from diffusers import EulerAncestralDiscreteScheduler, EulerDiscreteScheduler

    from mergekit_sdxl.sampler.pipeline import GenParams, Renderer

    cls = EulerDiscreteScheduler if sampler == "euler" else EulerAncestralDiscreteScheduler
    scheduler = cls(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, timestep_spacing="linspace")
    params = GenParams("a photo of a cat", steps=4, cfg=5.0, sampler=sampler, width=64, height=64)
    renderer = Renderer(sdxl)
    ours = renderer.sample(params, [11, 12])
    theirs = _sdxl_pipe(sdxl, scheduler)(params.prompt, negative_prompt=None, num_inference_steps=4,
                                          guidance_scale=5.0, height=64, width=64, generator=_gens([11, 12]),
                                          num_images_per_prompt=2, output_type="latent").images
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4 * theirs.abs().max().item())
    images = renderer.decode(ours)
    vae = sdxl.modules["vae"]
    expected = ((vae.decode(theirs / 0.13025).sample + 1) / 2).clamp(0, 1)
    torch.testing.assert_close(images, expected, rtol=1e-4, atol=1e-4)


def test_batch_image_equals_single_render(sdxl):
    from mergekit_sdxl.sampler.pipeline import GenParams, Renderer

    renderer = Renderer(sdxl)
    params = GenParams("a cat", steps=3, cfg=4.0, sampler="euler_a", width=64, height=64)
    batch = renderer.sample(params, [7, 8, 9])
    for i, seed in enumerate([7, 8, 9]):
        single = renderer.sample(params, [seed])  # equal up to float rounding of a different GEMM batch size
        torch.testing.assert_close(batch[i : i + 1], single, rtol=1e-4, atol=1e-4 * single.abs().max().item())


@pytest.mark.parametrize("sampler", ["heun", "dpmpp_2m", "dpmpp_2m_sde"])
def test_other_samplers_run_sd15(sd15, sampler):
    from mergekit_sdxl.sampler.pipeline import GenParams, Renderer

    renderer = Renderer(sd15)
    params = GenParams("a cat", "(worst quality)", steps=3, cfg=5.0, sampler=sampler, schedule="karras",
                       width=64, height=64, clip_skip=2)
    images = renderer.render(params, [1])
    assert images[0].size == (64, 64)


def test_vae_nan_retries_in_float32(sd15, monkeypatch):
    from mergekit_sdxl.sampler.pipeline import Renderer

    renderer = Renderer(sd15)
    vae = sd15.modules["vae"]
    vae.to(torch.bfloat16)
    real_decode = vae.decode
    calls = []

    def flaky(z, return_dict=False):
        calls.append(z.dtype)
        out = real_decode(z, return_dict=False)[0]
        return (out * float("nan"),) if z.dtype == torch.bfloat16 else (out,)

    monkeypatch.setattr(vae, "decode", flaky)
    with pytest.warns(UserWarning, match="float32"):
        image = renderer.decode(torch.randn(1, 4, 8, 8))
    assert calls == [torch.bfloat16, torch.float32] and torch.isfinite(image).all()
    assert next(vae.parameters()).dtype == torch.float32


def test_cond_and_uncond_with_different_chunk_counts(sdxl):
    from mergekit_sdxl.sampler.pipeline import GenParams, Renderer

    renderer = Renderer(sdxl)
    params = GenParams(" ".join(["cat"] * 100), "", steps=2, sampler="euler", width=64, height=64)
    assert renderer.encode(params.prompt).context.shape[1] == 154  # uncond: 77 zeros
    assert torch.isfinite(renderer.sample(params, [1])).all()


def test_v_prediction_preconditioning():
    from mergekit_sdxl.sampler.conditioning import Cond
    from mergekit_sdxl.sampler.denoiser import Denoiser, Guidance
    from mergekit_sdxl.sampler.schedules import DiscreteSchedule

    class Constant(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.seen = []

        def forward(self, x, t, encoder_hidden_states=None, added_cond_kwargs=None, return_dict=False):
            self.seen.append((x.clone(), t.clone()))
            return (torch.ones_like(x),)

    unet = Constant()
    schedule = DiscreteSchedule()
    cond = Cond(torch.zeros(1, 77, 8))
    x, sigma = torch.full((1, 4, 2, 2), 2.0), torch.tensor([3.0])
    v = Denoiser(unet, schedule, "v")(x, sigma, Guidance(cond, cond, 1.0))
    torch.testing.assert_close(v, x / 10 - 3 / 10**0.5)  # c_skip x + c_out v, sigma_data 1
    eps = Denoiser(unet, schedule, "eps")(x, sigma, Guidance(cond, cond, 1.0))
    torch.testing.assert_close(eps, x - 3.0)
    seen_x, seen_t = unet.seen[0]
    torch.testing.assert_close(seen_x, x / 10**0.5)
    torch.testing.assert_close(schedule.t_to_sigma(seen_t), sigma, rtol=1e-5, atol=0)


def test_scaled_fp8_is_dequantized(tiny_sdxl):
    from mergekit_sdxl.io.dtypes import scale_key, to_scaled_fp8

    tensors = _file_tensors(tiny_sdxl)
    key = "model.diffusion_model.input_blocks.0.0.weight"
    original = tensors[key].float() * 1000  # beyond fp8 e4m3's range: only the scale keeps it
    q, scale, _ = to_scaled_fp8(original, "F8_E4M3")
    tensors[key], tensors[scale_key(key)] = q, scale
    tensors["scaled_fp8"] = torch.zeros(0, dtype=torch.float8_e4m3fn)  # ComfyUI's marker
    model = ModelSlot().load(WeightSource.from_tensors("scaled", tensors))
    torch.testing.assert_close(model.modules["unet"].conv_in.weight, q.float() * scale)
    torch.testing.assert_close(model.modules["unet"].conv_in.weight, original, rtol=0.07, atol=0.0)


def test_comfyui_scaled_fp8_file_is_dequantized(tiny_sdxl, tmp_path):
    """A `convert --scaled-fp8` file (ComfyUI's layout): Linear weights dequantized, the fp16 rest read as is."""
    from mergekit_sdxl.engine.convert import convert_checkpoint
    from mergekit_sdxl.io.reader import open_checkpoint

    scaled = tmp_path / "scaled.safetensors"
    with open_checkpoint(tiny_sdxl) as reader:
        convert_checkpoint(reader, scaled, "fp8_e4m3fn", scaled_fp8=True)
    stored, original = _file_tensors(scaled), _file_tensors(tiny_sdxl)
    model = ModelSlot().load(WeightSource.from_file(scaled))
    proj = "model.diffusion_model.input_blocks.4.1.proj_in"
    unet = model.modules["unet"]
    assert stored[proj + ".weight"].dtype == torch.float8_e4m3fn
    got = unet.down_blocks[1].attentions[0].proj_in.weight
    torch.testing.assert_close(got, stored[proj + ".weight"].float() * stored[proj + ".scale_weight"])
    torch.testing.assert_close(got, original[proj + ".weight"].float(), rtol=0.07, atol=1e-3)
    assert torch.equal(unet.conv_in.weight, original["model.diffusion_model.input_blocks.0.0.weight"].float())


def test_swap_reads_straight_into_fp16_parameters(tiny_sdxl, make_ckpt):
    other = make_ckpt(seed=5, like=tiny_sdxl, delta="noise:0.2")
    slot = ModelSlot(dtype=torch.float16)
    slot.load(WeightSource.from_file(tiny_sdxl))
    model = slot.load(WeightSource.from_file(other))
    expected = _file_tensors(other)
    unet, te2 = model.modules["unet"], model.modules["text_encoder_2"]
    assert unet.conv_in.weight.dtype == torch.float16
    assert torch.equal(unet.conv_in.weight, expected["model.diffusion_model.input_blocks.0.0.weight"])
    fused = expected[SDXL_TE2 + "transformer.resblocks.3.attn.in_proj_weight"]
    assert torch.equal(te2.text_model.encoder.layers[3].self_attn.k_proj.weight, fused.chunk(3)[1])
    assert torch.equal(te2.text_projection.weight, expected[SDXL_TE2 + "text_projection"].t())
