"""`mergekit-sdxl extract-lora BASE TUNED -o OUT`: a LoRA of tuned − base, streamed layer by layer."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from mergekit_sdxl.cli import console
from mergekit_sdxl.cli.options import out_option, output_path
from mergekit_sdxl.dtypes import WEIGHTS, choices
from mergekit_sdxl.lora.clients import FORMATS, format_help

if TYPE_CHECKING:
    from mergekit_sdxl.api import ExtractResult
    from mergekit_sdxl.lora.extract import LayerReport


@click.command("extract-lora")
@click.argument("base", type=click.Path(exists=True, path_type=Path))
@click.argument("tuned", type=click.Path(exists=True, path_type=Path))
@out_option("output", old_spelling=True, required=True, type=click.Path(path_type=Path),
              help="Adapter file to write.")
@click.option("--rank", default=64, show_default=True, help="Rank of Linear and 1x1 conv layers (max rank in "
              "dynamic modes).")
@click.option("--conv-rank", default=32, show_default=True, help="Rank of 3x3 conv layers (attn+conv / all).")
@click.option("--dynamic", metavar="MODE:VALUE", help="Per-layer rank: fro:τ (keep energy ≥ τ of ‖ΔW‖²), ratio:ρ "
              "(s ≥ ρ·s₁), threshold:t (s > t), cumulative:q (Σs ≥ q·Σall, exact solver); each capped by the rank.")
@click.option("--conv-dynamic", metavar="MODE:VALUE", help="Like --dynamic, for 3x3 conv layers.")
@click.option("--preset", type=click.Choice(("attn", "attn+conv", "all")), default="attn", show_default=True,
              help="attn: kohya's default modules (SDXL UNet 722, te1 72, te2 192); attn+conv adds ResNet/"
                   "down/upsample layers (SDXL UNet 788); all adds embeddings, conv_in and conv_out.")
@click.option("--text-encoders", type=click.Choice(("auto", "on", "off")), default="auto", show_default=True,
              help="auto keeps a text-encoder layer when ‖ΔW‖/‖W‖ exceeds the noise floor max(1e-3, 4u/√3) "
                   "(u: unit roundoff of the stored dtype) and reports each decision. Attention blocks are decided "
                   "whole (q, k, v, out: all or none; A1111 skips partial CLIP-G blocks).")
@click.option("--te-threshold", type=float, help="Override the auto noise floor (‖ΔW‖/‖W‖).")
@click.option("--exact", is_flag=True, help="Exact SVD per layer (slow; the randomized default is within ~1% "
              "of its error).")
@click.option("--niter", default=2, show_default=True, help="Power iterations of the randomized SVD.")
@click.option("--oversample", default=10, show_default=True, help="Extra sketch columns of the randomized SVD.")
@click.option("--seed", default=0, show_default=True, help="Seed of the randomized SVD (results are reproducible).")
@click.option("--clamp-quantile", type=float, help="kohya parity: clip factors to their q-quantile (e.g. 0.99). "
              "Lossy (raised error up to 4x in measurements); off by default.")
@click.option("--alpha", type=float, help="Alpha written for Linear layers (default: alpha = rank, scale 1).")
@click.option("--conv-alpha", type=float, help="Alpha for 3x3 conv layers (default: alpha = rank).")
@click.option("--save-dtype", type=click.Choice(choices(WEIGHTS)), default="fp16", show_default=True)
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="kohya", show_default=True,
              help="Key names. " + format_help())
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--report", "report_path", type=click.Path(path_type=Path), callback=output_path,
              help="Also write the per-layer report as JSON.")
@click.option("--no-hash", is_flag=True, help="Do not hash the inputs for the metadata.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists (never an input).")
def command(base: Path, tuned: Path, output: Path, rank: int, conv_rank: int, dynamic: str | None,
            conv_dynamic: str | None, preset: str, text_encoders: str, te_threshold: float | None, exact: bool,
            niter: int, oversample: int, seed: int, clamp_quantile: float | None, alpha: float | None,
            conv_alpha: float | None, save_dtype: str, fmt: str, device: str, report_path: Path | None,
            no_hash: bool, overwrite: bool) -> None:
    """Extract TUNED − BASE as a LoRA/LoCon adapter (kohya keys, per-layer alpha, ss_* and modelspec metadata).

    Streams key by key; layers are chosen by state-dict key. Prints a per-layer line with --verbose and a
    summary; the same report is stored in the file's metadata (`mergekit_sdxl.lora_layers`).
    """
    from mergekit_sdxl import api

    def on_layer(row: LayerReport, done: int, total: int) -> None:
        status = f"rank {row.rank:3d} energy {row.energy:.4f}" if row.kept else f"dropped: {row.reason}"
        console.verbose(f"[{done}/{total}] {row.name}: {status} (|dW|/|W| {row.rel_change:.2e})")

    result = api.extract_lora(
        base, tuned, output, rank=rank, conv_rank=conv_rank, dynamic=dynamic, conv_dynamic=conv_dynamic,
        preset=preset, text_encoders=text_encoders, te_threshold=te_threshold, exact=exact, niter=niter,
        oversample=oversample, seed=seed, clamp_quantile=clamp_quantile, alpha=alpha, conv_alpha=conv_alpha,
        save_dtype=save_dtype, fmt=fmt, device=device, report_path=report_path, hash_inputs=not no_hash,
        overwrite=overwrite, on_layer=on_layer)
    for warning in result.warnings:
        console.console.print(f"warning: {warning}")
    _print_summary(result)


def _print_summary(report: ExtractResult) -> None:
    summary = report.summary
    for component, counts in sorted(summary["components"].items()):
        dropped = [row for row in report.layers if row.component == component and not row.kept]
        line = f"{component}: kept {counts['kept']}, dropped {counts['dropped']}"
        reasons = sorted({row.reason.split(" (")[0] for row in dropped})
        if reasons:
            line += f" ({', '.join(reasons)})"
        if component in ("clip_l", "clip_g") and dropped:
            worst = max(dropped, key=lambda r: r.rel_change)
            line += f"; largest dropped |dW|/|W| {worst.rel_change:.2e} vs floor {report.te_floor:.2e}"
        console.info(line)
    console.info(f"wrote {report.path}: {summary['layers']} layers, mean retained energy "
                 f"{summary['mean_energy']:.4f} (min {summary['min_energy']:.4f})")
