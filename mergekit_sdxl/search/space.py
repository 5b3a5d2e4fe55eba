"""Search spaces: which recipe parameters a study varies, over what ranges, and what each trial renders.

A space file (YAML)::

    params:                                   # recipe address -> range (see mergekit_sdxl.recipe.address)
      output.alpha[IN04]: [0, 1]              # low, high
      output.alpha[OUT00..OUT02]: {low: 0, high: 1, step: 0.05}   # one value for the whole group
      output.alpha: {low: 0, high: 1, each_block: true, mirror: true}  # a dimension per block, IN_k = OUT_(n-1-k)
      base.alpha: {choices: [GRAD_V, GRAD_A, FLAT_25]}            # whole vectors or presets, one is picked
      rev2.coef[2]: {low: 0.5, high: 1.5}
      lora.strength: {low: 0, high: 1.2}
    ties:                                     # the later addresses take the first one's value
      - [output.alpha[IN04], output.alpha[OUT04]]
    payload:                                  # what every trial renders and scores
      prompts: ["1girl, solo, upper body"]
      negative: ""
      seeds: [1, 2]
      size: 832x1216
      steps: 20
      cfg: 6
      sampler: euler_a
      schedule: normal
      rng: cpu                                # or gpu / nv, as A1111's RNG setting

Dimensions apply in the order written (a later one wins where two touch the same block). Everything here is
torch-free: a space is checked against a recipe (every address exists, every range fits) before any tensor is read.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergekit_sdxl.arch.blocks import block_names
from mergekit_sdxl.errors import RecipeError, UsageError
from mergekit_sdxl.recipe.address import BlockRange, ParamAddress, parse_address
from mergekit_sdxl.recipe.edit import set_value

_TOP = ("params", "ties", "payload")
_RANGE = ("low", "high", "step", "log", "choices", "each_block", "mirror")
_PAYLOAD = ("prompts", "negative", "seeds", "size", "steps", "cfg", "sampler", "schedule", "clip_skip",
            "batch_size", "rng")
MAX_DIMENSIONS = 256
MAX_IMAGES = 256


@dataclass(frozen=True)
class Dimension:
    """One searched value: an Optuna parameter `name` and the recipe addresses it is written to.

    Either a float range (`low`, `high`, optional `step` or `log`) or `choices` (numbers, presets, vectors).
    """

    name: str
    targets: tuple[ParamAddress, ...]
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False
    choices: tuple[Any, ...] | None = None

    def describe(self) -> dict[str, Any]:
        """JSON-able description (recorded in the study, compared on resume)."""
        return {"name": self.name, "targets": [str(t) for t in self.targets], "low": self.low, "high": self.high,
                "step": self.step, "log": self.log,
                "choices": None if self.choices is None else list(self.choices)}


@dataclass(frozen=True)
class Payload:
    """What every trial renders: each prompt with each seed (prompt-major), and the generation settings."""

    prompts: tuple[str, ...]
    seeds: tuple[int, ...] = (1,)
    negative: str = ""
    width: int = 0  # 0: the architecture's default size
    height: int = 0
    steps: int = 28
    cfg: float = 6.0
    sampler: str = "euler_a"
    schedule: str = "normal"
    clip_skip: int = 1
    batch_size: int = 4
    rng: str = "cpu"  # the initial-noise generator: cpu, gpu or nv (as A1111's setting)

    @property
    def images(self) -> list[tuple[int, str, int]]:
        """(index, prompt, seed) of every image, in render order."""
        return [(i * len(self.seeds) + j, p, s) for i, p in enumerate(self.prompts) for j, s in enumerate(self.seeds)]


@dataclass(frozen=True)
class SearchSpace:
    """Parsed space file: raw dimension entries (bound to a recipe by `dimensions`), ties and payload."""

    entries: tuple[tuple[str, Mapping[str, Any]], ...]
    ties: tuple[tuple[ParamAddress, ...], ...]
    payload: Payload
    source: str = "<space>"
    text: str = field(default="", compare=False)

    def dimensions(self, recipe: Any, arch: str) -> list[Dimension]:
        """The Optuna dimensions for `recipe` (block lists expanded for `arch`), each checked to apply.

        Raises:
            RecipeError: an address the recipe lacks, a block the architecture lacks, a value that does not fit.
        """
        dims: list[Dimension] = []
        for text, spec in self.entries:
            dims += _expand(parse_address(text), spec, recipe, arch, f"{self.source}: params.{text}")
        dims = _tie(dims, self.ties, self.source)
        names = [d.name for d in dims]
        if len(set(names)) != len(names):
            twice = sorted({n for n in names if names.count(n) > 1})
            raise UsageError(f"{self.source}: {', '.join(twice)} searched twice; list each block once")
        if not dims or len(dims) > MAX_DIMENSIONS:
            raise UsageError(f"{self.source}: {len(dims)} dimensions; give 1 to {MAX_DIMENSIONS} under `params`")
        for dim in dims:
            for probe in _probes(dim):
                apply_values(recipe, [dim], {dim.name: probe}, arch)
        return dims


def load_space(path: str | Path) -> SearchSpace:
    """Read and check a space file (addresses parsed, ranges and payload validated; not yet bound to a recipe)."""
    from mergekit_sdxl.recipe.load import load_yaml

    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{file}: cannot read the search space: {exc}") from exc
    return parse_space(load_yaml(text, str(file)), str(file), text)


def parse_space(data: Any, source: str = "<space>", text: str = "") -> SearchSpace:
    """A SearchSpace from YAML data (see the module docstring)."""
    top = _mapping(data, source, _TOP)
    params = _mapping(top.get("params"), f"{source}: params", None)
    if not params:
        raise UsageError(f"{source}: `params` is empty; name at least one recipe parameter to search")
    entries = []
    for key, value in params.items():
        where = f"{source}: params.{key}"
        parse_address(str(key))  # spelling errors first, before the recipe is looked at
        entries.append((str(key), _range(value, where)))
    ties = tuple(_tie_group(group, f"{source}: ties[{i}]") for i, group in enumerate(top.get("ties") or []))
    return SearchSpace(tuple(entries), ties, parse_payload(top.get("payload"), f"{source}: payload"), source, text)


def parse_payload(data: Any, where: str) -> Payload:
    """The `payload` section; prompts are required, the rest defaults to the preview sampler's settings."""
    fields = _mapping(data, where, _PAYLOAD)
    prompts = fields.get("prompts")
    prompts = [prompts] if isinstance(prompts, str) else prompts
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise UsageError(f"{where}.prompts: give one prompt or a list of prompts")
    seeds = fields.get("seeds", [1])
    seeds = [seeds] if isinstance(seeds, int) else seeds
    if (not isinstance(seeds, list) or not seeds
            or not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 2**63 for s in seeds)):
        raise UsageError(f"{where}.seeds: give non-negative whole numbers, e.g. [1, 2, 3]")
    if len(prompts) * len(seeds) > MAX_IMAGES:
        raise UsageError(f"{where}: {len(prompts) * len(seeds)} images per trial; at most {MAX_IMAGES}")
    width, height = _size(fields.get("size"), f"{where}.size")
    payload = Payload(tuple(prompts), tuple(seeds), negative=_text(fields.get("negative", ""), f"{where}.negative"),
                      width=width, height=height, steps=_int(fields.get("steps", 28), f"{where}.steps", 1, 500),
                      cfg=_float(fields.get("cfg", 6.0), f"{where}.cfg"),
                      sampler=_text(fields.get("sampler", "euler_a"), f"{where}.sampler"),
                      schedule=_text(fields.get("schedule", "normal"), f"{where}.schedule"),
                      clip_skip=_int(fields.get("clip_skip", 1), f"{where}.clip_skip", 1, 12),
                      batch_size=_int(fields.get("batch_size", 4), f"{where}.batch_size", 1, 64),
                      rng=_text(fields.get("rng", "cpu"), f"{where}.rng"))
    _check_sampling(payload, where)
    return payload


