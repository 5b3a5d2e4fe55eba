"""One trial evaluator: inputs opened once, then per trial merge in memory -> render the payload -> score.

A worker keeps the recipe's input files open (headers parsed once, tensors paged in from the OS cache), one
`ModelSlot` whose modules are refilled in place, and its scorers' weights. A trial runs in two calls so the study
can prune after the first images: `begin` merges, loads and renders the first batch and returns its score;
`finish` renders the rest and scores everything. Images come back as PNG bytes (with A1111 `parameters`), so the
process that records the study writes them, wherever the worker runs.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import socket
import time
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

from mergekit_sdxl.arch.registry import arch_spec
from mergekit_sdxl.errors import UsageError
from mergekit_sdxl.search.scoring import ScoredImage, ScorerSpec, build_scorer, combine
from mergekit_sdxl.search.space import Dimension, Payload, SearchSpace, apply_values


@dataclass(frozen=True)
class WorkerSetup:
    """Everything a worker needs (plain data: it is sent to Ray workers)."""

    recipe_path: str
    model_paths: Mapping[str, str]
    space: SearchSpace
    scorers: tuple[ScorerSpec, ...]
    device: str = "auto"
    dtype: str = "auto"
    threads: int | None = None


@dataclass
class TrialImage:
    """A rendered image: its payload place and PNG bytes."""

    index: int
    prompt: str
    seed: int
    png: bytes


@dataclass
class TrialOutput:
    """What a trial (or its first part) produced."""

    images: list[TrialImage] = field(default_factory=list)
    scores: dict[str, float] = field(default_factory=dict)
    value: float | None = None
    timings: dict[str, float] = field(default_factory=dict)
    worker: str = ""


class TrialWorker:
    """Evaluates trials for one study; construct once per process (or Ray actor)."""

    def __init__(self, setup: WorkerSetup) -> None:
        import torch

        from mergekit_sdxl.engine.run import headers_of, job_arch, open_inputs
        from mergekit_sdxl.recipe import load_recipe
        from mergekit_sdxl.sampler.slots import make_slot

        start = time.perf_counter()
        self._threads = torch.get_num_threads()  # restored by close(): the process may do other work after
        if setup.threads:
            torch.set_num_threads(setup.threads)
        self.setup = setup
        self.recipe = load_recipe(setup.recipe_path, dict(setup.model_paths))
        self._stack = ExitStack()
        self.readers = open_inputs(self.recipe, self._stack)
        self.headers = headers_of(self.recipe, self.readers)
        self.arch = job_arch(self.recipe, self.headers)
        self.dims: list[Dimension] = setup.space.dimensions(self.recipe, self.arch)
        self.slot = make_slot(setup.device, setup.dtype)
        self.params = _gen_params(setup.space.payload, self.arch)
        self.scorers = {s.label: build_scorer(s, str(self.slot.device)) for s in setup.scorers if not s.driver_side}
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self.setup_seconds = time.perf_counter() - start
        self._state: dict[str, Any] | None = None

    def close(self) -> None:
        """Close the input files and give the process its thread count back."""
        import torch

        self._state = None
        self._stack.close()
        torch.set_num_threads(self._threads)

    def begin(self, number: int, values: Mapping[str, Any], prune: bool) -> TrialOutput:
        """Merge the trial's variant, load it and render the first batch; with `prune`, score those images."""
        from mergekit_sdxl.sampler.models import WeightSource
        from mergekit_sdxl.sampler.pipeline import Renderer

        timings: dict[str, float] = {}
        start = time.perf_counter()
        variant = apply_values(self.recipe, self.dims, values, self.arch)
        tensors = self._merge(variant)
        timings["merge"] = time.perf_counter() - start
        start = time.perf_counter()
        renderer = Renderer(self.slot.load(WeightSource.from_tensors(f"trial {number}", tensors)))
        del tensors
        timings["load"] = time.perf_counter() - start
        batches = _batches(self.setup.space.payload)
        self._state = {"number": number, "values": dict(values), "renderer": renderer, "batches": batches,
                       "images": [], "timings": timings}
        first = self._render(batches[0])
        output = TrialOutput(images=first, timings=dict(timings), worker=self.name)
        if prune and len(batches) > 1 and self.scorers:
            output.scores = self._score(self._state["images"])
            output.value = combine([s for s in self.setup.scorers if not s.driver_side], output.scores)
        return output

    def finish(self) -> TrialOutput:
        """Render the rest of the payload and score every image with the worker's scorers."""
        if self._state is None:
            raise RuntimeError("finish() without begin()")
        state, self._state = self._state, None
        rest = [img for batch in state["batches"][1:] for img in self._render(batch, state)]
        images = state["images"]
        scores = self._score(images, state)
        return TrialOutput(images=rest, scores=scores, timings=state["timings"], worker=self.name)

    def abandon(self) -> None:
        """Drop a begun trial (pruned)."""
        self._state = None

    # ----------------------------------------------------------------------------------------------- steps
    def _merge(self, variant: Any) -> dict[str, Any]:
        from mergekit_sdxl.lora.steps import merge_recipe_in_memory

        _, tensors = merge_recipe_in_memory(variant, str(self.slot.device), readers=self.readers,
                                            headers=self.headers)
        return tensors

    def _render(self, batch: list[tuple[int, str, int]], state: dict[str, Any] | None = None) -> list[TrialImage]:
        from mergekit_sdxl.sampler.pipeline import to_pil

        state = state or self._state
        assert state is not None
        start = time.perf_counter()
        params = dataclasses.replace(self.params, prompt=batch[0][1])
        renderer = state["renderer"]
        pictures = [to_pil(x) for x in renderer.decode(renderer.sample(params, [s for _, _, s in batch]))]
        state["timings"]["render"] = state["timings"].get("render", 0.0) + time.perf_counter() - start
        out = []
        for (index, prompt, seed), picture in zip(batch, pictures):
            state["images"].append(ScoredImage(index, prompt, seed, picture))
            out.append(TrialImage(index, prompt, seed, self._png(picture, params, seed, state)))
        return out

    def _score(self, images: Sequence[ScoredImage], state: dict[str, Any] | None = None) -> dict[str, float]:
        state = state or self._state
        assert state is not None
        start = time.perf_counter()
        context = {"trial": state["number"], "params": state["values"], "arch": self.arch,
                   "payload_images": len(self.setup.space.payload.images)}
        scores = {label: scorer(images, context) for label, scorer in self.scorers.items()}
        state["timings"]["score"] = state["timings"].get("score", 0.0) + time.perf_counter() - start
        return scores

    def _png(self, picture: Any, params: Any, seed: int, state: dict[str, Any]) -> bytes:
        from mergekit_sdxl.sampler.pngmeta import parameters_text, png_info

        record = json.dumps({"recipe": os.path.basename(self.setup.recipe_path), "trial": state["number"],
                             "params": state["values"]}, sort_keys=True)
        text = parameters_text(params.prompt, params.negative, params.steps, params.sampler, params.schedule,
                               params.cfg, seed, params.width, params.height, None,
                               f"trial {state['number']}", params.clip_skip, record, rng=params.rng)
        buffer = io.BytesIO()
        picture.save(buffer, format="PNG", pnginfo=png_info(text, record))
        return buffer.getvalue()


def _gen_params(payload: Payload, arch: str) -> Any:
    from mergekit_sdxl.sampler.pipeline import GenParams
    width, height = (payload.width, payload.height) if payload.width else arch_spec(arch).sampler.size
    params = GenParams(payload.prompts[0], payload.negative, payload.steps, payload.cfg, payload.sampler,
                       payload.schedule, width, height, payload.clip_skip, payload.rng)
    try:
        params.check()
    except ValueError as exc:
        raise UsageError(f"payload: {exc}") from exc
    return params


def _batches(payload: Payload) -> list[list[tuple[int, str, int]]]:
    """The payload's images in render batches: one prompt per batch, at most `batch_size` seeds."""
    images, per_prompt, size = payload.images, len(payload.seeds), payload.batch_size
    return [images[p + i:p + min(i + size, per_prompt)] for p in range(0, len(images), per_prompt)
            for i in range(0, per_prompt, size)]
