"""What an architecture is, as data: `ArchSpec` and its parts (torch-free, stdlib only).

Code outside `arch/` asks the spec of an architecture (`arch.registry.arch_spec(arch)`) for every fact that differs
between architectures (detection keys, key prefixes, MBW layout, modelspec names, LoRA naming, tiny shapes,
diffusers configs, sampler defaults) and never compares the architecture id with a string literal;
`tests/test_arch_spec.py` checks that. Adding an architecture = one `ArchSpec` in `arch/registry.py`, its key
table (`arch/data/<id>.json`) and configs (`arch/configs/<id>/`), plus what its new traits need.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# diffusers pipeline folder names of the model parts
UNET, VAE, TEXT_ENCODER, TEXT_ENCODER_2 = "unet", "vae", "text_encoder", "text_encoder_2"


@dataclass(frozen=True)
class Detection:
    """How a file of this architecture is recognised.

    `fingerprints`: any one of these single-file keys identifies it; `unet_only`: a key that identifies a file
    with no text encoder at all (None: such files are not recognised); `pipelines`: diffusers pipeline class
    names in `model_index.json`; `lora_prefixes`: kohya module-name prefixes only its adapters have;
    `lora_substrings`: substrings of adapter key names only its adapters have (peft/diffusers naming);
    `markers`: marker keys (arch/detect.py `MARKERS`, e.g. `v_pred`) a file must also have: a variant sharing
    another architecture's fingerprints (a v-prediction SDXL) is told apart by them, the spec with the most
    present markers winning.
    """

    fingerprints: tuple[str, ...]
    unet_only: str | None
    pipelines: tuple[str, ...]
    lora_prefixes: tuple[str, ...]
    lora_substrings: tuple[str, ...] = ()
    markers: tuple[str, ...] = ()


@dataclass(frozen=True)
class BlockLayout:
    """The MBW (merge block weighted) layout and the rules that differ per architecture (conventions.md s. 2).

    `depth`: IN/OUT blocks (IN00..IN{depth-1}); `adm_embed`: the UNet has a `label_emb` that follows `time_embed`;
    `parts_by_prefix`: text-encoder keys follow BASE and VAE keys BASE (or VAE under sd-mecha) by their prefix, and
    any other key no UNet block claims keeps A; when False every such weight follows BASE;
    `mecha_vae_block`: sd-mecha gives the VAE its own block; `legacy_embed_keep_a`: under supermerger-2023,
    `time_embed` keeps A (else it joins the last OUT block); `sd1_vector`: a 26-value SuperMerger SD1 vector is
    accepted and mapped onto this layout (positions 0-9 and 13-22); `lbw_layout`: the LoRA Block Weight layout
    that covers an attention-only LoRA; `supermerger_weights`: lengths of SuperMerger's recorded weight lists.
    """

    depth: int
    adm_embed: bool
    parts_by_prefix: bool
    mecha_vae_block: bool
    legacy_embed_keep_a: bool
    sd1_vector: bool
    lbw_layout: int
    supermerger_weights: tuple[int, ...]

    @property
    def length(self) -> int:
        """Values of a full MBW vector: BASE, IN.., M00, OUT.. (without the optional VAE)."""
        return 2 * self.depth + 2


@dataclass(frozen=True)
class ModelSpecNames:
    """Names other tools write into metadata for this architecture (SAI model spec, kohya training metadata)."""

    architecture: str
    implementation: str
    lora_implementation: str
    kohya_base_version: str

    @property
    def lora_architecture(self) -> str:
        return f"{self.architecture}/lora"


@dataclass(frozen=True)
class SamplerDefaults:
    """What rendering needs: default and recommended sizes, VAE latent scale, prediction, conditioning traits.

    `clip_skip`: the A1111 clip-skip setting applies (SDXL always uses the penultimate layer, so it is ignored);
    `size_conditioning`: the UNet takes SDXL's size/crop `time_ids`; `ays_sigmas`: NVIDIA's Align Your Steps
    10-step table (11 sigmas) as A1111 ships it.
    """

    size: tuple[int, int]
    pixel_range: tuple[int, int]
    latent_scale: float
    prediction_type: str
    clip_skip: bool
    size_conditioning: bool
    ays_sigmas: tuple[float, ...]

    @property
    def resolution(self) -> str:
        return f"{self.size[0]}x{self.size[1]}"


@dataclass(frozen=True)
class TinySpec:
    """The tiny test model (arch/tiny.py): real -> tiny dimension per key-table component, config overrides per
    diffusers component, and the UNet head count used when shapes match neither reference (None: width / 64)."""

    dims: Mapping[str, Mapping[int, int]]
    hparams: Mapping[str, Mapping[str, Any]]
    unet_heads: int | None


@dataclass(frozen=True)
class ArchSpec:
    """Everything that differs between architectures, as data. See the module docstring.

    `data`: the name of its key table (arch/data/<data>.json) and shipped configs (arch/configs/<data>/), so a
    variant with the same layout (e.g. a v-prediction SDXL) shares SDXL's; `components`: (single-file key prefix,
    key-table component) in match order; `diffusers_prefixes`: diffusers
    component -> single-file key prefix of its weights; `legacy_clip_prefix`: the CLIP prefix under which
    transformers < 4.0 files lack the `text_model.` level (None: no such files); `lora_names`: key-table
    component a LoRA can adapt -> (kohya name prefix, diffusers component = peft prefix); `lora_unet_names`:
    whether kohya names UNet modules by the single-file path ("sgm") or the diffusers path ("diffusers"); `configs`:
    shipped diffusers configs (arch/configs/<id>/); `pruned_te1_final_norm`: files may lack CLIP-L's final layer norm
    (the model never runs it), which is then filled with its identity.
    """

    id: str
    name: str
    data: str
    detection: Detection
    components: tuple[tuple[str, str], ...]
    diffusers_prefixes: Mapping[str, str]
    legacy_clip_prefix: str | None
    blocks: BlockLayout
    modelspec: ModelSpecNames
    lora_names: Mapping[str, tuple[str, str]]
    lora_unet_names: str
    configs: tuple[str, ...]
    pruned_te1_final_norm: bool
    sampler: SamplerDefaults
    tiny: TinySpec

    @property
    def lora_prefixes(self) -> dict[str, tuple[str, str, str]]:
        """Key-table component -> (single-file key prefix, kohya name prefix, peft prefix) of adaptable parts."""
        return {component: (self.diffusers_prefixes[part], kohya, part)
                for component, (kohya, part) in self.lora_names.items()}

    @property
    def text_encoders(self) -> tuple[str, ...]:
        """Diffusers names of the text encoders, in order (`text_encoder`, `text_encoder_2`)."""
        return tuple(c for c in self.diffusers_prefixes if c.startswith(TEXT_ENCODER))

    @property
    def dual_text_encoder(self) -> bool:
        """Whether the model has a second text encoder (SDXL's OpenCLIP-bigG: pooled output, tokenizer_2)."""
        return TEXT_ENCODER_2 in self.diffusers_prefixes
