"""The `--dry-run` report of a plan: inputs, steps, output size and dtype, keys per kind, warnings."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from mergekit_sdxl.arch.scaled_fp8 import REST_DTYPE, SCALE_DTYPE, SCALED_DTYPE, is_scalable
from mergekit_sdxl.arch.tables import ARCH_NAMES, numel
from mergekit_sdxl.dtypes import DTYPES, name_of
from mergekit_sdxl.recipe.nodes import Call, Linear, Load, Node
from mergekit_sdxl.recipe.planner import Plan


def describe_plan(plan: Plan, target: Path | None = None) -> list[str]:
    """Human lines for `--dry-run`: inputs, steps, output size and dtype, keys per kind, warnings.

    `target` is the file the run would write, as the caller resolved it (--out, else the recipe's output.path
    relative to the recipe); None when there is none. The recipe's own `output.path` text is never shown: with
    --out it is not where the output goes.
    """
    out = plan.output
    lines = [f"architecture: {ARCH_NAMES[plan.arch]}"]
    lines += [f"input {alias}: {path}" + (f" (sha256 {plan.sha256[alias][:12]}... pinned)"
                                          if alias in plan.sha256 else "") for alias, path in plan.inputs.items()]
    lines += plan.steps
    size = plan_size(plan)
    scaled = f" (scaled: UNet Linear weights; the rest {name_of(REST_DTYPE)})"
    dtype = name_of(out.dtype) + (scaled if out.fp8_scaled else "")
    lines.append(f"output: {target or '(no path: give -o/--out or output.path)'}: {len(plan.keys)} tensors, {dtype}, "
                 f"{size:,} bytes of tensor data ({size / 1e9:.2f} GB)")
    kinds = Counter(_node_kind(kp.node) for kp in plan.keys)
    lines.append("keys: " + ", ".join(f"{count} {kind}" for kind, count in kinds.most_common()))
    lines += [f"warning: {warning}" for warning in plan.warnings]
    return lines


def plan_size(plan: Plan) -> int:
    """Bytes of tensor data the output will hold (scaled fp8 adds one float32 scale per scaled weight)."""
    total = 0
    for kp in plan.keys:
        total += numel(kp.shape) * DTYPES[kp.dtype].itemsize
        if plan.output.fp8_scaled and kp.dtype == SCALED_DTYPE and is_scalable(kp.key, tuple(kp.shape)):
            total += DTYPES[SCALE_DTYPE].itemsize
    return total


def _node_kind(node: Node) -> str:
    if isinstance(node, Load):
        return f"copied from {node.alias}"
    if isinstance(node, Linear):
        return "formula (linear)"
    if isinstance(node, Call):
        return f"merged by {node.method}"
    return type(node).__name__.lower()
