"""Synthetic SDXL / SD1.5 checkpoints with the real key names, for tests, benchmarks and the demo."""

from mergekit_sdxl.arch.tiny import tiny_shape
from mergekit_sdxl.synth.checkpoints import (
    Delta,
    apply_delta,
    base_tensor,
    checkpoint_keys,
    iter_test_tensors,
    key_shape,
    plan_test_checkpoint,
    write_test_checkpoint,
)

__all__ = [
    "Delta",
    "apply_delta",
    "base_tensor",
    "checkpoint_keys",
    "iter_test_tensors",
    "key_shape",
    "plan_test_checkpoint",
    "tiny_shape",
    "write_test_checkpoint",
]
