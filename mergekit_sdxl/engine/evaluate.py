"""Evaluates one key's plan node into its output tensor.

Formulas (`Linear` nodes) are the hot path: they are computed in cache-sized chunks with two preallocated
buffers and exactly-rounded in-place ops (`copy_`, `mul_`, `add_`), never a fused multiply-add, so every element
is rounded the same way whatever the thread count or vector width: outputs are bit-reproducible.

With a reduced compute dtype (fp16/bf16: every operation rounded to it, which is how A1111 and SuperMerger
compute on fp16 inputs), method calls are evaluated as written, operation by operation: folding them into one
linear sum (`lower`) would round differently from the tool being reproduced.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch

from mergekit_sdxl.engine.memory import empty
from mergekit_sdxl.errors import MergekitError
from mergekit_sdxl.io.dtypes import fp8_has_non_finite, is_float, scale_key, to_storage, torch_dtype
from mergekit_sdxl.methods.registry import METHODS, call_method, check_finite
from mergekit_sdxl.recipe.nodes import Adapter, Call, KeyPlan, Linear, Load, Node

_FUSED_DTYPES = ("F16", "BF16", "F32", "F64")
REDUCED = (torch.float16, torch.bfloat16)  # compute dtypes whose arithmetic is reproduced operation by operation
CHUNK = 1 << 18  # elements per chunk: two fp32 buffers of 1 MiB each stay in L2

# (adapter node, tensor shape, the weight it is applied to or None) -> fp32 delta or None
AdapterFn = Callable[[Adapter, tuple[int, ...], "torch.Tensor | None"], "torch.Tensor | None"]


class KeyEvaluator:
    """Turns (KeyPlan, loaded input tensors) into the stored output tensor; keeps scratch buffers between keys."""

    def __init__(self, compute_dtype: torch.dtype = torch.float32, device: torch.device | None = None,
                 adapter_fn: AdapterFn | None = None, scaled: Callable[[KeyPlan], bool] | None = None) -> None:
        self.compute_dtype = compute_dtype
        self.scaled = scaled or (lambda kp: False)
        self.device = device or torch.device("cpu")
        self.adapter_fn = adapter_fn
        self.clamped = 0
        chunk = CHUNK if self.device.type == "cpu" else 0
        self._acc = torch.empty(chunk, dtype=compute_dtype, device=self.device)
        self._tmp = torch.empty(chunk, dtype=compute_dtype, device=self.device)

    def evaluate(self, kp: KeyPlan, loaded: Mapping[Load, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Output tensors for `kp`: {kp.key: tensor} plus a `<key>.scale_weight` entry for scaled fp8."""
        node = kp.node if self.compute_dtype in REDUCED else lower(kp.node)
        if isinstance(node, Load) and loaded[node].dtype == torch_dtype(kp.dtype) and not self.scaled(kp):
            _check_stored(loaded[node], kp.key)  # a copied NaN/inf is as wrong as a computed one
            return {kp.key: loaded[node]}  # pass-through: the stored bytes, untouched
        if not is_float(kp.dtype):
            return {kp.key: self._value(node, loaded, {}).to(torch_dtype(kp.dtype))}
        if kp.dtype in _FUSED_DTYPES and self._acc.numel() and not self.scaled(kp):
            load_terms = _load_terms(node)
            if load_terms is not None:
                return {kp.key: self._fused_linear(kp, load_terms, loaded)}
            if _elementwise(node):
                return {kp.key: self._chunked(kp, node, loaded)}
        value = self._value(node, loaded, {})
        _check_finite(value, kp.key)
        return self._store(kp, value)

    def _store(self, kp: KeyPlan, value: torch.Tensor) -> dict[str, torch.Tensor]:
        if value.device.type == "mps" and kp.dtype.startswith("F8"):
            value = value.cpu()  # MPS has no float8 types: the rounding to fp8 happens on the CPU, same rules
        stored = to_storage(value.reshape(kp.shape), kp.dtype, scaled=self.scaled(kp))
        self.clamped += stored.n_clamped
        out = {kp.key: stored.tensor.cpu()}
        if stored.scale is not None:
            out[scale_key(kp.key)] = stored.scale.reshape(()).float().cpu()
        if kp.dtype in ("F16", "BF16"):
            _check_finite(out[kp.key], kp.key, "after casting to the output dtype")
        return out

    def _value(self, node: Node, loaded: Mapping[Load, torch.Tensor], memo: dict[Node, torch.Tensor]) -> torch.Tensor:
        """Full-tensor evaluation in the compute dtype; shared sub-expressions are computed once (memo)."""
        if node in memo:
            return memo[node]
        if isinstance(node, Load):
            value = loaded[node].to(self.device, non_blocking=True)
            value = value if value.dtype == self.compute_dtype else value.to(self.compute_dtype)
        elif isinstance(node, Linear):
            value = self._linear_full(node, loaded, memo)
        elif isinstance(node, Call):
            inputs = [self._value(child, loaded, memo) for child in node.inputs]
            value = call_method(node.method, inputs, dict(node.params))
        elif isinstance(node, Adapter):
            value = self._adapter(node, None)
        else:  # pragma: no cover - the planner only builds the node types above
            raise TypeError(f"unknown plan node {node!r}")
        memo[node] = value
        return value

    def _linear_full(self, node: Linear, loaded: Mapping[Load, torch.Tensor],
                     memo: dict[Node, torch.Tensor]) -> torch.Tensor:
        adapters = [(term, coeff) for term, coeff in node.terms if isinstance(term, Adapter)]
        plain = Linear(tuple(t for t in node.terms if not isinstance(t[0], Adapter)))
        acc = self._plain_sum(plain, loaded, memo)
        for term, coeff in adapters:  # a LoRA step: weight + delta, the delta computed against that weight
            delta = self._adapter(term, acc)
            acc = acc + (delta if coeff == 1 else delta * coeff)
        return acc

    def _plain_sum(self, node: Linear, loaded: Mapping[Load, torch.Tensor],
                   memo: dict[Node, torch.Tensor]) -> torch.Tensor:
        acc: torch.Tensor | None = None
        for term, coeff in node.terms:
            scaled = self._value(term, loaded, memo) if coeff == 1 else self._value(term, loaded, memo) * coeff
            acc = scaled.clone() if acc is None else acc.add_(scaled)
        assert acc is not None
        return acc

    def _adapter(self, node: Adapter, base: torch.Tensor | None) -> torch.Tensor:
        if self.adapter_fn is None:
            raise MergekitError(f"key {node.key}: the plan uses LoRA step {node.alias!r} but no adapters were loaded")
        shape = tuple(base.shape) if base is not None else ()
        delta = self.adapter_fn(node, shape, base)
        if delta is None:
            raise MergekitError(f"key {node.key}: LoRA step {node.alias!r} has no delta for it")
        return delta.to(self.device, self.compute_dtype).reshape(shape or delta.shape)

    def _fused_linear(self, kp: KeyPlan, load_terms: list[tuple[Load, float]],
                      loaded: Mapping[Load, torch.Tensor]) -> torch.Tensor:
        """sum c_i x_i chunk by chunk into the output dtype; separate mul/add so rounding is reproducible."""
        terms = [(loaded[term].reshape(-1), coeff) for term, coeff in load_terms]
        out = empty(terms[0][0].numel(), torch_dtype(kp.dtype))
        for start in range(0, out.numel(), CHUNK):
            stop = min(out.numel(), start + CHUNK)
            acc, tmp = self._acc[: stop - start], self._tmp[: stop - start]
            first, coeff = terms[0]
            acc.copy_(first[start:stop])
            if coeff != 1:
                acc.mul_(coeff)
            for tensor, coeff in terms[1:]:
                _accumulate(acc, tmp, tensor[start:stop], coeff)
            out[start:stop].copy_(acc)
            _check_chunk(out[start:stop], kp.key)
        return out.reshape(kp.shape)


    def _chunked(self, kp: KeyPlan, node: Node, loaded: Mapping[Load, torch.Tensor]) -> torch.Tensor:
        """Evaluate an elementwise tree chunk by chunk straight into the output dtype (bit-identical to the
        whole-tensor evaluation, since every element goes through the same ops)."""
        flat = {leaf: tensor.reshape(-1) for leaf, tensor in loaded.items()}
        numel = next(iter(flat.values())).numel()
        out = empty(numel, torch_dtype(kp.dtype))
        for start in range(0, numel, CHUNK):
            stop = min(numel, start + CHUNK)
            sliced = {leaf: tensor[start:stop] for leaf, tensor in flat.items()}
            out[start:stop].copy_(self._value(node, sliced, {}))
            _check_chunk(out[start:stop], kp.key)
        return out.reshape(kp.shape)


