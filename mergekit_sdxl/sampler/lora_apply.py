"""Adapters added to the loaded model's weights in memory, through the bake code's `AdapterSet`, and taken off again.

Each changed weight is computed as the bake computes it (fp32 sum of strength x delta, DoRA against the original
weight) and written into the loaded parameter in its dtype; the original tensor is kept so `restore` puts it back
bit for bit.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch

from mergekit_sdxl.io.keyconvert import to_diffusers_tensor, to_ldm_tensor

if TYPE_CHECKING:
    from mergekit_sdxl.arch.keymap import KeyMapping
    from mergekit_sdxl.lora.bake import AdapterSet, AdapterSpec
    from mergekit_sdxl.sampler.models import ModelSlot


class AppliedAdapters:
    """Adapters `specs` applied to the model loaded in `slot`; `restore()` undoes them."""

    def __init__(self, slot: ModelSlot, specs: Sequence[AdapterSpec]) -> None:
        from mergekit_sdxl.lora.bake import AdapterSet

        self.specs = tuple(specs)
        self.unconsumed = 0
        self._saved: list[tuple[torch.Tensor, torch.Tensor]] = []
        if not self.specs:
            return
        shapes, by_ldm, targets = slot.ldm_targets()
        assert slot.model is not None  # ldm_targets raised otherwise
        with AdapterSet(self.specs, slot.model.arch, shapes, ignore_unknown=True) as adapters:
            self.unconsumed = len(adapters.unconsumed)
            try:
                for key in adapters.keys():
                    self._apply(adapters, key, by_ldm[key], targets)
            except BaseException:
                self.restore()
                raise

    def _apply(self, adapters: AdapterSet, key: str, mappings: tuple[KeyMapping, ...],
               targets: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        params = [targets[m.component][m.diffusers] for m in mappings]
        weight = None
        if adapters.needs_weight(key):
            weight = to_ldm_tensor(mappings, {m.diffusers: p.detach() for m, p in zip(mappings, params)})
        delta = adapters.delta(key, weight=weight, device=params[0].device)
        if delta is None:  # no adapter changes this key after all
            return
        for m, param in zip(mappings, params):
            self._saved.append((param, param.detach().clone()))
            change = to_diffusers_tensor(m.op, delta, key).reshape(param.shape)
            param.data.copy_(param.detach().float() + change)

    def restore(self) -> None:
        """Put every changed weight back as it was."""
        for param, original in reversed(self._saved):
            param.data.copy_(original)
        self._saved.clear()
