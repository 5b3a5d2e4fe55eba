"""Scorers: `--scorer NAME[:weight]`, several combine as a weighted sum (higher is better).

Built in: `aesthetic` (CLIP image embedding -> LAION-style head), `clip` (prompt-image similarity), `reference`
(similarity to reference images: CLIP embeddings when a CLIP is given, else SSIM), `manual` (a person rates the
images on a local page) and `python:module:function` for one's own: `function(images, context) -> float`, where
`images` is a list of `ScoredImage` and `context` a dict (trial number, parameters, options).

Automatic scorers run where the trial renders (a Ray worker: the GPU that rendered the images); `manual` runs in
the process that drives the study, because that is where the person is.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from mergekit_sdxl.errors import UsageError

BUILTIN = ("aesthetic", "clip", "reference", "manual")
DRIVER_SIDE = ("manual",)


@dataclass(frozen=True)
class ScorerSpec:
    """A scorer as the user named it, its weight, and the options it needs (paths of weights, references...)."""

    name: str
    weight: float = 1.0
    options: Mapping[str, Any] = field(default_factory=dict)

    @property
    def driver_side(self) -> bool:
        return self.name in DRIVER_SIDE

    @property
    def label(self) -> str:
        return self.name.split(":")[-1] if self.name.startswith("python:") else self.name


@dataclass(frozen=True)
class ScoredImage:
    """One rendered image of a trial with its place in the payload."""

    index: int
    prompt: str
    seed: int
    image: Any  # PIL.Image


class Scorer(Protocol):
    """Scores a trial's images (higher is better); called once per trial, or on the first images for pruning."""

    def __call__(self, images: Sequence[ScoredImage], context: Mapping[str, Any]) -> float: ...


def parse_scorer(text: str, options: Mapping[str, Any] | None = None) -> ScorerSpec:
    """`aesthetic`, `clip:0.5`, `python:my.module:fn`, `python:my.module:fn:2` -> ScorerSpec."""
    name, weight = text.strip(), 1.0
    head, sep, tail = name.rpartition(":")
    if sep and _is_number(tail):
        name, weight = head, float(tail)
    if name.startswith("python:"):
        target = name.removeprefix("python:")
        module, _, function = target.rpartition(":")
        if not module or not function:
            raise UsageError(f"--scorer {text!r}: write python:MODULE:FUNCTION (e.g. python:my_scores:sharpness)")
    elif name not in BUILTIN:
        raise UsageError(f"--scorer {text!r}: unknown scorer {name!r}; choose {', '.join(BUILTIN)} or "
                         "python:MODULE:FUNCTION (append :WEIGHT to weigh it)")
    if not math.isfinite(weight) or weight == 0:
        raise UsageError(f"--scorer {text!r}: the weight must be a finite, non-zero number")
    return ScorerSpec(name, weight, dict(options or {}))


def build_scorer(spec: ScorerSpec, device: str = "cpu") -> Scorer:
    """The scorer for `spec`, its weights loaded (call once per worker).

    Raises:
        UsageError: missing options or files (the message names the files to provide).
        CheckpointError: a weights file that is unreadable or would need unpickling.
    """
    if spec.name.startswith("python:"):
        return _python_scorer(spec.name.removeprefix("python:"))
    if spec.name == "reference":
        from mergekit_sdxl.search.reference import ReferenceScorer

        return ReferenceScorer(spec.options, device)
    if spec.name in ("aesthetic", "clip"):
        from mergekit_sdxl.search.clipscore import AestheticScorer, ClipScorer

        return (AestheticScorer if spec.name == "aesthetic" else ClipScorer)(spec.options, device)
    raise UsageError(f"scorer {spec.name!r} runs in the driving process, not in a worker")


def combine(specs: Sequence[ScorerSpec], scores: Mapping[str, float]) -> float:
    """The weighted sum of the scores of `specs` (each by its label)."""
    return float(sum(spec.weight * scores[spec.label] for spec in specs))


def _python_scorer(target: str) -> Scorer:
    module_name, _, function = target.rpartition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UsageError(f"--scorer python:{target}: cannot import {module_name!r} ({exc}); put it on PYTHONPATH "
                         "or in the current folder") from exc
    fn = getattr(module, function, None)
    if not callable(fn):
        raise UsageError(f"--scorer python:{target}: {module_name} has no function {function!r}")
    return _checked(fn, f"python:{target}")


def _checked(fn: Callable[..., Any], name: str) -> Scorer:
    def score(images: Sequence[ScoredImage], context: Mapping[str, Any]) -> float:
        value = fn(images, context)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise UsageError(f"scorer {name} returned {value!r}; a scorer returns a finite number")
        return float(value)
    return score


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def existing_file(options: Mapping[str, Any], key: str, scorer: str, what: str) -> Path:
    """`options[key]` as a path that exists; UsageError naming the option and what to provide otherwise."""
    value = options.get(key)
    if not value:
        raise UsageError(f"scorer {scorer}: needs {what}")
    path = Path(value).expanduser()
    if not path.exists():
        raise UsageError(f"scorer {scorer}: {path} does not exist; provide {what}")
    return path
