"""A validated recipe's value types: models, steps (formula, method, LoRA), output options. Frozen, no tensors.

`recipe/parser.py` builds them from YAML data (its docstring describes the recipe format); the planner reads them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mergekit_sdxl.arch.blocks import DEFAULT_CONVENTION
from mergekit_sdxl.recipe.formula import Formula, Kind

MISSING_POLICIES = ("error", "take_first")
SEED_PARAM = "seed"  # filled per key by the planner; a step may set it to change that step's base seed


@dataclass(frozen=True)
class ModelRef:
    """An input model: its alias, path (resolved; None for a model named only by hash until the model index
    resolves it), optional pinned sha256, and optional AutoV2 / AutoV3 locators (lowercase hex prefixes).

    The sha256 pin is part of the recipe (recorded, and checked once the merge has hashed the file); AutoV2 and
    AutoV3 only say how to find the file (checked when it is resolved, not recorded)."""

    alias: str
    path: str | None
    sha256: str | None = None
    autov2: str | None = None
    autov3: str | None = None

    @property
    def hashes(self) -> dict[str, str]:
        """The hashes given for this model: {"sha256"|"autov2"|"autov3": hex}."""
        found = {"sha256": self.sha256, "autov2": self.autov2, "autov3": self.autov3}
        return {kind: value for kind, value in found.items() if value}


@dataclass(frozen=True)
class Param:
    """One method parameter: a constant, or an MBW vector (raw, parsed per architecture), plus regex overrides."""

    name: str
    where: str
    value: Any = None  # the constant (number, bool, string) when not block-weighted
    blocks: Any = None  # the raw MBW spec (list, string, preset, named mapping); None for a constant
    overrides: tuple[tuple[str, float], ...] = ()

    @property
    def block_weighted(self) -> bool:
        return self.blocks is not None


@dataclass(frozen=True)
class FormulaStep:
    """A step computed by a formula; `kind` is "weight" or "delta"."""

    name: str
    formula: Formula

    @property
    def kind(self) -> Kind:
        return self.formula.kind

    @property
    def inputs(self) -> tuple[str, ...]:
        return self.formula.names


@dataclass(frozen=True)
class MethodStep:
    """A step computed by a registered merge method on named inputs (fixed ones first, then variadic ones)."""

    name: str
    method: str
    inputs: tuple[str, ...]
    params: tuple[Param, ...]
    convention: str
    kind: Kind = "weight"

    @property
    def block_weighted(self) -> bool:
        return any(p.block_weighted for p in self.params)


@dataclass(frozen=True)
class AdapterRef:
    """One LoRA/LyCORIS file applied by a LoRA step: path (resolved), strengths and optional block weights."""

    path: str
    strength: float = 1.0
    te_strength: float | None = None
    blocks: Any = None  # raw MBW spec (validated against the architecture by the planner)


@dataclass(frozen=True)
class LoraStep:
    """A step adding adapters' deltas to a weight: `model` + sum of strength * ΔW (a weight)."""

    name: str
    model: str
    adapters: tuple[AdapterRef, ...]
    convention: str
    kind: Kind = "weight"

    @property
    def inputs(self) -> tuple[str, ...]:
        return (self.model,)


Step = FormulaStep | MethodStep | LoraStep


@dataclass(frozen=True)
class OutputSpec:
    """What to write and how: dtype codes are safetensors codes ("F16", "F8_E4M3", ...)."""

    path: str | None = None
    dtype: str = "F16"
    fp8_scaled: bool = False
    vae: str | None = None
    prune_ema: bool = False
    drop: tuple[str, ...] = ()
    missing_keys: str = "error"
    compute_dtype: str = "F32"
    seed: int = 0
    metadata: tuple[tuple[str, str], ...] = ()
    base_dir: str = "."  # the recipe's folder: `path` is relative to it (recipe/parse_output.py: output_target)


@dataclass(frozen=True)
class Recipe:
    """A validated recipe. `steps` are in dependency order; `output_step` names the step that is written."""

    source: str
    models: dict[str, ModelRef]
    steps: dict[str, Step]
    output_step: str
    output: OutputSpec
    convention: str = DEFAULT_CONVENTION
    arch: str | None = None
    name: str | None = None
    description: str | None = None
    unused: tuple[str, ...] = field(default=())

    def kind_of(self, name: str) -> Kind:
        """"weight" for models and weight steps, "delta" for delta steps."""
        step = self.steps.get(name)
        return "weight" if step is None else step.kind
