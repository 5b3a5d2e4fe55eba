"""ComfyUI's scaled-fp8 checkpoint layout: which tensors are scaled, how the scale and the marker are stored
(torch-free facts; the tensor arithmetic is in `mergekit_sdxl.io.dtypes`).

Measured against ComfyUI's source (v0.3.x `scaled_fp8_ops` / `model_config_from_unet`, and v0.8's
`convert_old_quants`, which turns this layout into its `weight_scale` + `comfy_quant` one on load):
- Only the diffusion model's Linear layers are dequantised: `<layer>.weight` in fp8 times `<layer>.scale_weight`,
  a 0-dim float32 tensor (older ComfyUI loads it into a 0-dim parameter, so no other shape loads).
  In SD UNets every 2-D `.weight` under `model.diffusion_model.` belongs to a Linear layer (convs are 4-D;
  SD1.5's 1x1 `proj_in`/`proj_out` convs too), so `is_scalable` is "2-D UNet weight".
- A scale anywhere else (UNet convs, VAE, text encoders) is ignored and the raw fp8 value is used, so
  everything that is not scaled is written in a plain dtype, `REST_DTYPE` (fp16, the dtype ComfyUI's own
  checkpoint save writes those parts in).
- The marker is `model.diffusion_model.scaled_fp8` (ComfyUI looks for it under the diffusion-model prefix, where its
  own save writes it): an empty tensor whose dtype names the fp8 format. v0.8 reads every scaled weight as
  float8_e4m3fn whatever the marker says, so e4m3fn is the only format written (`SCALED_DTYPE`).

This tool's first layout (still read by every reader here) put the marker at the top level (`LEGACY_MARKER`)
and scaled every 2-D+ weight; a scale beside any `.weight` is therefore honoured when reading.
"""

from __future__ import annotations

from mergekit_sdxl.arch.registry import UNET_PREFIX

SCALE_SUFFIX = "scale_weight"
SCALED_MARKER = UNET_PREFIX + "scaled_fp8"
LEGACY_MARKER = "scaled_fp8"
MARKER_KEYS = (SCALED_MARKER, LEGACY_MARKER)
SCALED_DTYPE = "F8_E4M3"
REST_DTYPE = "F16"
MARKER_SHAPE = (0,)
SCALE_DTYPE = "F32"
SCALE_SHAPE: tuple[int, ...] = ()


def is_scalable(key: str, shape: tuple[int, ...]) -> bool:
    """Whether ComfyUI dequantises this tensor with a scale: a 2-D weight (a Linear layer's) of the UNet."""
    return key.startswith(UNET_PREFIX) and key.endswith(".weight") and len(shape) == 2


def is_marker(key: str) -> bool:
    """Whether `key` is a scaled-fp8 marker (ComfyUI's, or this tool's first, top-level one): not a parameter."""
    return key in MARKER_KEYS


def scale_key(key: str) -> str:
    """Where the scale of the scaled-fp8 weight `<prefix>.weight` is stored: `<prefix>.scale_weight`."""
    if not key.endswith(".weight"):
        raise ValueError(f"only .weight tensors carry a scale, not {key!r}")
    return key[: -len("weight")] + SCALE_SUFFIX


def scaled_key_of(key: str) -> str | None:
    """The inverse of `scale_key`: `<prefix>.weight` for `<prefix>.scale_weight`, else None."""
    suffix = "." + SCALE_SUFFIX
    return key[: -len(SCALE_SUFFIX)] + "weight" if key.endswith(suffix) else None


def storage_dtype(key: str, shape: tuple[int, ...]) -> str:
    """The dtype a float tensor is stored in inside a scaled-fp8 file: e4m3fn with a scale, or the plain rest."""
    return SCALED_DTYPE if is_scalable(key, shape) else REST_DTYPE
