"""`mergekit-sdxl inspect FILE`: what a checkpoint is, from its header alone (no tensor data is read by default)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from mergekit_sdxl.arch.blocks import CONVENTIONS, DEFAULT_CONVENTION
from mergekit_sdxl.cli import console
from mergekit_sdxl.errors import UsageError


@click.command("inspect")
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (schema below) instead of text.")
@click.option("--blocks", "with_blocks", is_flag=True, help="Add keys and parameters per MBW block.")
@click.option("--convention", type=click.Choice(CONVENTIONS),
              help=f"Block convention for --blocks (default: the one the file's merge recipe recorded, else "
                   f"{DEFAULT_CONVENTION}).")
@click.option("--hash", "full_hash", is_flag=True,
              help="Compute AutoV2 and AutoV3 unless cached (reads the whole file once).")
@click.option("--no-hash", is_flag=True, help="Skip hashes, even the cheap legacy one.")
@click.option("--check-values", is_flag=True, help="Read every float tensor and count NaN/Inf values.")
def command(file: Path, as_json: bool, with_blocks: bool, convention: str | None, full_hash: bool, no_hash: bool,
            check_values: bool) -> None:
    """Show architecture, components, markers, metadata, hashes and oddities of a checkpoint (or a LoRA summary).

    By default only the header is read: parameter counts come from shapes; hashes are A1111's legacy one (a 64 KiB
    read) plus AutoV2/AutoV3 when the hash cache knows the file. --hash computes and caches AutoV2/AutoV3 (reads
    the whole file), --check-values reads every float tensor. An unknown architecture is reported, not an error.

    \b
    JSON (--json), schema "mergekit-sdxl.inspect/1"; keys are always present, null when unknown:
      file, size_bytes, format ("safetensors", "ckpt", ...), n_keys, n_params (float params)
      architecture ("sdxl" | "sd15" | null), architecture_error (str | null)
      components: {unet|clip_l|clip_g|vae|ema|other: {keys, params, bytes, dtypes: {dtype: n_keys}}}
      markers: [v_pred, ztsnr, edm_vpred.sigma_max, edm_vpred.sigma_min present in the file]
      metadata: {key: str} as stored; lineage: {sd_merge_recipe, sd_merge_models, mergekit: {key: parsed}}
      hashes: {legacy, sha256, autov2, data_sha256, autov3, source ("cache" | "computed" | null),
               metadata: {sshs_model_hash, sshs_legacy_hash} (as the file's metadata states them)}
      oddities: {missing_mandatory: [key], unknown_keys: [key], shape_mismatches: [{key, shape, expected}],
                 fp8_scales: int, non_finite: {key: count} | null (null without --check-values)}
      blocks: null | {convention, convention_source ("given" | "recorded in mergekit_sdxl.recipe" | "default"),
               blocks: {block: {keys, params}}, kept_from_a: [key]}

    \b
    A LoRA/LyCORIS file gets an adapter summary instead, schema "mergekit-sdxl.inspect-lora/1":
      file, size_bytes, kind ("adapter"), naming ("kohya" | "peft" | "diffusers" | "other"),
      algorithms: {lora|loha|lokr|full|norm: modules}, dora_modules, n_keys, n_modules,
      architecture (null when unknown), architecture_source ("key names" | "ss_base_model_version" |
        "modelspec.architecture" | "SGM UNet names" | null),
      components: {unet|clip_l|clip_g|unknown: {modules, ranks: {rank: n}, alphas: {alpha: n}}} ("-": none stored),
      blocks: null | {convention, modules: {block: n}} (BASE: the text encoders), unknown_keys: [key], metadata
    """
    if full_hash and no_hash:
        raise UsageError("--hash and --no-hash contradict each other")
    from mergekit_sdxl import api

    with console.api_progress() as progress:
        result = api.inspect(file, blocks=with_blocks, convention=convention,
                             hash_mode="none" if no_hash else "full" if full_hash else "legacy",
                             check_values=check_values, progress=progress)
    click.echo(json.dumps(result.report, indent=2) if as_json else result.text())