def _check_sampling(payload: Payload, where: str) -> None:
    """Sampler, schedule and RNG names from the sampler's torch-free catalog (aliases accepted)."""
    from mergekit_sdxl.sampler.catalog import RNG_MODES, sampler_name, schedule_name

    for field_name, check in (("sampler", sampler_name), ("schedule", schedule_name)):
        try:
            check(getattr(payload, field_name))
        except UsageError as exc:
            raise UsageError(f"{where}.{field_name}: {exc}") from exc
    if payload.rng not in RNG_MODES:
        raise UsageError(f"{where}.rng: {payload.rng!r}; choose one of {', '.join(RNG_MODES)}")


def apply_values(recipe: Any, dims: Sequence[Dimension], values: Mapping[str, Any], arch: str) -> Any:
    """`recipe` with each dimension's value written at its addresses (the recipe given is not changed)."""
    for dim in dims:
        value = values[dim.name]
        for target in dim.targets:
            recipe = set_value(recipe, target, value, arch=arch)
    return recipe


def fingerprint(parts: Mapping[str, Any]) -> str:
    """A short stable hash of JSON-able settings (a study remembers the one it was made with)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------- helpers


def _expand(address: ParamAddress, spec: Mapping[str, Any], recipe: Any, arch: str, where: str) -> list[Dimension]:
    """One dimension, or with `each_block` one per block of the vector (paired IN/OUT with `mirror`)."""
    rest = {k: v for k, v in spec.items() if k not in ("each_block", "mirror")}
    if not spec.get("each_block"):
        if spec.get("mirror"):
            raise UsageError(f"{where}: `mirror` needs `each_block: true`")
        return [Dimension(str(address), (address,), **rest)]
    if address.blocks is not None or address.coef is not None:
        raise UsageError(f"{where}: `each_block` applies to a whole parameter (write {address.step}.{address.param})")
    if "choices" in rest:
        raise UsageError(f"{where}: `each_block` takes a range (low, high), not choices")
    names = block_names(arch, _convention(recipe, address))
    groups = _mirror_groups(names) if spec.get("mirror") else [[n] for n in names]
    dims = []
    for group in groups:
        targets = tuple(ParamAddress(address.step, address.param, BlockRange(b, b)) for b in group)
        dims.append(Dimension(str(targets[0]) if len(group) == 1 else f"{address.step}.{address.param}"
                              f"[{'+'.join(group)}]", targets, **rest))
    return dims


def _mirror_groups(names: Sequence[str]) -> list[list[str]]:
    """IN_k with OUT_(n-1-k) (the U-Net's mirrored blocks: IN00 with the last OUT); others alone."""
    ins = [n for n in names if n.startswith("IN")]
    outs = [n for n in names if n.startswith("OUT")]
    pairs = {i: o for i, o in zip(ins, reversed(outs))}
    return [[n] for n in names if not n.startswith(("IN", "OUT"))] + [[i, pairs[i]] for i in ins]


def _convention(recipe: Any, address: ParamAddress) -> str:
    step = recipe.steps.get(address.step)
    if step is None:
        raise RecipeError(f"{address}: the recipe has no step {address.step!r} (steps: {', '.join(recipe.steps)})")
    return getattr(step, "convention", recipe.convention)


def _tie(dims: list[Dimension], ties: Sequence[tuple[ParamAddress, ...]], source: str) -> list[Dimension]:
    """Fold each tie group's later addresses into the dimension of its first address."""
    by_name = {d.name: d for d in dims}
    for group in ties:
        lead = str(group[0])
        if lead not in by_name:
            raise UsageError(f"{source}: ties: {lead} is not under `params`; the first address of a tie group is the "
                             "searched one")
        for follower in group[1:]:
            if str(follower) in by_name:
                raise UsageError(f"{source}: ties: {follower} is also under `params`; a tied address takes "
                                 f"{lead}'s value and is not searched itself")
        dim = by_name[lead]
        by_name[lead] = Dimension(dim.name, dim.targets + tuple(group[1:]), dim.low, dim.high, dim.step, dim.log,
                                  dim.choices)
    return list(by_name.values())


def _probes(dim: Dimension) -> list[Any]:
    return list(dim.choices) if dim.choices is not None else [dim.low, dim.high]


def _range(value: Any, where: str) -> dict[str, Any]:
    if isinstance(value, list) and len(value) == 2:
        value = {"low": value[0], "high": value[1]}
    spec = _mapping(value, where, _RANGE)
    if "choices" in spec:
        choices = spec["choices"]
        if not isinstance(choices, list) or not choices or set(spec) - {"choices"}:
            raise UsageError(f"{where}: `choices` is a non-empty list and takes no low/high/step")
        return {"choices": tuple(_choice(c, where) for c in choices)}
    if "low" not in spec or "high" not in spec:
        raise UsageError(f"{where}: give [low, high], {{low: .., high: ..}} or {{choices: [...]}}")
    low, high = _float(spec["low"], f"{where}.low"), _float(spec["high"], f"{where}.high")
    step = None if spec.get("step") is None else _float(spec["step"], f"{where}.step")
    log = bool(spec.get("log", False))
    if not low < high:
        raise UsageError(f"{where}: low ({low:g}) must be below high ({high:g})")
    if step is not None and (step <= 0 or log):
        raise UsageError(f"{where}: step must be > 0 and cannot be combined with log")
    if log and low <= 0:
        raise UsageError(f"{where}: a log range needs low > 0")
    return {"low": low, "high": high, "step": step, "log": log,
            **{k: bool(spec[k]) for k in ("each_block", "mirror") if k in spec}}


def _choice(value: Any, where: str) -> Any:
    """A choice as Optuna stores it: a number, a string (preset, named form), or a vector as "v1,v2,..." text."""
    if isinstance(value, list):
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            raise UsageError(f"{where}: a vector choice is a list of numbers, got {value!r}")
        return ",".join(repr(float(v)) for v in value)
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise UsageError(f"{where}: a choice is a number, a preset name or a list of numbers, got {value!r}")
    return float(value) if isinstance(value, int) else value


def _tie_group(group: Any, where: str) -> tuple[ParamAddress, ...]:
    if not isinstance(group, list) or len(group) < 2 or not all(isinstance(a, str) for a in group):
        raise UsageError(f"{where}: a tie is a list of two or more addresses, e.g. [out.alpha[IN04], "
                         "out.alpha[OUT04]]")
    return tuple(parse_address(a) for a in group)


def _mapping(value: Any, where: str, allowed: Sequence[str] | None) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UsageError(f"{where}: expected a mapping, got {type(value).__name__}")
    if allowed is not None:
        unknown = [str(k) for k in value if k not in allowed]
        if unknown:
            raise UsageError(f"{where}: unknown field(s) {', '.join(unknown)} (allowed: {', '.join(allowed)})")
    return value


def _float(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UsageError(f"{where}: expected a finite number, got {value!r}")
    return float(value)


def _int(value: Any, where: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise UsageError(f"{where}: expected a whole number from {low} to {high}, got {value!r}")
    return value


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise UsageError(f"{where}: expected text, got {type(value).__name__}")
    return value


def _size(value: Any, where: str) -> tuple[int, int]:
    if value is None:
        return 0, 0
    from mergekit_sdxl.sampler.sizes import parse_size

    try:
        return parse_size(str(value))
    except UsageError as exc:
        raise UsageError(f"{where}: {exc}") from exc

