"""Builders shared by the search tests: a two-model block-weight recipe, a space, reference renders."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import yaml

PAYLOAD = {"prompts": ["1girl, solo"], "negative": "", "seeds": [1], "size": "64x64", "steps": 3}


def write_recipe(folder: Path, a: Path, b: Path, alpha: list[float] | None = None) -> Path:
    """weighted_sum(a, b) with a 20-value alpha vector (zeros by default)."""
    recipe = {"arch": "sdxl", "models": {"a": str(a), "b": str(b)},
              "steps": {"output": {"method": "weighted_sum", "a": "a", "b": "b", "alpha": alpha or [0.0] * 20}},
              "output": {"path": "merged.safetensors"}}
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def write_space(folder: Path, params: dict[str, Any], payload: dict[str, Any] | None = None, **extra: Any) -> Path:
    path = folder / "space.yaml"
    path.write_text(yaml.safe_dump({"params": params, "payload": payload or PAYLOAD, **extra}, sort_keys=False))
    return path


def render_references(recipe: Path, space: Path, values: dict[str, float], out: Path) -> Path:
    """The payload's images for `values`, rendered by a worker, saved as PNGs in payload order."""
    from PIL import Image

    from mergekit_sdxl.search.space import load_space
    from mergekit_sdxl.search.worker import TrialWorker, WorkerSetup

    worker = TrialWorker(WorkerSetup(str(recipe), {}, load_space(space), (), "cpu", "fp32", 1))
    try:
        first = worker.begin(0, values, False)
        rest = worker.finish()
    finally:
        worker.close()
    out.mkdir(parents=True, exist_ok=True)
    for image in first.images + rest.images:
        Image.open(io.BytesIO(image.png)).save(out / f"ref{image.index:03d}.png")
    return out