def lower(node: Node, memo: dict[int, Node] | None = None) -> Node:
    """Rewrite linear method calls as `Linear` nodes and flatten nested Linears into one sum over distinct terms.

    `weighted_sum(rev2, anxl3)` over a formula then becomes a single 4-term sum that the fused chunked path
    computes in one pass with no full-size temporaries. Coefficients are combined in float64; the result differs
    from step-by-step evaluation only in fp32 rounding, far below the fp16/bf16 output precision. Each distinct
    node is lowered once (`memo`, by identity): a DAG of shared steps costs its size, not its number of paths.
    """
    memo = {} if memo is None else memo
    done = memo.get(id(node))
    if done is not None:
        return done
    if isinstance(node, Call):
        inputs = tuple(lower(child, memo) for child in node.inputs)
        coeffs = METHODS[node.method].coefficients(dict(node.params))
        if coeffs is None or len(coeffs) != len(inputs):
            out: Node = Call(node.method, inputs, node.params)
        else:
            out = _flatten(tuple(zip(inputs, coeffs)))
    elif isinstance(node, Linear):
        terms = tuple((lower(term, memo), coeff) for term, coeff in node.terms)
        if any(isinstance(term, Adapter) for term, _ in terms):
            out = Linear(terms)  # a LoRA step stays one unit: its delta is computed against its own weight
        else:
            out = _flatten(terms)
    else:
        out = node
    memo[id(node)] = out
    return out


