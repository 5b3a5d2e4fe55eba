"""`mergekit-sdxl bake CKPT LORA... -o OUT`: add adapters to a checkpoint, streamed key by key."""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import click

from mergekit_sdxl.cli import console
from mergekit_sdxl.cli.options import out_option
from mergekit_sdxl.dtypes import WEIGHTS, choices
from mergekit_sdxl.errors import UsageError

_T = TypeVar("_T")
_D = TypeVar("_D")


@click.command("bake")
@click.argument("checkpoint", type=click.Path(exists=True, path_type=Path))
@click.argument("loras", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@out_option("output", old_spelling=True, required=True, type=click.Path(path_type=Path),
              help="Checkpoint to write.")
@click.option("--strength", "strengths", multiple=True, type=float,
              help="Strength per adapter, in order (one value applies to all; default 1).")
@click.option("--te-strength", "te_strengths", multiple=True, type=float,
              help="Text-encoder strength per adapter (default: the adapter's strength).")
@click.option("--blocks", "blocks", multiple=True, metavar="VECTOR",
              help="Block weights per adapter: a LoRA Block Weight vector as the lora-block-weight extension reads it "
                   "(SDXL 12 values BASE,IN04,IN05,IN07,IN08,M00,OUT00..OUT05; SD1 17; 'lbw=' + 20 or 26 values) or "
                   "one of its presets (ALL, INALL, MIDD, OUTALL, ...), or an MBW vector (SDXL 20 values, SD1 26, an "
                   "MBW preset, or a named form like 'IN04:1,default:0'). BASE applies to the text encoders.")
@click.option("--dtype", type=click.Choice(choices(WEIGHTS)), help="Store changed and float tensors in "
              "this dtype (default: keep each tensor's dtype).")
@click.option("--ignore-unknown", is_flag=True, help="Skip adapter keys that match no module (listed as a warning).")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists (never an input).")
def command(checkpoint: Path, loras: tuple[Path, ...], output: Path, strengths: tuple[float, ...],
            te_strengths: tuple[float, ...], blocks: tuple[str, ...], dtype: str | None, ignore_unknown: bool,
            device: str, overwrite: bool) -> None:
    """Bake LoRA/LyCORIS adapters (LoRA, LoCon, LoHa, LoKr, full, norms, DoRA; kohya or peft names) into a
    checkpoint: W += strength · ΔW for every adapter, computed in fp32."""
    from mergekit_sdxl import api

    n = len(loras)
    specs = [api.AdapterSpec(str(path), _pick(strengths, i, n, "--strength", 1.0),
                         _pick(te_strengths, i, n, "--te-strength", None), _pick(blocks, i, n, "--blocks", None))
             for i, path in enumerate(loras)]
    result = api.bake(checkpoint, specs, output, overwrite=overwrite, ignore_unknown=ignore_unknown, dtype=dtype,
                      device=device)
    if result.unconsumed:
        console.console.print(f"warning: {result.unconsumed} adapter keys matched nothing and were ignored")
    console.info(f"wrote {output}: {result.changed_keys} of {result.total_keys} tensors changed by {n} adapter(s)")


def _pick(values: tuple[_T, ...], i: int, n: int, option: str, default: _D) -> _T | _D:
    if not values:
        return default
    if len(values) == 1:
        return values[0]
    if len(values) != n:
        raise UsageError(f"{option} given {len(values)} times for {n} adapters; give it once or once per adapter")
    return values[i]
