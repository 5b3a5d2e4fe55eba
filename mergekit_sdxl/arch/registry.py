"""The architectures this package knows, one `ArchSpec` each (see arch/spec.py), and how to look them up.

CLI choices, recipe validation and every per-architecture fact come from here: `ARCHS` (ids in display order),
`arch_spec(id)`, `DEFAULT_ARCH`.
"""

from __future__ import annotations

from types import MappingProxyType

from mergekit_sdxl.arch.spec import (
    TEXT_ENCODER,
    TEXT_ENCODER_2,
    UNET,
    VAE,
    ArchSpec,
    BlockLayout,
    Detection,
    ModelSpecNames,
    SamplerDefaults,
    TinySpec,
)
from mergekit_sdxl.errors import ArchError

_SGM = "https://github.com/Stability-AI/generative-models"
_UNET_PREFIX, _VAE_PREFIX, _EMA_PREFIX = "model.diffusion_model.", "first_stage_model.", "model_ema."
UNET_PREFIX = _UNET_PREFIX  # every architecture's diffusion model; the scaled-fp8 layout keys off it


def _unet_dims(context: int, tiny_context: int) -> dict[int, int]:
    """Multiples of 320 divided by 20; the cross-attention context maps to the sum of the tiny text widths."""
    dims = {d: d // 20 for d in (320, 640, 960, 1280, 1920, 2560, 5120, 10240)}
    dims.update({0: 0, 1: 1, 3: 3, 4: 4, context: tiny_context})
    return dims


def _clip_hparams(width: int, intermediate: int, heads: int, layers: int) -> dict[str, int]:
    return {"hidden_size": width, "intermediate_size": intermediate, "num_attention_heads": heads,
            "num_hidden_layers": layers, "projection_dim": width, "vocab_size": 49408,
            "max_position_embeddings": 77}


_CLIP_L_DIMS = {1: 1, 77: 77, 49408: 49408, 768: 32, 3072: 128}
_CLIP_G_DIMS = {1: 1, 77: 77, 49408: 49408, 1280: 64, 3840: 192, 5120: 256}
_VAE_DIMS = {1: 1, 3: 3, 4: 4, 8: 8, 128: 16, 256: 32, 512: 64}
_OTHER_DIMS = {1000: 1000}
_TINY_GROUPS = 8  # arch.tiny.norm_groups(16)
_TINY_VAE = {"block_out_channels": [16, 32, 64, 64], "layers_per_block": 2, "norm_num_groups": _TINY_GROUPS,
             "latent_channels": 4}
_TINY_TE1 = _clip_hparams(width=32, intermediate=128, heads=4, layers=12)

SDXL = ArchSpec(
    id="sdxl",
    name="SDXL",
    data="sdxl",
    detection=Detection(
        # SDXL's `ln_final` is optional in the wild (pruned files drop the last text layer), so the bigG token
        # embedding also counts. `label_emb` tells UNet-only exports apart from SD1 (SD2-unCLIP and the SDXL
        # refiner have one too, but they always come with their text encoders).
        fingerprints=("conditioner.embedders.1.model.ln_final.weight",
                      "conditioner.embedders.1.model.token_embedding.weight"),
        unet_only="model.diffusion_model.label_emb.0.0.weight",
        pipelines=("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline",
                   "StableDiffusionXLInpaintPipeline"),
        lora_prefixes=("lora_te1_", "lora_te2_"),
        lora_substrings=("text_encoder_2.",),
    ),
    components=((_UNET_PREFIX, "unet"), ("conditioner.embedders.0.", "clip_l"), ("conditioner.embedders.1.", "clip_g"),
                (_VAE_PREFIX, "vae"), (_EMA_PREFIX, "ema")),
    diffusers_prefixes=MappingProxyType({UNET: _UNET_PREFIX, VAE: _VAE_PREFIX,
                                         TEXT_ENCODER: "conditioner.embedders.0.transformer.",
                                         TEXT_ENCODER_2: "conditioner.embedders.1.model."}),
    legacy_clip_prefix=None,
    blocks=BlockLayout(depth=9, adm_embed=True, parts_by_prefix=True, mecha_vae_block=True, legacy_embed_keep_a=True,
                       sd1_vector=True, lbw_layout=12, supermerger_weights=(19, 20)),
    modelspec=ModelSpecNames(architecture="stable-diffusion-xl-v1-base", implementation=_SGM,
                             lora_implementation=_SGM, kohya_base_version="sdxl_base_v1-0"),
    lora_names=MappingProxyType({"unet": ("lora_unet", UNET), "clip_l": ("lora_te1", TEXT_ENCODER),
                                 "clip_g": ("lora_te2", TEXT_ENCODER_2)}),
    lora_unet_names="sgm",
    configs=(UNET, VAE, TEXT_ENCODER, TEXT_ENCODER_2, "scheduler", "model_index"),
    pruned_te1_final_norm=True,
    sampler=SamplerDefaults(
        size=(1024, 1024),
        pixel_range=(786_432, 1_310_720),  # Kohaku-XL's model card
        latent_scale=0.13025,
        prediction_type="epsilon",
        clip_skip=False,
        size_conditioning=True,
        ays_sigmas=(14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029),
    ),
    tiny=TinySpec(
        dims=MappingProxyType({"unet": {**_unet_dims(2048, 96), 2816: 112}, "clip_l": _CLIP_L_DIMS,
                               "clip_g": _CLIP_G_DIMS, "vae": _VAE_DIMS, "other": _OTHER_DIMS}),
        hparams=MappingProxyType({
            UNET: {"block_out_channels": [16, 32, 64], "layers_per_block": 2, "norm_num_groups": _TINY_GROUPS,
                   "attention_head_dim": [2, 4, 8], "transformer_layers_per_block": [1, 2, 10],
                   "cross_attention_dim": 96, "addition_time_embed_dim": 8,
                   "projection_class_embeddings_input_dim": 64 + 6 * 8},
            VAE: _TINY_VAE, TEXT_ENCODER: _TINY_TE1,
            TEXT_ENCODER_2: _clip_hparams(width=64, intermediate=256, heads=8, layers=32),
        }),
        unet_heads=None,
    ),
)

SD15 = ArchSpec(
    id="sd15",
    name="SD1.x",
    data="sd15",
    detection=Detection(
        fingerprints=("cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
                      "cond_stage_model.transformer.embeddings.token_embedding.weight"),  # transformers < 4.0 layout
        unet_only=None,
        pipelines=("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline"),
        lora_prefixes=("lora_te_",),
    ),
    components=((_UNET_PREFIX, "unet"), ("cond_stage_model.", "clip_l"), (_VAE_PREFIX, "vae"), (_EMA_PREFIX, "ema")),
    diffusers_prefixes=MappingProxyType({UNET: _UNET_PREFIX, VAE: _VAE_PREFIX,
                                         TEXT_ENCODER: "cond_stage_model.transformer."}),
    legacy_clip_prefix="cond_stage_model.transformer.",
    blocks=BlockLayout(depth=12, adm_embed=False, parts_by_prefix=False, mecha_vae_block=False,
                       legacy_embed_keep_a=False, sd1_vector=False, lbw_layout=17, supermerger_weights=(25,)),
    modelspec=ModelSpecNames(architecture="stable-diffusion-v1",
                             implementation="https://github.com/Stability-AI/stablediffusion",
                             lora_implementation="diffusers", kohya_base_version="sd_v1"),
    lora_names=MappingProxyType({"unet": ("lora_unet", UNET), "clip_l": ("lora_te", TEXT_ENCODER)}),
    lora_unet_names="diffusers",
    configs=(UNET, VAE, TEXT_ENCODER, "scheduler", "model_index"),
    pruned_te1_final_norm=False,
    sampler=SamplerDefaults(
        size=(512, 512),
        pixel_range=(384 * 384, 768 * 768),  # 384-768 px sides
        latent_scale=0.18215,
        prediction_type="epsilon",
        clip_skip=True,
        size_conditioning=False,
        ays_sigmas=(14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029),
    ),
    tiny=TinySpec(
        dims=MappingProxyType({"unet": _unet_dims(768, 32), "ema": _unet_dims(768, 32), "clip_l": _CLIP_L_DIMS,
                               "vae": _VAE_DIMS, "other": _OTHER_DIMS}),
        hparams=MappingProxyType({
            UNET: {"block_out_channels": [16, 32, 64, 64], "layers_per_block": 2, "norm_num_groups": _TINY_GROUPS,
                   "attention_head_dim": 2, "cross_attention_dim": 32, "transformer_layers_per_block": 1},
            VAE: _TINY_VAE, TEXT_ENCODER: _TINY_TE1,
        }),
        unet_heads=8,
    ),
)

SPECS: MappingProxyType[str, ArchSpec] = MappingProxyType({spec.id: spec for spec in (SDXL, SD15)})
ARCHS: tuple[str, ...] = tuple(SPECS)
ARCH_NAMES: MappingProxyType[str, str] = MappingProxyType({spec.id: spec.name for spec in SPECS.values()})
DEFAULT_ARCH = SDXL.id
# zero-terminal-SNR checkpoints get this architecture's scheduler config (Euler, trailing spacing) whatever theirs
ZTSNR_SCHEDULER_ARCH = SDXL.id


def check_arch(arch: str) -> str:
    """Return `arch` if it is a known architecture id, else raise ArchError listing the known ones."""
    if arch not in SPECS:
        raise ArchError(f"unknown architecture {arch!r}; known: {', '.join(ARCHS)}")
    return arch


def arch_spec(arch: str) -> ArchSpec:
    """The spec of architecture `arch`; ArchError listing the known ones for an unknown id."""
    return SPECS[check_arch(arch)]


def arch_name(arch: str | None, unknown: str = "unknown") -> str:
    """Display name ("SDXL", "SD1.x") of `arch`; an unknown or missing id is shown as is or as `unknown`."""
    if arch is None:
        return unknown
    spec = SPECS.get(arch)
    return spec.name if spec else arch
