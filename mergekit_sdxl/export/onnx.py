"""`export --format onnx`: the folder optimum's `ORTStableDiffusionXLPipeline` / `ORTStableDiffusionPipeline`
`.from_pretrained(DIR)` loads, produced offline with `torch.onnx.export` (no optimum needed to export).

Layout and names are optimum's (optimum-onnx 0.1, `modeling_diffusion.py` and `exporters/onnx/model_configs.py`):

| folder | inputs | outputs |
|---|---|---|
| `text_encoder/` | `input_ids` [batch, seq] | `last_hidden_state`, `pooler_output` (+ `hidden_states.0..N` on SDXL) |
| `text_encoder_2/` (SDXL) | `input_ids` | `text_embeds`, `last_hidden_state`, `hidden_states.0..N` |
| `unet/` | `sample`, `timestep` (0-dim), `encoder_hidden_states` (+ `text_embeds`, `time_ids`: SDXL) | `out_sample` |
| `vae_encoder/` | `sample` | `latent_parameters` (mean and log-variance) |
| `vae_decoder/` | `latent_sample` | `sample` |

Each folder holds `model.onnx` and the component's `config.json` (optimum refuses a part without it); weights of a
graph over 2 GB go to one external-data file `model.onnx_data` beside it. `model_index.json`, `scheduler/` and the
tokenizers are the diffusers export's. Output order matters: diffusers takes the first output of a text encoder as
the pooled embedding when it is 2-D, so `text_embeds` leads text_encoder_2 and `last_hidden_state` text_encoder.

Memory: one component is built and filled at a time (meta-device build, weights streamed from the file), exported,
then freed. The ONNX graph of a component is held in memory by the exporter, so the peak is a few times the largest
component (the SDXL UNet: 10 GB in fp32).
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from mergekit_sdxl.arch.keymap import TEXT_ENCODER, TEXT_ENCODER_2, UNET, VAE
from mergekit_sdxl.arch.registry import SPECS, arch_spec
from mergekit_sdxl.errors import UsageError
from mergekit_sdxl.export.diffusers import ExportReport, component_configs
from mergekit_sdxl.export.folder import check_output, staged_folder, write_common, write_json
from mergekit_sdxl.export.source import ExportSource, build_modules, load_module
from mergekit_sdxl.io.dtypes import torch_dtype

OPSET = 17
EXTERNAL_DATA = "model.onnx_data"
TWO_GB = 2**31 - 1
VAE_ENCODER, VAE_DECODER = "vae_encoder", "vae_decoder"
ONNX_PARTS = {spec.id: (*spec.text_encoders, UNET, VAE_ENCODER, VAE_DECODER) for spec in SPECS.values()}


def require_onnx() -> None:
    """UsageError naming the extra when `onnx` is not installed (torch.onnx.export writes through it)."""
    try:
        import onnx  # noqa: F401
    except ImportError as exc:  # chained: a broken install fails here too, and says how
        raise UsageError("--format onnx needs the onnx package: pip install 'mergekit-sdxl[onnx]' "
                         "(onnx, onnxruntime; optimum-onnx to load the folder with optimum)") from exc


class _TextEncoder(torch.nn.Module):
    def __init__(self, module: torch.nn.Module, with_projection: bool, hidden_states: bool) -> None:
        super().__init__()
        self.module, self.with_projection, self.hidden_states = module, with_projection, hidden_states

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.module(input_ids, output_hidden_states=self.hidden_states, return_dict=True)
        first = (out.text_embeds, out.last_hidden_state) if self.with_projection else \
            (out.last_hidden_state, out.pooler_output)
        return first + (tuple(out.hidden_states) if self.hidden_states else ())


class _UNet(torch.nn.Module):
    def __init__(self, module: torch.nn.Module, sdxl: bool) -> None:
        super().__init__()
        self.module, self.sdxl = module, sdxl

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                text_embeds: torch.Tensor | None = None, time_ids: torch.Tensor | None = None) -> torch.Tensor:
        added = {"text_embeds": text_embeds, "time_ids": time_ids} if self.sdxl else None
        return self.module(sample, timestep, encoder_hidden_states, added_cond_kwargs=added, return_dict=False)[0]


class _VaeEncoder(torch.nn.Module):
    def __init__(self, module: Any) -> None:  # a diffusers AutoencoderKL (diffusers is imported lazily)
        super().__init__()
        self.module = module

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        return self.module.encode(sample).latent_dist.parameters


class _VaeDecoder(torch.nn.Module):
    def __init__(self, module: Any) -> None:  # a diffusers AutoencoderKL (diffusers is imported lazily)
        super().__init__()
        self.module = module

    def forward(self, latent_sample: torch.Tensor) -> torch.Tensor:
        return self.module.decode(latent_sample, return_dict=False)[0]


def _text_spec(config: dict, with_projection: bool, hidden: bool) -> tuple[list[str], list[str], dict]:
    outputs = ["text_embeds", "last_hidden_state"] if with_projection else ["last_hidden_state", "pooler_output"]
    if hidden:
        outputs += [f"hidden_states.{i}" for i in range(config["num_hidden_layers"] + 1)]
    axes = {"input_ids": {0: "batch_size", 1: "sequence_length"}}
    for name in outputs:
        axes[name] = {0: "batch_size"} if name in ("text_embeds", "pooler_output") else \
            {0: "batch_size", 1: "sequence_length"}
    return ["input_ids"], outputs, axes


def export_part(part: str, module: torch.nn.Module, source: ExportSource, dtype: torch.dtype, path: Path,
                opset: int = OPSET) -> None:
    """Trace one pipeline part (`text_encoder`, `text_encoder_2`, `unet`, `vae_encoder`, `vae_decoder`) to `path`."""
    spec = arch_spec(source.arch)
    configs = source.configs
    if part in (TEXT_ENCODER, TEXT_ENCODER_2):
        projection = part == TEXT_ENCODER_2
        hidden = spec.dual_text_encoder  # SDXL-style encoders also return hidden states
        wrapper: torch.nn.Module = _TextEncoder(module, projection, hidden)
        names_in, names_out, axes = _text_spec(configs[part], projection, hidden)
        args: tuple = (torch.zeros(2, 77, dtype=torch.int64),)
    elif part == UNET:
        cfg = configs[UNET]
        sdxl = spec.sampler.size_conditioning  # pooled text embeddings and size/crop time ids as inputs
        wrapper = _UNet(module, sdxl)
        names_in = ["sample", "timestep", "encoder_hidden_states"]
        args = (torch.randn(2, cfg["in_channels"], 16, 16, dtype=dtype), torch.tensor(999.0, dtype=dtype),
                torch.randn(2, 77, cfg["cross_attention_dim"], dtype=dtype))
        axes = {"sample": {0: "batch_size", 2: "height", 3: "width"},
                "encoder_hidden_states": {0: "batch_size", 1: "sequence_length"},
                "out_sample": {0: "batch_size", 2: "height", 3: "width"}}
        if sdxl:
            pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
            names_in += ["text_embeds", "time_ids"]
            args += (torch.randn(2, pooled, dtype=dtype), torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2, dtype=dtype))
            axes.update(text_embeds={0: "batch_size"}, time_ids={0: "batch_size"})
        names_out = ["out_sample"]
    elif part == VAE_ENCODER:
        wrapper = _VaeEncoder(module)
        names_in, names_out = ["sample"], ["latent_parameters"]
        args = (torch.randn(2, configs[VAE]["in_channels"], 64, 64, dtype=dtype),)
        axes = {"sample": {0: "batch_size", 2: "sample_height", 3: "sample_width"},
                "latent_parameters": {0: "batch_size", 2: "latent_height", 3: "latent_width"}}
    else:
        wrapper = _VaeDecoder(module)
        names_in, names_out = ["latent_sample"], ["sample"]
        args = (torch.randn(2, configs[VAE]["latent_channels"], 8, 8, dtype=dtype),)
        axes = {"latent_sample": {0: "batch_size", 2: "latent_height", 3: "latent_width"},
                "sample": {0: "batch_size", 2: "sample_height", 3: "sample_width"}}
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        # fp16 traced on the CPU: torch inserts fp32 casts around some matmuls; constant folding would then store
        # those weights a second time in fp32 (1.6x the text encoders' size), so fp16 graphs are not folded
        torch.onnx.export(wrapper.eval(), args, str(path), input_names=names_in, output_names=names_out,
                          dynamic_axes=axes, opset_version=opset, do_constant_folding=dtype == torch.float32,
                          dynamo=False)
    _single_external_file(path)


def _single_external_file(path: Path) -> None:
    """Gather the per-tensor external files the exporter writes for graphs over 2 GB into `model.onnx_data`."""
    extra = [p for p in path.parent.iterdir() if p.is_file() and p.name not in (path.name, "config.json")]
    if not extra and path.stat().st_size < TWO_GB:
        return
    import onnx

    model = onnx.load(str(path), load_external_data=True)
    for p in extra:
        p.unlink()
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=EXTERNAL_DATA, size_threshold=1024)


def part_configs(source: ExportSource) -> dict[str, dict]:
    """config.json of each ONNX part (what optimum registers on its ORT models)."""
    base = component_configs(source)
    out: dict[str, dict] = {}
    spec = arch_spec(source.arch)
    projection = source.configs[spec.text_encoders[-1]]["projection_dim"]  # the pooled (last) encoder's
    for part in ONNX_PARTS[source.arch]:
        if part in (VAE_ENCODER, VAE_DECODER):
            out[part] = dict(base[VAE])
        elif part == UNET:
            out[part] = {**base[UNET], "requires_aesthetics_score": False, "time_cond_proj_dim": None,
                         "text_encoder_projection_dim": projection}
        else:
            out[part] = {**base[part], "output_hidden_states": spec.dual_text_encoder}
    return out


def export_onnx(src: str | os.PathLike[str], out: str | os.PathLike[str], dtype: str = "fp32", *,
                overwrite: bool = False, opset: int = OPSET,
                on_part: Callable[[str], None] | None = None) -> ExportReport:
    """Write the ONNX (optimum) pipeline folder `out` for single-file checkpoint `src`.

    Args:
        dtype: fp32 (default; what ONNX Runtime's CPU provider runs) or fp16 (for GPU providers).
        on_part: called with each part's name before it is exported (progress).
    """
    require_onnx()
    if dtype.lower() not in ("fp32", "float32", "f32", "fp16", "float16", "f16"):
        raise UsageError(f"--format onnx: --dtype {dtype} is not supported; use fp32 (default) or fp16")
    start = time.perf_counter()
    out = Path(out)
    check_output(out, overwrite, src)
    with ExportSource(src, dtype) as source, staged_folder(out, overwrite) as tmp:
        compute = torch_dtype(source.code)
        write_common(tmp, source.arch, source.markers)
        configs = part_configs(source)
        modules = build_modules(source.configs)
        for part in ONNX_PARTS[source.arch]:
            if on_part is not None:
                on_part(part)
            component = VAE if part in (VAE_ENCODER, VAE_DECODER) else part
            module = modules[component]
            if next(module.parameters()).is_meta:
                module = modules[component] = load_module(source, component, module, compute)
            write_json(tmp / part / "config.json", configs[part])
            export_part(part, module, source, compute, tmp / part / "model.onnx", opset)
            if part != VAE_ENCODER:  # the decoder reuses the VAE
                modules.pop(component)
                del module
        files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
        tensors = sum(len(t) for t in source.targets.values())
        report = ExportReport(out, source.arch, "onnx", source.code, files, tensors, list(source.unmapped_keys),
                              source.filled, 0, source.markers)
    report.seconds = time.perf_counter() - start
    return report
