"""`mergekit-sdxl resize-lora IN -o OUT --rank R [--dynamic MODE:V]`."""

from __future__ import annotations

from pathlib import Path

import click

from mergekit_sdxl.arch.registry import ARCHS
from mergekit_sdxl.cli import console
from mergekit_sdxl.cli.options import out_option
from mergekit_sdxl.dtypes import WEIGHTS, choices


@click.command("resize-lora")
@click.argument("adapter", type=click.Path(exists=True, path_type=Path))
@out_option("output", old_spelling=True, required=True, type=click.Path(path_type=Path))
@click.option("--rank", default=32, show_default=True, help="New rank (max rank in dynamic modes).")
@click.option("--conv-rank", default=16, show_default=True, help="New rank of 3x3 conv layers.")
@click.option("--dynamic", metavar="MODE:VALUE", help="fro:τ, ratio:ρ, threshold:t or cumulative:q (see extract-lora).")
@click.option("--conv-dynamic", metavar="MODE:VALUE", help="Like --dynamic, for 3x3 conv layers.")
@click.option("--exact", is_flag=True, help="Exact SVD per layer.")
@click.option("--seed", default=0, show_default=True)
@click.option("--save-dtype", type=click.Choice(choices(WEIGHTS)), default="fp16", show_default=True)
@click.option("--arch", type=click.Choice(ARCHS), help="When the file does not say.")
@click.option("--overwrite", is_flag=True)
def command(adapter: Path, output: Path, rank: int, conv_rank: int, dynamic: str | None, conv_dynamic: str | None,
            exact: bool, seed: int, save_dtype: str, arch: str | None, overwrite: bool) -> None:
    """Re-factor an adapter (any readable format) to a new rank or a dynamic rank; writes a kohya LoRA/LoCon.

    Exit code 4 when ADAPTER is not a readable adapter, e.g. a checkpoint (the message says so).
    """
    from mergekit_sdxl.dtypes import parse_dtype
    from mergekit_sdxl.lora.resize import ResizeOptions, resize_lora
    from mergekit_sdxl.lora.svd import RankRule, SolverOptions

    options = ResizeOptions(RankRule.parse(dynamic, rank), RankRule.parse(conv_dynamic, conv_rank),
                            SolverOptions(exact=exact, seed=seed), parse_dtype(save_dtype), arch=arch)
    rows = resize_lora(adapter, output, options, overwrite=overwrite)
    _summary(output, rows)


def _summary(output: Path, rows: list) -> None:
    kept = [r for r in rows if r.kept]
    for row in kept:
        console.verbose(f"{row.name}: rank {row.rank} energy {row.energy:.4f}")
    mean = sum(r.energy for r in kept) / len(kept) if kept else 1.0
    worst = min((r.energy for r in kept), default=1.0)
    console.info(f"wrote {output}: {len(kept)} layers, mean retained energy {mean:.4f} (min {worst:.4f})")
