"""The plan's value types: frozen, hashable per-key expression nodes.

A plan maps every output key to one node tree. Because nodes are frozen dataclasses, equal
sub-expressions compare and hash equal, so the engine computes a shared term once per key and
frees it after its last use. Nodes hold no tensors, paths or devices: only aliases, keys and numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

Scalar = Union[float, int, str, bool]


@dataclass(frozen=True)
class Load:
    """The tensor `key` of input model `alias`, as stored (the engine casts to the compute dtype)."""

    alias: str
    key: str


@dataclass(frozen=True)
class Linear:
    """sum_i coeff_i * term_i, computed in the compute dtype (fused, chunked, in place by the engine)."""

    terms: tuple[tuple[Node, float], ...]


@dataclass(frozen=True)
class Call:
    """A registered merge method applied to input nodes with scalar parameters (already resolved for this key).

    `params` is a sorted tuple of (name, value) so the node stays hashable. Methods that need randomness
    (DARE) get an integer `seed` parameter derived from the recipe seed and the key, so results do not
    depend on device, thread or order.
    """

    method: str
    inputs: tuple[Node, ...]
    params: tuple[tuple[str, Scalar], ...] = ()


@dataclass(frozen=True)
class Adapter:
    """A LoRA/LyCORIS delta for `key` from adapter file `alias`, times `strength` (lora layer builds the tensor)."""

    alias: str
    key: str
    strength: float
    extra: tuple[tuple[str, Scalar], ...] = field(default=())


Node = Union[Load, Linear, Call, Adapter]


def loads_of(node: Node) -> list[Load]:
    """Every Load leaf under `node`, depth first, duplicates removed in first-seen order."""
    seen: dict[Load, None] = {}
    stack = [node]
    while stack:
        current = stack.pop()
        if isinstance(current, Load):
            seen.setdefault(current, None)
        elif isinstance(current, Linear):
            stack.extend(term for term, _ in reversed(current.terms))
        elif isinstance(current, Call):
            stack.extend(reversed(current.inputs))
    return list(seen)


@dataclass(frozen=True)
class KeyPlan:
    """How to produce one output tensor: its node, output dtype (safetensors code) and shape."""

    key: str
    node: Node
    dtype: str
    shape: tuple[int, ...]
