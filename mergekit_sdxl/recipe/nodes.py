"""The plan's value types: frozen, hashable per-key expression nodes.

A plan maps every output key to one node tree. Because nodes are frozen dataclasses, equal
sub-expressions compare and hash equal, so the engine computes a shared term once per key and
frees it after its last use. Nodes hold no tensors, paths or devices: only aliases, keys and numbers.

A recipe's steps form a DAG: 40 steps that each use the previous one twice make a node whose tree has 2**40
paths. So every walk over nodes must visit each distinct node once: a node's hash is computed once and cached
(dataclass hashing would re-hash whole subtrees), equality short-cuts on identity and hash, and the walks below
(and in the engine) keep a memo or a visited set.
"""

from __future__ import annotations

from dataclasses import Field, dataclass, field, fields
from typing import Any, ClassVar, Union

Scalar = Union[float, int, str, bool]


class _Node:
    """Cached hash and identity/hash short-cut equality for the frozen node dataclasses (module docstring)."""

    __dataclass_fields__: ClassVar[dict[str, Field[Any]]]  # declared for the type checker: every node is a dataclass

    def __hash__(self) -> int:
        cached = self.__dict__.get("_hash")
        if cached is None:
            cached = hash((type(self).__name__, *(getattr(self, f.name) for f in fields(self))))
            object.__setattr__(self, "_hash", cached)
        return cached

    def __eq__(self, other: Any) -> bool:
        if self is other:
            return True
        if type(other) is not type(self) or hash(self) != hash(other):
            return False
        return all(getattr(self, f.name) == getattr(other, f.name) for f in fields(self))


@dataclass(frozen=True, eq=False)
class Load(_Node):
    """The tensor `key` of input model `alias`, as stored (the engine casts to the compute dtype)."""

    alias: str
    key: str


@dataclass(frozen=True, eq=False)
class Linear(_Node):
    """sum_i coeff_i * term_i, computed in the compute dtype (fused, chunked, in place by the engine)."""

    terms: tuple[tuple[Node, float], ...]


@dataclass(frozen=True, eq=False)
class Call(_Node):
    """A registered merge method applied to input nodes with scalar parameters (already resolved for this key).

    `params` is a sorted tuple of (name, value) so the node stays hashable. Methods that need randomness
    (DARE) get an integer `seed` parameter derived from the recipe seed and the key, so results do not
    depend on device, thread or order.
    """

    method: str
    inputs: tuple[Node, ...]
    params: tuple[tuple[str, Scalar], ...] = ()


@dataclass(frozen=True, eq=False)
class Adapter(_Node):
    """A LoRA/LyCORIS delta for `key` from adapter file `alias`, times `strength` (lora layer builds the tensor)."""

    alias: str
    key: str
    strength: float
    extra: tuple[tuple[str, Scalar], ...] = field(default=())


Node = Union[Load, Linear, Call, Adapter]


def loads_of(node: Node) -> list[Load]:
    """Every Load leaf under `node`, depth first, duplicates removed in first-seen order."""
    seen: dict[Load, None] = {}
    visited: set[int] = set()
    stack = [node]
    while stack:
        current = stack.pop()
        if id(current) in visited:
            continue
        visited.add(id(current))
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