def _load_terms(node: Node) -> list[tuple[Load, float]] | None:
    """The terms of a Linear whose terms are all loaded inputs (the fused path's case), else None."""
    if not isinstance(node, Linear):
        return None
    loads = [(term, coeff) for term, coeff in node.terms if isinstance(term, Load)]
    return loads if len(loads) == len(node.terms) else None


def _flatten(terms: tuple[tuple[Node, float], ...]) -> Node:
    combined: dict[Node, float] = {}
    for term, coeff in terms:
        if isinstance(term, Linear) and not any(isinstance(t, Adapter) for t, _ in term.terms):
            inner = term.terms
        else:  # opaque: kept as one term
            inner = ((term, 1.0),)
        for child, c in inner:
            combined[child] = combined.get(child, 0.0) + coeff * c
    kept = tuple((child, c) for child, c in combined.items() if c != 0.0)
    if len(kept) == 1 and kept[0][1] == 1.0:
        return kept[0][0]
    return Linear(kept or ((terms[0][0], 0.0),))  # everything cancelled: an all-zero result of the right shape


def _elementwise(node: Node, memo: dict[int, bool] | None = None) -> bool:
    """True when every Call under `node` is an elementwise method (and there are no adapters): then the tree can
    run chunk by chunk, keeping a worker's memory at its inputs plus one output instead of several full-size
    temporaries. Each distinct node is looked at once (a DAG of shared steps costs its size)."""
    memo = {} if memo is None else memo
    if id(node) in memo:
        return memo[id(node)]
    if isinstance(node, Load):
        result = True
    elif isinstance(node, Linear):
        result = all(_elementwise(term, memo) for term, _ in node.terms)
    elif isinstance(node, Call):
        result = METHODS[node.method].elementwise and all(_elementwise(child, memo) for child in node.inputs)
    else:
        result = False
    memo[id(node)] = result
    return result


def _accumulate(acc: torch.Tensor, tmp: torch.Tensor, x: torch.Tensor, coeff: float) -> None:
    if coeff == 1:  # mixed-dtype add/sub: x is widened exactly, no separate copy pass
        acc.add_(x)
    elif coeff == -1:
        acc.sub_(x)
    else:
        acc.add_(tmp.copy_(x).mul_(coeff))


def _check_stored(tensor: torch.Tensor, key: str) -> None:
    """Finite check of a tensor written as read, chunk by chunk over the bytes already in memory (one vectorised
    sum per chunk: a fraction of the cost of copying it)."""
    if not tensor.is_floating_point():
        return
    flat = tensor.reshape(-1)
    for start in range(0, flat.numel(), CHUNK):
        _check_chunk(flat[start : start + CHUNK], key)


def _check_chunk(stored: torch.Tensor, key: str) -> None:
    """Finite check of a just-written output chunk (still in cache): its fp32 sum is finite unless an element is
    NaN/Inf (fp16 overflow included); only then, or for sums of huge fp32 values, run the exact check. fp8 chunks
    are checked on their bytes (their float sum is a slow scalar loop)."""
    if stored.element_size() == 1:
        suspect = fp8_has_non_finite(stored)
    else:
        suspect = not math.isfinite(float(stored.sum(dtype=torch.float32)))
    if suspect:
        _check_finite(stored, key)


def _check_finite(t: torch.Tensor, key: str, when: str = "") -> None:
    if t.is_floating_point():
        if t.element_size() == 1:  # fp8 has no isfinite kernel; both fp8 formats widen exactly to fp16
            t = t.to(torch.float16)
        check_finite(t, f"key {key}" + (f" ({when})" if when else ""))
