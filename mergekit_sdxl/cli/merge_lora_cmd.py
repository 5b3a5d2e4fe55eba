"""`mergekit-sdxl merge-lora A.safetensors[:W] B.safetensors[:W] ... -o OUT`: Σ w·ΔW, re-factored."""

from __future__ import annotations

from pathlib import Path

import click

from mergekit_sdxl.arch.registry import ARCHS
from mergekit_sdxl.cli import console
from mergekit_sdxl.cli.options import out_option
from mergekit_sdxl.dtypes import WEIGHTS, choices
from mergekit_sdxl.errors import UsageError


@click.command("merge-lora")
@click.argument("adapters", nargs=-1, required=True, metavar="ADAPTER[:WEIGHT]...")
@out_option("output", old_spelling=True, required=True, type=click.Path(path_type=Path))
@click.option("--rank", default=64, show_default=True, help="Rank of the merged adapter (max in dynamic modes).")
@click.option("--conv-rank", default=32, show_default=True, help="Rank of 3x3 conv layers.")
@click.option("--dynamic", metavar="MODE:VALUE", help="fro:τ, ratio:ρ, threshold:t or cumulative:q.")
@click.option("--conv-dynamic", metavar="MODE:VALUE")
@click.option("--exact", is_flag=True, help="Exact SVD per layer.")
@click.option("--seed", default=0, show_default=True)
@click.option("--save-dtype", type=click.Choice(choices(WEIGHTS)), default="fp16", show_default=True)
@click.option("--arch", type=click.Choice(ARCHS), help="When the files do not say.")
@click.option("--overwrite", is_flag=True)
def command(adapters: tuple[str, ...], output: Path, rank: int, conv_rank: int, dynamic: str | None,
            conv_dynamic: str | None, exact: bool, seed: int, save_dtype: str, arch: str | None,
            overwrite: bool) -> None:
    """Merge adapters into one: the weighted sum of their ΔW per module, re-factored to the requested rank."""
    from mergekit_sdxl.dtypes import parse_dtype
    from mergekit_sdxl.lora.resize import ResizeOptions, merge_loras
    from mergekit_sdxl.lora.svd import RankRule, SolverOptions

    inputs = [_split(text) for text in adapters]
    options = ResizeOptions(RankRule.parse(dynamic, rank), RankRule.parse(conv_dynamic, conv_rank),
                            SolverOptions(exact=exact, seed=seed), parse_dtype(save_dtype), arch=arch)
    rows = merge_loras(inputs, output, options, overwrite=overwrite)
    kept = [r for r in rows if r.kept]
    mean = sum(r.energy for r in kept) / len(kept) if kept else 1.0
    console.info(f"wrote {output}: {len(kept)} layers from {len(inputs)} adapters, mean retained energy {mean:.4f}")


def _split(text: str) -> tuple[str, float]:
    path, sep, weight = text.rpartition(":")
    if sep and path and Path(path).exists():
        try:
            return path, float(weight)
        except ValueError:
            pass
    if not Path(text).exists():
        raise UsageError(f"{text}: no such adapter file")
    return text, 1.0
